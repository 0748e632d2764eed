"""Data floor: NIfTI input/output with geometry and atomic writes (gzip deflated on several cores), datalists
(inference, evaluation, training splits), covariates, the embedded sample, and dataset helpers. Imports nothing
else of ``common`` but ``common.utils``.

Each module's ``__all__`` is re-exported here (``common.data.<name>``), as MONAI's packages do.
"""

from . import covariates, datalists, dataset, io, parallel_gzip, weights
from .covariates import *  # noqa: F401,F403
from .datalists import *  # noqa: F401,F403
from .dataset import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .parallel_gzip import *  # noqa: F401,F403
from .weights import *  # noqa: F401,F403

__all__ = [
    *io.__all__, *parallel_gzip.__all__, *weights.__all__, *datalists.__all__, *dataset.__all__,
    *covariates.__all__,
]
