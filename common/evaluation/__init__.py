"""Evaluation floor: metrics (PSNR, SSIM 2D/3D, LPIPS, data consistency, tissue Dice), tables, figures, the
scoring handlers of evaluate.json and the timing of a bundle's whole inference command. The benchmark command is
``python -m common.evaluation.bench`` (not imported here).

Each module's ``__all__`` is re-exported here (``common.evaluation.<name>``), as MONAI's packages do.
"""

from . import command_timing, figures, metrics, scoring, tables, tissue
from .command_timing import *  # noqa: F401,F403
from .figures import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .scoring import *  # noqa: F401,F403
from .tables import *  # noqa: F401,F403
from .tissue import *  # noqa: F401,F403

__all__ = [*metrics.__all__, *tables.__all__, *figures.__all__, *scoring.__all__, *tissue.__all__,
           *command_timing.__all__]
