"""Networks, one module per family: the AdaGN U-Net (EDM), the NCSN++-style score network (SRMRI), and the
regression wrapper of the 2.5D baseline.

Each module's ``__all__`` is re-exported here (``common.networks.<name>``), as MONAI's packages do.
"""

from . import adagn_unet, regression, score_net
from .adagn_unet import *  # noqa: F401,F403
from .regression import *  # noqa: F401,F403
from .score_net import *  # noqa: F401,F403

__all__ = [*adagn_unet.__all__, *score_net.__all__, *regression.__all__]
