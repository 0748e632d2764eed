"""MONAI Deploy App SDK operators that run any bundle of the collection as a super-resolution application.

The SDK's stock operators do not fit SR (../shared/spec/bundles.md, Deploy traps): its bundle operator casts
outputs to uint8, gives the output the input's spacing and calls only ``inferer(network=...)``; its NIfTI loader
drops the affine. These operators keep the geometry end to end:

- :class:`NiftiFolderLoaderOperator`: one checked RAS :class:`common.data.Volume` per NIfTI file per tick;
- :class:`DICOMImageToVolumeOperator`: the SDK's ``Image`` from ``DICOMSeriesToVolumeOperator`` (its RAS affine)
  as a :class:`common.data.Volume`;
- :class:`SuperResolutionBundleOperator`: the SDK's :class:`MonaiBundleInferenceOperator` running the bundle's own
  ``preprocessing``, hash-checked ``network``, ``inferer`` (samplers, windows, cascades) and ``postprocessing``
  up to :class:`common.transforms.SaveSRd`, whose float32 HR-grid results it emits instead of writing them;
- :class:`NiftiWriterOperator`: writes each result atomically, never over an input.

A bad input is reported (one ``error: <file>: <problem>`` line, kept in the :class:`RunReport`) and skipped: the
other inputs still run, as with ``monai.bundle run`` (docs/bundle_contract.md).

Importing this module needs the SDK (``make deploy-install``); ``common.deploy`` itself does not.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _preload_cuda_runtime() -> None:
    """Holoscan's extension modules link ``libcudart.so.12``, which pip puts in the nvidia-cuda-runtime-cu12 wheel,
    off the loader's path; loading it first (global symbols) spares users an ``LD_LIBRARY_PATH`` export. Holoscan
    needs only the library, not a GPU."""
    try:
        import nvidia.cuda_runtime as cuda_runtime
    except ImportError:  # a system CUDA, or the SDK's import below explains what is missing
        return
    for folder in cuda_runtime.__path__:
        lib = Path(folder) / "lib" / "libcudart.so.12"
        if lib.is_file():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


_preload_cuda_runtime()
try:
    from monai.deploy.core import AppContext, Fragment, Operator, OperatorSpec
    from monai.deploy.core.io_type import IOType
    from monai.deploy.operators.monai_bundle_inference_operator import (
        BundleConfigNames,
        IOMapping,
        MonaiBundleInferenceOperator,
    )
except ImportError as err:
    raise ImportError(
        f"the MONAI Deploy App SDK does not import here ({err}); it lives in its own environment: "
        "`make deploy-install` creates .venv-deploy (docs/deploy.md)"
    ) from err

from monai.bundle import ConfigParser
from monai.data import decollate_batch, list_data_collate
from monai.transforms import Compose
from monai.utils import set_determinism

from common.data.io import InputFileError, Volume, VolumeError, find_input_error, load_volume, volume_from_array
from common.transforms.io import SaveSRd, SRResult

__all__ = [
    "RunReport",
    "NiftiFolderLoaderOperator",
    "DICOMImageToVolumeOperator",
    "SuperResolutionBundleOperator",
    "NiftiWriterOperator",
]

logger = logging.getLogger("common")


@dataclass
class RunReport:
    """What an application run did: inputs seen, bad inputs (each reported once, as it happens), files written."""

    inputs: int = 0
    errors: list[InputFileError] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def fail(self, err: InputFileError) -> None:
        """Record a bad input and print its one ``error:`` line."""
        self.errors.append(err)
        print(f"error: {err}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        """The run's last line when some input failed (the wording of ``monai.bundle run``)."""
        names = ", ".join(Path(e.path).name for e in self.errors)
        return f"failed: {len(self.errors)} of {self.inputs} inputs ({names}); {self.inputs - len(self.errors)} processed"


class NiftiFolderLoaderOperator(Operator):
    """Emit one checked RAS :class:`common.data.Volume` per datalist item, one item per tick.

    Schedule it with ``CountCondition(fragment, len(items))``. An item the datalist marks bad (two inputs with one
    stem) or a file that fails :func:`common.data.load_volume` is reported and nothing is emitted for it.

    Args:
        fragment: the application.
        items: ``[{"image": path}, ...]`` from :func:`common.data.inference_datalist`.
        report: where bad inputs are recorded.
    """

    def __init__(self, fragment: Fragment, *args, items: Sequence[dict], report: RunReport, **kwargs) -> None:
        self.items, self.report, self.next = list(items), report, 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("volume")

    def compute(self, op_input, op_output, context) -> None:
        item = self.items[self.next]
        self.next += 1
        self.report.inputs += 1
        try:
            if item.get("error"):
                raise VolumeError(item["image"], item["error"])
            volume = load_volume(item["image"])
        except InputFileError as err:
            self.report.fail(err)
            return
        op_output.emit(volume, "volume")


class DICOMImageToVolumeOperator(Operator):
    """The SDK ``Image`` of a DICOM series as a RAS :class:`common.data.Volume` named after the series folder.

    ``DICOMSeriesToVolumeOperator`` (with ``affine_lps_to_ras=True``, its default) stacks slices as
    (slice, row, column) with a RAS affine for the (column, row, slice) order, as the SDK's own bundle operator
    reads it; the volume keeps that order as its source orientation.

    Args:
        fragment: the application.
        series_path: the series folder; the output stem is its name.
        report: where a series that cannot be used is recorded.
    """

    def __init__(self, fragment: Fragment, *args, series_path: str | Path, report: RunReport, **kwargs) -> None:
        self.series_path, self.report = Path(series_path), report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.output("volume")

    def compute(self, op_input, op_output, context) -> None:
        image = op_input.receive("image")
        self.report.inputs += 1
        try:
            meta = image.metadata()
            if meta.get("space", "RAS") != "RAS" or meta.get("affine") is None:
                raise VolumeError(self.series_path, "the DICOM series gave no RAS affine (space "
                                                    f"{meta.get('space')!r}); cannot place the output")
            data = np.swapaxes(np.asarray(image.asnumpy()), 0, 2)
            if data.ndim != 3:
                raise VolumeError(self.series_path, f"not a 3D series (array shape {data.shape})")
            volume = volume_from_array(data, np.asarray(meta["affine"], dtype=np.float64), self.series_path,
                                       header_dtype=str(data.dtype))
        except InputFileError as err:
            self.report.fail(err)
            return
        logger.info("DICOM series %s: %s voxels, RAS affine from the SDK", self.series_path, volume.data.shape)
        op_output.emit(volume, "volume")


def _flatten(transform) -> list:
    """The transforms of a (nested) Compose in the order they run."""
    if isinstance(transform, Compose):
        return [t for inner in transform.transforms for t in _flatten(inner)]
    return [transform]


class SuperResolutionBundleOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator for SR: the bundle's configs/inference.json run in-process on each volume.

    It replays what ``monai.bundle run`` does per volume in its ``SupervisedEvaluator``: ``preprocessing`` on
    ``{"image": volume}`` (the volume goes through the same checks as a file), collate, the ``inferer`` on
    ``(inputs, network)`` in eval mode without gradients, decollate, and ``postprocessing`` up to
    :class:`common.transforms.SaveSRd`, whose results (float32, HR grid, input units and orientation) are emitted
    instead of written. Later postprocessing steps (previews, metrics) belong to the bundle command and are not
    run. The network is the config's ``network``, so weights are sha256-checked against large_files.yml and
    loaded with ``weights_only=True`` (the stock operator ``torch.load``s them unchecked).

    Args:
        fragment: the application.
        app_context: the SDK's context (input, output, model paths).
        bundle_path: the bundle folder.
        overrides: config values to set, as ``monai.bundle run --key value`` would (``output_dir`` included).
        report: where bad inputs are recorded.
        config_file: the bundle config to run, relative to the bundle.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        app_context: AppContext,
        bundle_path: str | Path,
        overrides: dict[str, Any],
        report: RunReport,
        config_file: str = "configs/inference.json",
        **kwargs,
    ) -> None:
        self._overrides, self._report, self._config_file = dict(overrides), report, config_file
        super().__init__(
            fragment,
            *args,
            app_context=app_context,
            input_mapping=[IOMapping("volume", Volume, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("results", list, IOType.IN_MEMORY)],
            bundle_path=str(Path(bundle_path).resolve()),
            bundle_config_names=BundleConfigNames(config_names=[Path(config_file).stem]),
            **kwargs,
        )
        # the SDK defers a folder bundle to the first compute; parsing now makes a bad bundle or weights file
        # stop the application before its graph runs, with one error line
        self._init_config(self._bundle_config_names.config_names)
        self._init_completed = True

    def _init_config(self, config_names) -> None:
        """Parse the bundle's config with the overrides, as ``monai.bundle run`` does, and build its parts."""
        root = Path(self.bundle_path)
        if str(root) not in sys.path:  # the bundle's own modules, as `monai.bundle run` makes them importable
            sys.path.insert(0, str(root))
        parser = ConfigParser()
        parser.read_config(str(root / self._config_file))
        parser.read_meta(str(root / "configs" / "metadata.json"))
        parser.update({"bundle_root": str(root), **self._overrides})
        self.parser = parser
        set_determinism(seed=parser.get_parsed_content("seed", default=0))
        self._device = parser.get_parsed_content("device")
        self._preproc = parser.get_parsed_content("preprocessing")
        self._inferer = parser.get_parsed_content("inferer")
        steps = _flatten(parser.get_parsed_content("postprocessing"))
        save = [i for i, t in enumerate(steps) if isinstance(t, SaveSRd)]
        if not save:
            raise VolumeError(root / self._config_file, "its postprocessing has no common.transforms.SaveSRd, so "
                                                        "the application cannot tell which outputs to write")
        self._postproc, self._save = Compose(steps[: save[0]]), steps[save[0]]
        self._model_network = parser.get_parsed_content("network").eval()

    def compute(self, op_input, op_output, context) -> None:
        volume = op_input.receive("volume")
        try:
            batch = self.pre_process({"image": volume})
            pred = self.predict(batch["image"].to(self._device))
            results = self.post_process(pred, **{self.kw_preprocessed_inputs: batch})
        except Exception as err:
            bad = find_input_error(err)
            if bad is None:
                raise
            self._report.fail(bad)
            return
        op_output.emit(results, "results")

    def pre_process(self, data: dict, *args, **kwargs) -> dict:
        """The bundle's preprocessing on one item, collated into a batch of one (the evaluator's batch_size)."""
        return list_data_collate([self._preproc(data)])

    def predict(self, data: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The bundle's inferer, as the evaluator calls it: eval mode, no gradients."""
        with torch.no_grad():
            return self._inferer(data, self._model_network)

    def post_process(self, data: torch.Tensor, *args, **kwargs) -> list[SRResult]:
        """The bundle's postprocessing up to SaveSRd on the decollated item, merged as the engine merges it."""
        batch = kwargs[self.kw_preprocessed_inputs]
        outputs = {"image": batch["image"], "label": None, "pred": data}
        results = []
        for b, o in zip(decollate_batch(batch, detach=True), decollate_batch(outputs, detach=True)):
            item = dict(b)
            item.update(o)
            results += self._save.results(self._postproc(item))
        return results


class NiftiWriterOperator(Operator):
    """Write each :class:`common.transforms.SRResult` it receives (atomic, never over an input).

    Args:
        fragment: the application.
        report: where written files are recorded.
    """

    def __init__(self, fragment: Fragment, *args, report: RunReport, **kwargs) -> None:
        self.report = report
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("results")

    def compute(self, op_input, op_output, context) -> None:
        for result in op_input.receive("results"):
            try:
                path = result.save()
            except InputFileError as err:
                self.report.fail(err)
                continue
            self.report.written.append(path)
            logger.info("wrote %s", path)
