"""``torch.export`` programs (``.pt2``) of a bundle's network, the format the model zoo is moving to from TorchScript.

A diffusion network takes a noise level; its single-input call ``network_def(x)`` fixes it at the config's
``probe_sigma`` (the call MONAI's ``verify_net_in_out`` and ``ckpt_export`` make), so the program is the network
at that noise level, with the batch and spatial sizes left dynamic. The weights are the config's hash-checked
``network``; the program's output is checked against the eager network's before the file is written.

    python -m common.deploy.program bundles/brain_mri_edm25d_super_resolution --output dist/model.pt2
    python -m common.deploy.program bundles/brain_mri_edm25d_super_resolution \\
        --config_file configs/inference.json configs/regression.json --output dist/model_regression.pt2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from common.data.io import atomic_path

__all__ = ["example_input", "bundle_network", "export_program", "max_difference", "main"]


def example_input(network_data_format: dict, batch: int = 2, size: int | None = None) -> torch.Tensor:
    """A random input of the bundle's ``network_data_format`` (metadata.json): ``batch`` x channels x spatial.

    Args:
        network_data_format: the metadata's ``network_data_format``.
        batch: batch size (2, so that the batch dimension is exported dynamic: torch.export specialises size 1).
        size: each spatial size; default: the metadata's spatial shape where it is a number, else 64 (2D) / 32 (3D).
    """
    spec = network_data_format["inputs"]["image"]
    shape = spec["spatial_shape"]
    default = 64 if len(shape) == 2 else 32
    spatial = [size or (s if isinstance(s, int) and s > 1 else default) for s in shape]
    generator = torch.Generator().manual_seed(0)
    return torch.randn([batch, int(spec["num_channels"]), *spatial], generator=generator)


def bundle_network(bundle: str | Path, config_files: Sequence[str] = ("configs/inference.json",)):
    """The bundle's ``network`` (weights hash-checked against large_files.yml) in eval mode, and its metadata."""
    from monai.bundle import ConfigParser

    root = Path(bundle).resolve()
    configs = [root / c for c in config_files]
    for config in [*configs, root / "configs" / "metadata.json"]:
        if not config.is_file():
            raise SystemExit(f"error: {config}: no such bundle file")
    if str(root) not in sys.path:  # the bundle's own modules, as `monai.bundle run` makes them importable
        sys.path.insert(0, str(root))
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), "device": "$torch.device('cpu')"})
    if "network" not in parser:
        raise SystemExit(f"error: {root}: its configs {list(config_files)} define no network to export")
    return parser.get_parsed_content("network").eval(), parser.get("_meta_")


def max_difference(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference of two modules' outputs on ``x``."""
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def export_program(
    bundle: str | Path,
    output: str | Path,
    config_files: Sequence[str] = ("configs/inference.json",),
    tolerance: float = 1e-5,
) -> tuple[Path, float]:
    """Export the bundle's network with ``torch.export`` and save it to ``output`` (a ``.pt2`` file).

    Batch and spatial sizes are dynamic (``Dim.AUTO``); a spatial size the network cannot take (e.g. not a multiple
    of its downsampling factor) is refused by the program's guards when it is called.

    Args:
        bundle: the bundle folder.
        output: the ``.pt2`` file to write (atomically; never over an existing file).
        config_files: the bundle configs that define ``network``, merged in order, relative to the bundle.
        tolerance: largest allowed absolute difference between the saved program's and the eager network's output
            on the example input (the program runs the same ATen kernels: measured 0 on every bundle).

    Returns:
        The written file and the measured largest difference.

    Raises:
        SystemExit: the file exists, or the program's output differs from the eager one by more than ``tolerance``.
    """
    output = Path(output)
    if output.exists():
        raise SystemExit(f"error: {output}: already exists, not overwritten")
    network, meta = bundle_network(bundle, config_files)
    x = example_input(meta["network_data_format"])
    dynamic = {0: torch.export.Dim.AUTO, **{d: torch.export.Dim.AUTO for d in range(2, x.ndim)}}
    with torch.no_grad():
        program = torch.export.export(network, (x,), dynamic_shapes=({**dynamic},))
    with atomic_path(output) as tmp:
        torch.export.save(program, str(tmp))
        difference = max_difference(network, torch.export.load(str(tmp)).module(), x)
        if not difference <= tolerance:
            raise SystemExit(f"error: {output}: the exported program differs from the network by {difference:.3g} "
                             f"(tolerance {tolerance:g}); not written")
    return output, difference


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.deploy.program", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="bundle folder")
    ap.add_argument("--output", required=True, help="the .pt2 file to write")
    ap.add_argument("--config_file", nargs="+", default=["configs/inference.json"],
                    help="bundle configs defining `network`, relative to the bundle (default: configs/inference.json)")
    args = ap.parse_args(argv)
    path, difference = export_program(args.bundle, args.output, args.config_file)
    print(f"{path}  largest difference to the eager network {difference:.3g}")


if __name__ == "__main__":
    main()
