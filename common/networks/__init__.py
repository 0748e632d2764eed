"""Networks, one module per family: the AdaGN U-Net (EDM), the NCSN++-style score network (SRMRI), the
regression wrapper of the 2.5D baseline, the AdaDM residual block and the attention residual U-Net with covariate
cross-attention (3T->7T thesis), the WGAN-GP patch critic, and MONAI's DiffusionModelUNet with a single-tensor
call for the concat-conditioned DDPM.

Each module's ``__all__`` is re-exported here (``common.networks.<name>``), as MONAI's packages do.
"""

from . import adadm, adagn_unet, attention_unet, critic, diffusion_unet, regression, score_net
from .adadm import *  # noqa: F401,F403
from .adagn_unet import *  # noqa: F401,F403
from .attention_unet import *  # noqa: F401,F403
from .critic import *  # noqa: F401,F403
from .diffusion_unet import *  # noqa: F401,F403
from .regression import *  # noqa: F401,F403
from .score_net import *  # noqa: F401,F403

__all__ = [*adagn_unet.__all__, *score_net.__all__, *regression.__all__, *adadm.__all__, *attention_unet.__all__,
           *critic.__all__, *diffusion_unet.__all__]
