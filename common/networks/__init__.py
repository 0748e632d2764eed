"""Networks of the bundles, one module per family."""

from .adagn_unet import PAPER_CONFIGS, AdaGNUNet, adagn_unet_paper_2p5d, adagn_unet_paper_3d

__all__ = ["AdaGNUNet", "PAPER_CONFIGS", "adagn_unet_paper_2p5d", "adagn_unet_paper_3d"]
