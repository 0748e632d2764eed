"""Diffusion machinery: EDM preconditioning and its SR denoiser, samplers with one signature, the seed DDPM's
clipped cosine schedule on MONAI's DDPM/DDIM schedulers, the VE-SDE, DPS guidance, wavelet fusion and the forward
operators A of SRMRI.

Each module's ``__all__`` is re-exported here (``common.diffusion.<name>``), as MONAI's packages do.
"""

from . import ddpm, edm, guidance, operators, samplers, vesde, wavelets
from .ddpm import *  # noqa: F401,F403
from .edm import *  # noqa: F401,F403
from .guidance import *  # noqa: F401,F403
from .operators import *  # noqa: F401,F403
from .samplers import *  # noqa: F401,F403
from .vesde import *  # noqa: F401,F403
from .wavelets import *  # noqa: F401,F403

__all__ = [*edm.__all__, *ddpm.__all__, *samplers.__all__, *vesde.__all__, *wavelets.__all__, *guidance.__all__,
           *operators.__all__]
