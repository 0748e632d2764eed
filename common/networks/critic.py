"""The PatchGAN critic of the optional WGAN-GP training of the attention U-Net with AdaDM (methods.md §4).

MONAI's :class:`monai.networks.nets.PatchDiscriminator` (the Pix2PixHD discriminator: a stride-2 convolution, then
``num_layers_d`` normalised convolutions, stride 2 but the last, then a convolution to one score map) with the
settings a WGAN-GP critic needs (Gulrajani et al. 2017, section 4): no batch normalisation, since the gradient
penalty is a per-sample quantity and batch statistics make each sample's score depend on the others; instance
normalisation (affine) by default, or layer normalisation as ``("GROUP", {"num_groups": 1})``, or none; and no
sigmoid (MONAI's final convolution is linear), the critic's output being an unbounded score. The critic returns
MONAI's list of feature maps, the last one the patch score map; :func:`common.losses.critic_score` averages it
into one score per sample.
"""

from __future__ import annotations

from monai.networks.nets import PatchDiscriminator

__all__ = ["patch_critic"]


def patch_critic(
    spatial_dims: int = 2,
    in_channels: int = 1,
    channels: int = 32,
    num_layers_d: int = 3,
    norm: str | tuple | None = ("INSTANCE", {"affine": True}),
    kernel_size: int = 4,
    last_conv_kernel_size: int | None = None,
    dropout: float = 0.0,
) -> PatchDiscriminator:
    """A :class:`monai.networks.nets.PatchDiscriminator` suited to WGAN-GP (see the module docstring).

    With the defaults (kernel 4, padding 1) an input of side ``s`` gives a score map of side
    ``s / 2**num_layers_d - 2`` (96 -> 10 with 3 layers), so the input side must be at least ``3 * 2**num_layers_d``.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: input channels: 1 for the image alone, plus the conditioning channels for a conditional
            critic (see :class:`common.engines.WGANGPTrainer`'s ``condition_critic``).
        channels: filters of the first convolution (doubled at each further layer).
        num_layers_d: normalised convolution layers after the first convolution.
        norm: normalisation of those layers; batch normalisation is refused. None: no normalisation (the
            convolutions then get a bias).
        kernel_size: kernel of the convolutions.
        last_conv_kernel_size: kernel of the final (score) convolution; None: ``kernel_size``.
        dropout: dropout probability after each convolution.
    """
    name = norm[0] if isinstance(norm, (tuple, list)) else norm
    if isinstance(name, str) and "BATCH" in name.upper():
        raise ValueError("a WGAN-GP critic must not use batch normalisation: the gradient penalty is per sample")
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        channels=channels,
        in_channels=in_channels,
        out_channels=1,
        num_layers_d=num_layers_d,
        kernel_size=kernel_size,
        norm=norm if norm is not None else "",
        bias=norm is None,
        dropout=dropout,
        last_conv_kernel_size=last_conv_kernel_size,
    )
