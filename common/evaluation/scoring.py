"""Scoring an SR prediction against its HR reference, shared by the inference demo, evaluate.json and the benchmark.

Every path goes through :func:`score_sr`: SR and HR are put on the HR volume's 1st/99th-percentile [0, 1] scale,
scored with :mod:`common.evaluation.metrics` (whole non-empty slices and inside the head mask), and compared with the
grid-aligned interpolations of the same LR input: the cubic B-spline, the stronger interpolant and the reference of
every gain (``delta_*``), and Keys cubic convolution ("bicubic"; 0.4-0.6 dB weaker in the head mask on the
validation people at x2), kept as a row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from common.data.io import atomic_path, load_volume, nifti_stem, save_volume
from common.evaluation import figures, metrics, tables
from common.evaluation.tissue import dice_per_class
from common.transforms.degrade import BlockAverage, Degradation
from common.transforms.intensity import invert_normalization, percentiles
from common.transforms.mask import head_mask
from common.transforms.tissue import segment_tissues
from common.transforms.upsample import GridUpsample

__all__ = ["REFERENCE", "BASELINES", "ScoredVolume", "score_sr", "SampleReportd", "SREvaluationHandler"]

# The interpolation baselines scored beside every SR volume (GridUpsample modes), the first one the reference.
BASELINES = {"bspline": "cubic B-spline", "cubic": "Keys cubic"}
REFERENCE = "bspline"

logger = logging.getLogger("common")


def _plain(x) -> np.ndarray:
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x[0] if x.ndim == 4 else x


@dataclass
class ScoredVolume:
    """One scored subject: summaries and per-slice rows of SR and of each interpolation baseline (``BASELINES``,
    keyed by upsampling mode), and the [0, 1] volumes."""

    subject: str
    sr: dict
    baselines: dict[str, dict]
    per_slice: list[dict]
    baselines_per_slice: dict[str, list[dict]]
    volumes: dict[str, np.ndarray]
    mask: np.ndarray

    @property
    def reference(self) -> dict:
        """The summary of the reference baseline (the cubic B-spline)."""
        return self.baselines[REFERENCE]

    def gains(self, baseline: str = REFERENCE) -> dict:
        """``delta_<metric>``: SR minus ``baseline`` for PSNR and SSIM, whole and in the head mask."""
        ref = self.baselines[baseline]
        return {
            f"delta_{k}": self.sr[k] - ref[k]
            for k in ("psnr", "psnr_mask", "ssim2d", "ssim2d_mask")
            if isinstance(self.sr.get(k), float) and isinstance(ref.get(k), float)
        }

    def as_json(self) -> dict:
        """The summaries with the gains over the reference baseline."""
        return {"subject": self.subject, "sr": self.sr, **self.baselines, "reference": REFERENCE, **self.gains()}


def score_sr(
    sr_units,
    hr_units,
    lr_units,
    scale_factor: Sequence[int],
    degradation: Degradation | None = None,
    lpips: metrics.LPIPS | None = None,
    subject: str = "",
    brain_mask=None,
) -> ScoredVolume:
    """Score an SR volume (input units) against HR, with the interpolation baselines of the same LR volume.

    Args:
        sr_units: SR volume on the HR grid, in the input's intensity units.
        hr_units: HR reference (cropped to the SR shape when it has trailing voxels the LR grid dropped).
        lr_units: the LR input, in the same units.
        scale_factor: HR/LR factor per axis.
        degradation: the LR simulation, for data consistency (block averaging when None).
        lpips: optional LPIPS metric object.
        subject: name for the tables.
        brain_mask: when given (HR grid), SR and every baseline also get the tissue Dice against HR per class
            (``tissue_dice_csf``/``_gm``/``_wm``, :func:`common.evaluation.tissue_dice`).
    """
    sr, hr, lr = _plain(sr_units), _plain(hr_units), _plain(lr_units)
    hr = hr[tuple(slice(0, s) for s in sr.shape)]
    if hr.shape != sr.shape:
        raise ValueError(f"{subject}: SR shape {sr.shape} does not fit HR shape {hr.shape}")
    lo, hi = percentiles(hr)

    def unit(v):
        return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    degradation = degradation if degradation is not None else BlockAverage(scale_factor)

    def degrade(v):
        return _plain(degradation(torch.from_numpy(np.asarray(v, dtype=np.float32))[None]))

    lr_t = torch.from_numpy(lr)[None, None]
    upsampled = {mode: GridUpsample(scale_factor, mode)(lr_t)[0, 0].numpy() for mode in (*BASELINES, "nearest")}
    mask = head_mask(hr)
    lr_scaled = ((lr - lo) / (hi - lo)).astype(np.float32)
    sr_summary, rows = metrics.evaluate_volume(
        unit(sr), unit(hr), mask=mask, lr=lr_scaled, degrade=degrade, lpips=lpips, subject=subject
    )
    baselines, baseline_rows = {}, {}
    for mode in BASELINES:
        baselines[mode], baseline_rows[mode] = metrics.evaluate_volume(
            unit(upsampled[mode]), unit(hr), mask=mask, subject=subject
        )
    if brain_mask is not None:
        brain = _plain(brain_mask)[tuple(slice(0, n) for n in sr.shape)] > 0
        reference = segment_tissues(unit(hr), brain)  # once, for SR and every baseline
        for summary, volume in ((sr_summary, sr), *((baselines[m], upsampled[m]) for m in BASELINES)):
            dice = dice_per_class(segment_tissues(unit(volume), brain), reference)
            summary.update({f"tissue_dice_{k}": v for k, v in dice.items()})
    volumes = {"LR (nearest)": unit(upsampled["nearest"]), **{m: unit(upsampled[m]) for m in BASELINES},
               "SR": unit(sr), "HR": unit(hr)}
    return ScoredVolume(subject, sr_summary, baselines, rows, baseline_rows, volumes, mask)


def _item_units(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """SR prediction and LR input of a decollated item, back in the input's units (the unclipped LR if kept)."""
    image = item["image"]
    lo, hi = float(image.meta["norm_lo"]), float(image.meta["norm_hi"])
    lr = _plain(item["image_units"]) if "image_units" in item else invert_normalization(_plain(image), lo, hi)
    return invert_normalization(_plain(item["pred"]), lo, hi), lr


class SampleReportd:
    """Postprocessing for items with a known HR ``label`` (the embedded sample): writes, beside the SR output,
    ``<stem>_lr.nii.gz`` (the simulated LR input), ``<stem>_preview.png`` and ``<stem>_metrics.json``.

    Args:
        output_dir: the inference output folder.
        scale_factor: HR/LR factor per RAS axis.
        degradation: how LR was simulated (for data consistency).
    """

    def __init__(self, output_dir: str, scale_factor: Sequence[int], degradation: Degradation | None = None):
        self.output_dir = Path(output_dir)
        self.scale_factor = tuple(int(f) for f in scale_factor)
        self.degradation = degradation

    def __call__(self, data: dict) -> dict:
        if "label" not in data or not isinstance(data.get("label"), MetaTensor):
            return data
        sr, lr = _item_units(data)
        label = data["label"]
        stem = nifti_stem(label.meta["filename_or_obj"])
        scored = score_sr(sr, label, lr, self.scale_factor, self.degradation, subject=stem)
        image = data["image"]
        save_volume(
            self.output_dir / f"{stem}_lr.nii.gz", lr, np.asarray(image.affine), np.asarray(image.meta["source_ornt"]),
            protect=[label.meta["filename_or_obj"]],
        )
        views = {k: scored.volumes[k] for k in ("LR (nearest)", "SR", "HR")}
        figures.preview(views, self.output_dir / f"{stem}_preview.png")
        with atomic_path(self.output_dir / f"{stem}_metrics.json") as tmp:
            tmp.write_text(json.dumps(tables.json_safe(scored.as_json()), indent=2))
        logger.info(
            "sample: PSNR (head mask) %.2f dB, cubic B-spline %.2f dB", scored.sr["psnr_mask"], scored.reference["psnr_mask"]
        )
        return data


class SREvaluationHandler:
    """Ignite handler for evaluate.json: scores every volume, then writes metric tables and report figures.

    Writes into ``output_dir``: ``metrics_per_subject.{csv,json}``, ``metrics_per_slice.{csv,json}`` (the method),
    ``<baseline>_per_subject.{csv,json}`` and ``<baseline>_per_slice.{csv,json}`` for each of ``BASELINES``
    (``bspline``, the reference of the gains, and ``cubic``), and ``bars.png``, ``per_subject_psnr.png``,
    ``three_view.png``, ``error_heatmap.png``, ``per_slice_psnr.png`` (first subject for the per-volume figures).

    Args:
        output_dir: destination folder.
        scale_factor: HR/LR factor per RAS axis.
        method: the method's name in tables and figures.
        degradation: the LR simulation used (for data consistency).
        lpips_backbone: "pretrained" (if present locally; else reported unavailable), "random" or None (skip).
    """

    def __init__(
        self,
        output_dir: str,
        scale_factor: Sequence[int],
        method: str = "SR",
        degradation: Degradation | None = None,
        lpips_backbone: str | None = "pretrained",
    ):
        self.output_dir = Path(output_dir)
        self.scale_factor = tuple(int(f) for f in scale_factor)
        self.method, self.degradation = method, degradation
        self.lpips = metrics.LPIPS(backbone=lpips_backbone) if lpips_backbone else None
        if self.lpips is not None and not self.lpips.available:
            logger.warning("LPIPS unavailable: %s", self.lpips.reason)
        self.scored: list[ScoredVolume] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.scored.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _score(self, engine: Engine) -> None:
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for batch, output in zip(batches, outputs):
            item = {**batch, **output}
            sr, lr = _item_units(item)
            label = item["label"]
            subject = nifti_stem(label.meta["filename_or_obj"])
            brain = item.get("brain_mask")  # a datalist entry with a brain mask also gets the tissue Dice
            if isinstance(brain, (str, Path)):
                brain = load_volume(brain).data
            self.scored.append(
                score_sr(sr, label, lr, self.scale_factor, self.degradation, self.lpips, subject, brain_mask=brain)
            )
            s = self.scored[-1]
            logger.info(
                "%s: PSNR (mask) %.2f dB vs cubic B-spline %.2f dB", subject, s.sr["psnr_mask"], s.reference["psnr_mask"]
            )

    def _write(self, engine: Engine) -> None:
        if not self.scored:
            return
        out = self.output_dir
        tables.write_tables([s.sr for s in self.scored], [r for s in self.scored for r in s.per_slice], out)
        for mode in BASELINES:
            tables.write_tables(
                [s.baselines[mode] for s in self.scored], [r for s in self.scored for r in s.baselines_per_slice[mode]],
                out, prefix=mode,
            )
        names = {mode: BASELINES[mode] for mode in BASELINES}
        means = {names[m]: tables.summarise([s.baselines[m] for s in self.scored]) for m in BASELINES}
        means[self.method] = tables.summarise([s.sr for s in self.scored])
        figures.bar_chart(means, out / "bars.png", metrics=("psnr_mask", "ssim2d_mask"))
        figures.per_subject_psnr({**{names[m]: [s.baselines[m] for s in self.scored] for m in BASELINES},
                                 self.method: [s.sr for s in self.scored]}, out / "per_subject_psnr.png")
        first = self.scored[0]
        figures.three_view({k: first.volumes[k] for k in ("LR (nearest)", "SR", "HR")}, out / "three_view.png")
        figures.error_heatmap(first.volumes["SR"], first.volumes["HR"], out / "error_heatmap.png")
        figures.per_slice_psnr(
            {names[REFERENCE]: first.baselines_per_slice[REFERENCE], self.method: first.per_slice},
            out / "per_slice_psnr.png",
        )
        engine.state.metrics.update({k: v for k, v in means[self.method].items() if isinstance(v, float)})
        logger.info("evaluation written to %s", out)
