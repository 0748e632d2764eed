"""Three-class tissue model of the brain (CSF, GM, WM): a Gaussian mixture of intensities inside a brain mask,
optionally weighted by spatial priors (the atlas's moved tissue maps, as SPM's unified segmentation does), the
hard segmentation it gives, and the thesis's GMM intensity augmentation (methods.md §4).

Classes are ordered by mean intensity, CSF < GM < WM, the order of a T1 scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

from .brain_extraction import AtlasBrainMaskd
from .intensity import percentiles
from .io import LoadVolumed

__all__ = [
    "TissueModel",
    "fit_tissue_model",
    "segment_tissues",
    "TissueSegmentd",
    "remap_tissue_intensities",
    "draw_tissue_remap",
    "RandGMMIntensityd",
    "TissueModeld",
]


@dataclass
class TissueModel:
    """A fitted mixture: per-class ``means``, ``stds`` and ``weights`` (CSF, GM, WM order) and each brain voxel's
    hard ``labels`` (1 CSF, 2 GM, 3 WM; 0 outside the brain)."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray
    labels: np.ndarray


def _arr(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x[0] if x.ndim == 4 else x


def _responsibilities(v: np.ndarray, prior: np.ndarray, means, stds) -> tuple[np.ndarray, float]:
    log_p = -0.5 * ((v[:, None] - means) / stds) ** 2 - np.log(stds) + np.log(prior)
    top = log_p.max(axis=1, keepdims=True)
    resp = np.exp(log_p - top)
    total = resp.sum(axis=1, keepdims=True)
    return resp / total, float(np.mean(np.log(total) + top))


def fit_tissue_model(
    volume,
    brain_mask,
    priors: Sequence | None = None,
    iterations: int = 50,
    tol: float = 1e-5,
    max_samples: int = 200_000,
) -> TissueModel:
    """Fit the 3-class Gaussian mixture to the intensities inside ``brain_mask`` by EM.

    Args:
        volume: (X, Y, Z) or (1, X, Y, Z) intensities.
        brain_mask: voxels to model.
        priors: optional (CSF, GM, WM) probability maps on the same grid: each voxel's class prior is its map
            value (plus a small floor, so no class is ever impossible) instead of one global mixing weight.
        iterations: EM iterations at most.
        tol: stop when the mean log-likelihood changes by less than this.
        max_samples: fit on every n-th brain voxel so that at most this many take part (a brain has ~10^6;
            three Gaussians need far fewer); every voxel is then labelled with the fitted model.
    """
    x = _arr(volume).astype(np.float64)
    mask = _arr(brain_mask) > 0
    if mask.sum() < 30:
        raise ValueError(f"tissue model: the brain mask holds {int(mask.sum())} voxels, too few to fit 3 classes")
    v = x[mask]
    if priors is not None:
        prior = np.stack([_arr(p)[mask] for p in priors], axis=1).astype(np.float64) + 1e-3
        prior /= prior.sum(axis=1, keepdims=True)
    else:
        prior = np.full((v.size, 3), 1 / 3)
    stride = max(1, -(-v.size // int(max_samples)))
    v_fit, prior_fit = v[::stride], prior[::stride]
    means = np.percentile(v_fit, [15, 50, 85])  # a T1's CSF, GM and WM lie low, mid and high
    stds = np.full(3, max(v_fit.std() / 3, 1e-6))
    previous = -np.inf
    for _ in range(iterations):
        resp, likelihood = _responsibilities(v_fit, prior_fit, means, stds)
        n_k = resp.sum(axis=0) + 1e-12
        means = (resp * v_fit[:, None]).sum(axis=0) / n_k
        stds = np.sqrt((resp * (v_fit[:, None] - means) ** 2).sum(axis=0) / n_k).clip(min=1e-6)
        if priors is None:
            prior_fit = np.broadcast_to(n_k / n_k.sum(), prior_fit.shape)
        if abs(likelihood - previous) < tol:
            break
        previous = likelihood
    if priors is None:
        prior = np.broadcast_to(prior_fit[:1], prior.shape)
    resp, _ = _responsibilities(v, prior, means, stds)
    order = np.argsort(means)
    labels = np.zeros(x.shape, dtype=np.uint8)
    labels[mask] = np.argsort(order)[resp.argmax(axis=1)] + 1
    weights = resp.sum(axis=0)[order] / v.size
    return TissueModel(means=means[order], stds=stds[order], weights=weights, labels=labels)


def segment_tissues(volume, brain_mask, priors: Sequence | None = None) -> np.ndarray:
    """Hard CSF/GM/WM labels (1/2/3, 0 outside ``brain_mask``) of :func:`fit_tissue_model`."""
    return fit_tissue_model(volume, brain_mask, priors).labels


class TissueSegmentd(MapTransform):
    """Tissue labels of ``keys`` (first present) into ``label_key``, inside ``mask_key``, with the moved atlas
    maps ``"{prior_key}_csf"`` etc. as priors when present (:class:`common.transforms.AtlasBrainMaskd`)."""

    def __init__(self, keys: KeysCollection, mask_key: str = "brain_mask", label_key: str = "tissue",
                 prior_key: str | None = "prior", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.label_key, self.prior_key = mask_key, label_key, prior_key

    def __call__(self, data):
        d = dict(data)
        names = [f"{self.prior_key}_{k}" for k in ("csf", "gm", "wm")] if self.prior_key else []
        priors = [d[n] for n in names] if names and all(n in d for n in names) else None
        labels = segment_tissues(d[self.first_key(d)], d[self.mask_key], priors)
        d[self.label_key] = torch.from_numpy(labels)[None]
        return d


def remap_tissue_intensities(volume, model: TissueModel, means: Sequence[float], stds: Sequence[float]) -> np.ndarray:
    """Each brain voxel of class k moved to ``means[k] + stds[k] * z`` with z its z-score in its class
    (methods.md §4); voxels outside the brain unchanged."""
    x = _arr(volume).astype(np.float32)
    out = x.copy()
    for k in range(3):
        sel = model.labels == k + 1
        z = (x[sel] - model.means[k]) / model.stds[k]
        out[sel] = means[k] + stds[k] * z
    return out


def draw_tissue_remap(
    rng: np.random.RandomState,
    means: Sequence[float],
    stds: Sequence[float],
    span: float,
    mean_shift: Sequence[float],
    std_scale: Sequence[float],
    shift: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """New class means and stds of the GMM augmentation (methods.md §4): each mean shifted by a draw from
    ``mean_shift`` times ``span``, each std scaled by a draw from ``std_scale``; a shift that would reorder the
    classes (GM brighter than WM) is drawn again, so a T1 stays a T1 (``shift``/``scale``: first draws given)."""
    means, stds = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    shift = rng.uniform(*mean_shift, size=3) if shift is None else shift
    scale = rng.uniform(*std_scale, size=3) if scale is None else scale
    for _ in range(100):  # bounded: shifts within range that keep the order always exist
        new = means + shift * span
        if np.all(np.diff(new) > 0):
            return new, stds * scale
        shift = rng.uniform(*mean_shift, size=3)
    return means, stds * scale


class RandGMMIntensityd(RandomizableTransform, MapTransform):
    """The thesis's GMM intensity augmentation (methods.md §4): fit the 3-class mixture inside ``mask_key``,
    shift each class's mean by a draw from ``mean_shift`` (in units of the image's brain intensity range) and
    scale its std by a draw from ``std_scale``, then remap every brain voxel keeping its z-score within its class.

    Draws that would reorder the classes (a GM brighter than WM) are drawn again, so a T1 stays a T1. With
    ``mean_shift=(0, 0)`` and ``std_scale=(1, 1)`` the transform is the identity.

    Args:
        keys: the images to augment (each with its own fit; the same draw for all keys).
        mask_key: the brain mask.
        mean_shift: range of each class mean's shift, a fraction of the brain's 1st-99th percentile range.
        std_scale: range of each class std's factor.
        prob: probability of applying the augmentation.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "brain_mask", mean_shift: Sequence[float] = (-0.05, 0.05),
                 std_scale: Sequence[float] = (0.9, 1.1), prob: float = 1.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mask_key, self.mean_shift, self.std_scale = mask_key, tuple(mean_shift), tuple(std_scale)
        self._shift = np.zeros(3)
        self._scale = np.ones(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._shift = self.R.uniform(*self.mean_shift, size=3)
        self._scale = self.R.uniform(*self.std_scale, size=3)

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            model = fit_tissue_model(d[key], d[self.mask_key])
            lo, hi = percentiles(_arr(d[key])[_arr(d[self.mask_key]) > 0])
            means, stds = draw_tissue_remap(self.R, model.means, model.stds, hi - lo, self.mean_shift,
                                            self.std_scale, shift=self._shift, scale=self._scale)
            out = remap_tissue_intensities(d[key], model, means, stds)
            d[key] = convert_to_dst_type(out.reshape(np.shape(d[key])), d[key])[0]  # keeps a MetaTensor's meta
        return d


class TissueModeld(MapTransform):
    """The GMM augmentation's per-volume part, for the cached training preprocessing: fit the 3-class mixture of
    ``key`` inside its brain mask once, and store the hard labels in ``labels_key`` (1, X, Y, Z) uint8 and
    ``[means, stds, span]`` in ``stats_key`` (9,), so that each random patch is remapped cheaply
    (:class:`common.transforms.RandResimulatedSlicePatchd` ``gmm_prob``).

    The brain mask is ``mask_key`` when the item gives one (e.g. the preparation chain's ``brain_mask``: a path,
    loaded on the same grid, or an array); otherwise it is computed by atlas brain extraction
    (:class:`common.transforms.AtlasBrainMaskd`, about a minute per scan).

    Args:
        key: the HR volume in [0, 1].
        mask_key: the brain mask.
        labels_key: where the tissue labels go.
        stats_key: where the class statistics go.
        atlas_kwargs: :func:`common.transforms.atlas_tissue_priors` settings for scans without a mask.
    """

    def __init__(self, key: str = "label", mask_key: str = "brain_mask", labels_key: str = "tissue",
                 stats_key: str = "tissue_stats", atlas_kwargs: dict | None = None) -> None:
        super().__init__([key])
        self.key, self.mask_key, self.labels_key, self.stats_key = key, mask_key, labels_key, stats_key
        self.atlas_kwargs = dict(atlas_kwargs or {})

    def __call__(self, data):
        d = dict(data)
        if self.mask_key not in d:
            d = AtlasBrainMaskd(self.key, mask_key=self.mask_key, prior_key=None, **self.atlas_kwargs)(d)
        elif isinstance(d[self.mask_key], str):
            d = LoadVolumed(keys=self.mask_key)(d)
        volume, mask = _arr(d[self.key]), _arr(d[self.mask_key]) > 0
        if mask.shape != volume.shape:
            raise ValueError(f"brain mask {mask.shape} and '{self.key}' {volume.shape} are not on one grid")
        model = fit_tissue_model(volume, mask)
        lo, hi = percentiles(volume[mask])
        d[self.labels_key] = torch.from_numpy(model.labels)[None]
        d[self.stats_key] = torch.tensor([*model.means, *model.stds, hi - lo], dtype=torch.float32)
        # the labels hold the brain (label > 0): the cache keeps the item's own entry, not a loaded or computed mask
        d.pop(self.mask_key)
        if self.mask_key in data:
            d[self.mask_key] = data[self.mask_key]
        return d
