"""Training and run-time pieces around MONAI's ignite engines: prepare-batch classes per training family (EDM,
DDPM, regression, VE score, sampler distillation), the WGAN-GP trainer, handlers, checkpoints (resume, final
weights, weight loading), the bad-input hook and the command process's start-up freeze.

Each module's ``__all__`` is re-exported here (``common.engines.<name>``), as MONAI's packages do.
The feature encoder's training command, ``python -m common.engines.feature_training``, is not imported here.
"""

from . import checkpoints, ddpm, distillation, edm, errors, handlers, regression, score, startup, wgan_gp
from .checkpoints import *  # noqa: F401,F403
from .ddpm import *  # noqa: F401,F403
from .distillation import *  # noqa: F401,F403
from .edm import *  # noqa: F401,F403
from .errors import *  # noqa: F401,F403
from .handlers import *  # noqa: F401,F403
from .regression import *  # noqa: F401,F403
from .score import *  # noqa: F401,F403
from .startup import *  # noqa: F401,F403
from .wgan_gp import *  # noqa: F401,F403

__all__ = [*errors.__all__, *handlers.__all__, *checkpoints.__all__, *ddpm.__all__, *distillation.__all__,
           *edm.__all__, *regression.__all__, *score.__all__, *startup.__all__, *wgan_gp.__all__]
