"""The perceptual term of the attention U-Net with AdaDM (methods.md §4): ``L = L1 + λ_perc·perceptual``, λ 1e-3 to
5e-3, with an LPIPS-style feature distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric", arXiv:1801.03924, eq. 1 with unit weights):

    d(x, y) = 1/S · Σ_s 1/(H_s W_s) · Σ_{h,w} ‖f̂_s(x)_{hw} − f̂_s(y)_{hw}‖²,  f̂ = f / ‖f‖ over channels,

i.e. per stage ``s`` the feature vector at each position is unit-normalised across channels, the squared distance
of the two unit vectors (in [0, 4]) is averaged over positions, and the stages are averaged (not summed, as LPIPS
does: the mean keeps the value on the [0, 4] scale of MONAI's one-layer RadImageNet distance, so the thesis's λ
carries over).

The thesis took its features from RadImageNet's ResNet-50 (MONAI's :class:`monai.losses.PerceptualLoss`), whose
weights torch.hub downloads at run time: not possible offline. ``feature_network="brain"`` (the default) uses
:class:`BrainFeatureEncoder` instead, a small 2D encoder trained here on brain MRI slices by
``python -m common.engines.feature_training`` (its weights ship with the bundle); ``"radimagenet_resnet50"``
keeps the thesis's path for machines where the hub cache holds those weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import Tensor, nn

__all__ = [
    "BrainFeatureEncoder", "lpips_distance", "SlicePerceptualLoss", "L1PerceptualLoss", "FEATURE_TRAINING_COMMAND",
]

# how the "brain" weights are made (named in the error raised when they are missing)
FEATURE_TRAINING_COMMAND = (
    "python -m common.engines.feature_training --data <folder of HR NIfTI> --datalist <splits.json> "
    "--out <weights .pt> --minutes 12"
)

_HUB_REPO = "Project-MONAI/perceptual-models:main"
_RADIMAGENET_FILE = "RadImageNet-ResNet50_notop.pth"


class BrainFeatureEncoder(nn.Module):
    """A small convolutional encoder whose stage outputs are the perceptual features of brain MRI slices.

    Each stage is two ``conv3 -> GroupNorm -> SiLU`` layers, the first of every stage after the first with stride 2,
    so stage ``s`` sees the slice at 1/2^s resolution (the default: 32 channels at full, 64 at 1/2 and 128 at 1/4
    resolution, about 0.29 M parameters). Inputs are 1-channel slices on the [0, 1] scale of the bundles' data path
    (each volume scaled by its 1st/99th percentiles, methods.md §0), the scale it is trained on.

    Args:
        spatial_dims: 2 for slices (the trained weights are 2D).
        in_channels: input channels.
        channels: output channels of each stage.
        norm_groups: GroupNorm groups (at most the channel count of a stage).
    """

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128), norm_groups: int = 8
    ) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.GROUP]
        stages = []
        c_in = int(in_channels)
        for s, c in enumerate(int(c) for c in channels):
            layers: list[nn.Module] = []
            for k in range(2):
                stride = 2 if s > 0 and k == 0 else 1
                layers += [conv(c_in, c, 3, stride=stride, padding=1), norm(min(norm_groups, c), c), nn.SiLU()]
                c_in = c
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(int(c) for c in channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The output of every stage, full resolution first.

        Args:
            x: slices (B, in_channels, H, W) on the [0, 1] scale.
        """
        features: list[Tensor] = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise the feature vector at each position across channels (LPIPS's ``normalize_tensor``)."""
    return f / torch.sqrt((f * f).sum(dim=1, keepdim=True) + eps)


def lpips_distance(feats_x: Sequence[Tensor], feats_y: Sequence[Tensor]) -> Tensor:
    """Per-sample LPIPS-style distance (B,) of two lists of stage features: the mean over stages of the positional
    mean of ``‖unit(fx) − unit(fy)‖²`` (each term in [0, 4])."""
    per_stage = [((_unit(fx) - _unit(fy)) ** 2).sum(1).flatten(1).mean(1) for fx, fy in zip(feats_x, feats_y)]
    return torch.stack(per_stage, 0).mean(0)


def _radimagenet_loss(cache_dir: str | None) -> nn.Module:
    """MONAI's PerceptualLoss on RadImageNet ResNet-50 features, or one clear error when the hub cannot give them."""
    from monai.losses import PerceptualLoss

    try:
        return PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50", cache_dir=cache_dir)
    except Exception as err:  # URLError/HTTPError offline, a missing hubconf or weight file, huggingface_hub errors
        hub_dir = cache_dir or torch.hub.get_dir()
        raise RuntimeError(
            "RadImageNet ResNet-50 weights are downloaded from the hub at run time (torch.hub repository "
            f"{_HUB_REPO}, weights {_RADIMAGENET_FILE} from Hugging Face MONAI/checkpoints) and are not available "
            f"offline ({type(err).__name__}: {err}). To make them available, on a machine with internet run "
            f"`python -c \"import torch; torch.hub.load('{_HUB_REPO}', 'radimagenet_resnet50', trust_repo=True)\"`, "
            f"then copy its torch hub cache (torch.hub.get_dir(): the folder Project-MONAI_perceptual-models_main "
            f"and the file {_RADIMAGENET_FILE}) into this machine's torch hub cache dir {hub_dir} (or set "
            "TORCH_HOME, or pass cache_dir=); the hub repository also needs the huggingface_hub package. "
            "Otherwise use feature_network='brain' (weights trained here, offline)."
        ) from err


class SlicePerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance of 2D slices on a frozen feature network; gradients flow to the inputs only.

    Each input channel is taken as one slice (channels are folded into the batch), so (B, C, H, W) stacks of
    neighbouring slices work too; RadImageNet's 3-channel input is made by MONAI, which repeats a 1-channel slice.
    The distance is computed in float32 with autocast off (under bf16 autocast the unit-normalisation and the
    small squared differences would lose their digits). The feature network stays in eval mode and follows the
    inputs' device.

    Args:
        feature_network: ``"brain"`` (:class:`BrainFeatureEncoder` with the weights in ``weights_path``) or
            ``"radimagenet_resnet50"`` (the thesis's features through :class:`monai.losses.PerceptualLoss`; their
            weights come from the torch hub cache, and a clear error says how to fill it when they cannot be had).
        weights_path: state_dict file of the brain encoder (required for ``"brain"``).
        signed: inputs are on the network's [-1, 1] scale (``x_signed = 2x − 1``) and are mapped back to [0, 1],
            the scale both feature networks expect; False: inputs are already on [0, 1].
        reduction: ``"mean"`` over the batch (a scalar) or ``"none"`` (one distance per sample and channel,
            (B, C)).
        encoder_kwargs: arguments of :class:`BrainFeatureEncoder` matching the saved weights.
        cache_dir: torch hub cache dir for ``"radimagenet_resnet50"`` (None: ``torch.hub.get_dir()``).
    """

    def __init__(
        self,
        feature_network: str = "brain",
        weights_path: str | os.PathLike | None = None,
        signed: bool = True,
        reduction: str = "mean",
        encoder_kwargs: dict | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.feature_network, self.signed, self.reduction = str(feature_network).lower(), bool(signed), reduction
        if self.feature_network == "brain":
            self.net: nn.Module = self._brain_encoder(weights_path, encoder_kwargs or {})
        elif self.feature_network == "radimagenet_resnet50":
            self.net = _radimagenet_loss(cache_dir)
        else:
            raise ValueError(f"feature_network must be 'brain' or 'radimagenet_resnet50', got {feature_network!r}")
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _brain_encoder(weights_path: str | os.PathLike | None, encoder_kwargs: dict) -> BrainFeatureEncoder:
        if weights_path is None or not Path(weights_path).is_file():
            where = "no weights_path given" if weights_path is None else f"weights file not found: {weights_path}"
            raise FileNotFoundError(
                f"SlicePerceptualLoss(feature_network='brain'): {where}. The brain feature encoder's state_dict is "
                f"made by `{FEATURE_TRAINING_COMMAND}` (or use perceptual_weight=0 for the plain L1 loss)."
            )
        encoder = BrainFeatureEncoder(**encoder_kwargs)
        state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as err:
            raise RuntimeError(f"{weights_path}: not a BrainFeatureEncoder state_dict for {encoder_kwargs} ({err})") \
                from err
        return encoder

    def train(self, mode: bool = True) -> SlicePerceptualLoss:
        """Frozen features: the feature network stays in eval mode whatever the trainer asks."""
        super().train(mode)
        self.net.eval()
        return self

    def _slices(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B·C, 1, H, W) float32 on the [0, 1] scale."""
        if x.ndim != 4:
            raise ValueError(f"expected 2D slices (B, C, H, W), got shape {tuple(x.shape)}")
        x = x.float().reshape(-1, 1, *x.shape[2:])
        return (x + 1.0) * 0.5 if self.signed else x

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The perceptual distance of ``input`` (e.g. the SR slice) to ``target`` (the HR slice).

        Args:
            input: (B, C, H, W) slices; gradients flow back to it.
            target: (B, C, H, W) slices of the same shape (no gradient is taken through them).
        """
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape")
        b, c = input.shape[:2]
        param = next(self.net.parameters(), None)
        if param is not None and param.device != input.device:
            self.net.to(input.device)
        with torch.autocast(device_type=input.device.type, enabled=False):
            x, y = self._slices(input), self._slices(target.detach())
            if self.feature_network == "brain":
                with torch.no_grad():
                    feats_y = self.net(y)
                d = lpips_distance(self.net(x), feats_y)
            else:
                # MONAI's loss: per-sample maps averaged to its scalar; call its similarity for per-sample values
                d = self.net.perceptual_function(x, y).flatten(1).mean(1)
        d = d.reshape(b, c)
        return d.mean() if self.reduction == "mean" else d


class L1PerceptualLoss(nn.Module):
    """``L1(pred, target) + perceptual_weight · SlicePerceptualLoss(pred, target)``, the training loss of the
    attention U-Net with AdaDM (methods.md §4); usable as a MONAI ``SupervisedTrainer``'s ``loss_function``.

    Args:
        perceptual_weight: λ_perc (the thesis: 1e-3 to 5e-3); 0 gives the plain L1 loss and builds no feature
            network at all (no weights file needed).
        feature_network: see :class:`SlicePerceptualLoss`.
        weights_path: state_dict of the brain encoder (see :class:`SlicePerceptualLoss`).
        signed: inputs on the network's [-1, 1] scale (mapped back to [0, 1] for the feature network only; the
            L1 term is taken on the inputs as given).
        cache_dir: torch hub cache dir for ``"radimagenet_resnet50"``.
        encoder_kwargs: arguments of :class:`BrainFeatureEncoder` matching the saved weights.
    """

    def __init__(
        self,
        perceptual_weight: float = 2e-3,
        feature_network: str = "brain",
        weights_path: str | os.PathLike | None = None,
        signed: bool = True,
        cache_dir: str | None = None,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.perceptual_weight = float(perceptual_weight)
        if self.perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {perceptual_weight}")
        self.perceptual = (
            SlicePerceptualLoss(feature_network, weights_path, signed, "mean", encoder_kwargs, cache_dir)
            if self.perceptual_weight > 0 else None
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss (a float32 scalar).

        Args:
            input: the prediction (B, C, H, W).
            target: the reference of the same shape.
        """
        loss = torch.nn.functional.l1_loss(input.float(), target.float())
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(input, target)
        return loss
