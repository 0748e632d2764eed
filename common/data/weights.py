"""Trusted weights and checkpoint files: the hash a bundle's ``large_files.yml`` lists is checked before a file is
used, files are read with ``torch.load(..., weights_only=True)`` (no pickled code runs), and a damaged file is a
clear error naming it, never a half-loaded network.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data.io import InputFileError
from common.utils import is_unset

__all__ = ["file_hash", "listed_hash", "verify_listed", "read_state", "check_state_fits"]

logger = logging.getLogger("common")


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listed_hash(large_files: str | os.PathLike, path: str | os.PathLike) -> tuple[str, str] | None:
    """``(hash_type, hash_val)`` that a ``large_files.yml`` lists for ``path``, or None when it lists no such file.

    Entries' ``path`` values are relative to the folder of the yml file (the bundle root), as in the model zoo.
    """
    import yaml

    large_files = Path(large_files)
    entries = yaml.safe_load(large_files.read_text()).get("large_files", []) or []
    target = Path(path).resolve()
    for entry in entries:
        if (large_files.parent / entry["path"]).resolve() == target:
            return str(entry.get("hash_type", "sha256")), str(entry["hash_val"])
    return None


def verify_listed(path: str | os.PathLike, large_files: str | os.PathLike | None) -> bool:
    """Check ``path`` against its entry in ``large_files``; True when verified, False when it is not listed.

    Raises:
        InputFileError: the file is missing, or its hash differs from the listed one (both hashes named).
    """
    path = Path(path)
    listed = None if is_unset(large_files) or not Path(large_files).is_file() else listed_hash(large_files, path)
    if not path.is_file():
        hint = (f": it is listed in {large_files}; fetch it with `python -m monai.bundle download_large_files "
                f"--bundle_path {Path(large_files).parent}`") if listed else ""
        raise InputFileError(path, "no such weights file" + hint)
    if is_unset(large_files) or not Path(large_files).is_file():
        return False
    if listed is None:
        logger.info("%s is not listed in %s: loaded without a hash check", path, large_files)
        return False
    hash_type, expected = listed
    actual = file_hash(path, hash_type)
    if actual != expected:
        raise InputFileError(
            path, f"{hash_type} {actual} differs from {expected} listed in {large_files}: the file was changed or "
            "damaged; restore it, or pass your own weights with --model_path",
        )
    return True


def read_state(path: str | os.PathLike, map_location: Any = "cpu", large_files: str | os.PathLike | None = None):
    """Read a weights or checkpoint file with ``weights_only=True`` after checking its listed hash.

    Raises:
        InputFileError: missing, hash mismatch, or not a readable PyTorch file (truncated, corrupted).
    """
    import torch

    verify_listed(path, large_files)
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, non-tensor objects refused by weights_only
        raise InputFileError(path, f"not a readable PyTorch weights file ({type(err).__name__}: {err})") from err


def check_state_fits(path: str | os.PathLike, state: Mapping[str, Any], module,
                     partial: bool = False) -> tuple[list[str], list[str]]:
    """Refuse a ``state_dict`` that does not fit ``module`` before anything is copied (``load_state_dict`` would
    fill the matching tensors first and only then raise); return the module's names the file lacks and the file's
    names the module lacks.

    With ``partial`` (a student initialised from its teacher) those two may be non-empty; a wrong shape, or no name
    in common at all, is still refused.
    """
    if not isinstance(state, Mapping):
        raise InputFileError(path, f"expected a state_dict, found {type(state).__name__}")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state)
                   if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape))
    if partial and own and len(missing) == len(own):
        raise InputFileError(path, "no tensor of the weights has a name of the network's: another network's?")
    refused = (("wrong shape", wrong),) if partial else (("missing", missing), ("unexpected", unexpected),
                                                        ("wrong shape", wrong))
    parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in refused if keys]
    if parts:
        raise InputFileError(path, f"the weights do not fit the network ({'; '.join(parts)}): another "
                                   "configuration's weights?")
    return missing, unexpected
