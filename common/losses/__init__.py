"""Training losses beyond MONAI's, for the attention U-Net with AdaDM (methods.md §4): the L1 + perceptual loss on
an offline brain-MRI feature encoder (or the thesis's RadImageNet ResNet-50 through MONAI), and the WGAN-GP critic
and generator losses with the gradient penalty (its optional adversarial training).

Each module's ``__all__`` is re-exported here (``common.losses.<name>``), as MONAI's packages do.
"""

from . import gradient_penalty, perceptual

# gathered before the star imports: after them ``gradient_penalty`` names the function, no longer its module
__all__ = [*perceptual.__all__, *gradient_penalty.__all__]

from .gradient_penalty import *  # noqa: E402,F401,F403
from .perceptual import *  # noqa: E402,F401,F403
