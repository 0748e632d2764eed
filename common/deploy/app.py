"""The collection's MONAI Deploy application: any bundle, chosen by path, on a folder of NIfTI or a DICOM series.

    python -m common.deploy --bundle bundles/brain_mri_edm25d_super_resolution --input <folder> --output <folder>

NIfTI folder: NiftiFolderLoader -> SuperResolutionBundle -> NiftiWriter, one volume per tick. DICOM series folder:
the SDK's DICOMDataLoader -> DICOMSeriesSelector -> DICOMSeriesToVolume -> DICOMImageToVolume -> the same two.
Outputs are the bundle command's: ``<stem>_sr.nii.gz`` (and ``<stem>_sr_std.nii.gz`` with ``--num_samples``),
float32 on the HR grid; a DICOM series is named after its folder. Bad inputs: one ``error:`` line each, the
others still run, exit status 1 at the end (docs/bundle_contract.md). Runs in the SDK's environment
(``make deploy-install``, docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from common.data.datalists import inference_datalist
from common.data.io import NIFTI_SUFFIXES, VolumeError, find_input_error

__all__ = ["input_format", "SuperResolutionApp", "main"]


def input_format(folder: str | Path) -> str:
    """``"nifti"`` when ``folder`` holds NIfTI files, ``"dicom"`` when it holds DICOM files (``.dcm`` or the
    DICM preamble) and no NIfTI; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "no such folder")
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(NIFTI_SUFFIXES) for p in files):
        return "nifti"
    for p in files:
        if p.suffix.lower() == ".dcm":
            return "dicom"
        with open(p, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                return "dicom"
    raise VolumeError(folder, "holds neither NIfTI (.nii, .nii.gz) nor DICOM files")


def _sdk():
    """The SDK parts, imported on use so that ``common.deploy`` imports where the SDK is not installed."""
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import AppContext, Application
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    from common.deploy import operators

    return CountCondition, AppContext, Application, DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, \
        DICOMSeriesToVolumeOperator, operators


def SuperResolutionApp(  # noqa: N802 (a factory: the Application base class is only known once the SDK imports)
    bundle: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    overrides: dict[str, Any] | None = None,
    series_rules: str = "",
):
    """Build the application (an SDK ``Application``) for one bundle and one input folder.

    Args:
        bundle: the bundle folder.
        input_path: a folder of NIfTI volumes, or a DICOM series folder.
        output_path: the output folder (checked as the bundle command checks it).
        overrides: bundle config values, e.g. ``{"num_steps": 8}`` (``output_dir`` is ``output_path``).
        series_rules: the DICOMSeriesSelectorOperator's JSON selection rules; empty: all series, the first used.

    Returns:
        the application, with ``.report`` (a :class:`common.deploy.operators.RunReport`) filled by ``run()``.
    """
    (CountCondition, AppContext, Application, DICOMDataLoaderOperator, DICOMSeriesSelectorOperator,
     DICOMSeriesToVolumeOperator, operators) = _sdk()
    bundle, input_path, output_path = Path(bundle).resolve(), Path(input_path).resolve(), Path(output_path)
    if not (bundle / "configs" / "inference.json").is_file():
        raise VolumeError(bundle, "not a bundle of the collection (no configs/inference.json)")
    fmt = input_format(input_path)
    # the bundle command's whole-run checks: output folder writable and not the input folder, duplicate stems
    items = inference_datalist(str(input_path), output_dir=str(output_path)) if fmt == "nifti" else None
    if fmt == "dicom":
        inference_datalist(None, output_dir=str(output_path))
    overrides = {**(overrides or {}), "output_dir": str(output_path)}

    class _App(Application):
        """SR of every input with one bundle; see :mod:`common.deploy.app`."""

        def compose(self):
            context = AppContext({"input": str(input_path), "output": str(output_path), "model": str(bundle)})
            sr = operators.SuperResolutionBundleOperator(
                self, app_context=context, bundle_path=bundle, overrides=overrides, report=self.report,
                name="super_resolution",
            )
            writer = operators.NiftiWriterOperator(self, report=self.report, name="nifti_writer")
            if fmt == "nifti":
                loader = operators.NiftiFolderLoaderOperator(
                    self, CountCondition(self, len(items)), items=items, report=self.report, name="nifti_loader"
                )
            else:
                study = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path,
                                                name="dicom_loader")
                series = DICOMSeriesSelectorOperator(self, rules=series_rules, name="series_selector")
                to_image = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
                loader = operators.DICOMImageToVolumeOperator(self, series_path=input_path, report=self.report,
                                                              name="dicom_to_volume")
                self.add_flow(study, series, {("dicom_study_list", "dicom_study_list")})
                self.add_flow(series, to_image, {("study_selected_series_list", "study_selected_series_list")})
                self.add_flow(to_image, loader, {("image", "image")})
            self.add_flow(loader, sr, {("volume", "volume")})
            self.add_flow(sr, writer, {("results", "results")})

    app = _App([sys.argv[0]])
    app.report = operators.RunReport()
    return app


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string, as `monai.bundle run --key value` takes it


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.deploy", description=__doc__.split("\n\n")[0])
    # inside a MAP the packager's runtime passes paths through the environment (the SDK's RuntimeEnv names)
    env = {"bundle": os.environ.get("BUNDLE_PATH"), "input": os.environ.get("HOLOSCAN_INPUT_PATH"),
           "output": os.environ.get("HOLOSCAN_OUTPUT_PATH")}
    ap.add_argument("--bundle", default=env["bundle"], required=not env["bundle"],
                    help="bundle folder, e.g. bundles/brain_mri_edm25d_super_resolution (default: $BUNDLE_PATH)")
    ap.add_argument("--input", default=env["input"], required=not env["input"],
                    help="folder of NIfTI volumes, or a DICOM series folder (default: $HOLOSCAN_INPUT_PATH)")
    ap.add_argument("--output", default=env["output"], required=not env["output"],
                    help="output folder, <stem>_sr.nii.gz per input (default: $HOLOSCAN_OUTPUT_PATH)")
    ap.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                    help="bundle config override (JSON value), e.g. --set num_steps=8; repeatable")
    ap.add_argument("--series_rules", default="", help="JSON file of DICOM series selection rules (SDK format)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        rules = Path(args.series_rules).read_text() if args.series_rules else ""
        app = SuperResolutionApp(args.bundle, args.input, args.output, dict(args.overrides), rules)
        app.run()
    except Exception as err:  # a whole-run problem (folder, bundle, weights) stops the run with one line
        bad = find_input_error(err)
        if bad is None:
            raise
        print(f"error: {bad}", file=sys.stderr, flush=True)
        return 1
    report = app.report
    if report.errors:
        print(report.summary(), file=sys.stderr, flush=True)
        return 1
    if not report.written:
        print(f"error: {args.input}: nothing was written", file=sys.stderr, flush=True)
        return 1
    return 0
