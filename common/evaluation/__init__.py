"""Evaluation floor: metrics (PSNR, SSIM 2D/3D, LPIPS, data consistency, tissue Dice), tables, figures and the
scoring handlers of evaluate.json. The benchmark command is ``python -m common.evaluation.bench`` (not imported here).

Each module's ``__all__`` is re-exported here (``common.evaluation.<name>``), as MONAI's packages do.
"""

from . import figures, metrics, scoring, tables, tissue
from .figures import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .scoring import *  # noqa: F401,F403
from .tables import *  # noqa: F401,F403
from .tissue import *  # noqa: F401,F403

__all__ = [*metrics.__all__, *tables.__all__, *figures.__all__, *scoring.__all__, *tissue.__all__]
