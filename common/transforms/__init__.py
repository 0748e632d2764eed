"""Transforms floor: degradations, grid-aligned upsampling, intensity scaling, head masks, loading/saving
transforms, 2.5D slice stacks and patches, paired patches, augmentation, and the bundles' pipelines (composed
chains a config names in one entry). Imports only ``common.data`` and ``common.utils`` below it.

Each module's ``__all__`` is re-exported here (``common.transforms.<name>``), as MONAI's packages do.
"""

from . import degrade, intensity, io, mask, patches, pipelines, slice_augment, slices, upsample
from .degrade import *  # noqa: F401,F403
from .intensity import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .mask import *  # noqa: F401,F403
from .patches import *  # noqa: F401,F403
from .pipelines import *  # noqa: F401,F403
from .slice_augment import *  # noqa: F401,F403
from .slices import *  # noqa: F401,F403
from .upsample import *  # noqa: F401,F403

__all__ = [
    *intensity.__all__,
    *mask.__all__,
    *io.__all__,
    *degrade.__all__,
    *upsample.__all__,
    *slices.__all__,
    *patches.__all__,
    *slice_augment.__all__,
    *pipelines.__all__,
]
