"""Inferers, one module per inference family: 2.5D EDM slices, the 3D EDM volume sampler and its windowed
denoiser, the conditional DDPM volume sampler and the cascade of SR stages, SRMRI's score sampler, single-pass slice
networks with a covariate context; plus what they share (autocast, the K-sample mean/std, progress).

Each module's ``__all__`` is re-exported here (``common.inferers.<name>``), as MONAI's packages do.
"""

from . import cascade, ddpm_volume, edm_slice, edm_volume, score, single_pass, utils, windowed
from .cascade import *  # noqa: F401,F403
from .ddpm_volume import *  # noqa: F401,F403
from .edm_slice import *  # noqa: F401,F403
from .edm_volume import *  # noqa: F401,F403
from .single_pass import *  # noqa: F401,F403
from .score import *  # noqa: F401,F403
from .utils import *  # noqa: F401,F403
from .windowed import *  # noqa: F401,F403

__all__ = [*utils.__all__, *edm_slice.__all__, *windowed.__all__, *edm_volume.__all__, *score.__all__,
           *single_pass.__all__, *ddpm_volume.__all__, *cascade.__all__]
