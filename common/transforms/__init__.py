"""Transforms floor: degradations, grid-aligned upsampling, intensity scaling, head masks, loading/saving
transforms, 2.5D slice stacks and patches, paired patches, augmentation (slice re-simulation, GMM), the ITK
pre-processing of real scan pairs (N4, atlas brain extraction, elastix registration), tissue segmentation, and the
bundles' pipelines (composed chains a config names in one entry). Imports only ``common.data`` and
``common.utils`` below it.

Each module's ``__all__`` is re-exported here (``common.transforms.<name>``), as MONAI's packages do.
"""

from . import (
    bias_field,
    brain_extraction,
    degrade,
    intensity,
    io,
    itk_bridge,
    mask,
    pair_preparation,
    patches,
    pipelines,
    registration,
    slice_augment,
    slices,
    tissue,
    upsample,
)
from .bias_field import *  # noqa: F401,F403
from .brain_extraction import *  # noqa: F401,F403
from .degrade import *  # noqa: F401,F403
from .intensity import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .itk_bridge import *  # noqa: F401,F403
from .mask import *  # noqa: F401,F403
from .pair_preparation import *  # noqa: F401,F403
from .patches import *  # noqa: F401,F403
from .pipelines import *  # noqa: F401,F403
from .registration import *  # noqa: F401,F403
from .slice_augment import *  # noqa: F401,F403
from .slices import *  # noqa: F401,F403
from .tissue import *  # noqa: F401,F403
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
    *itk_bridge.__all__,
    *bias_field.__all__,
    *registration.__all__,
    *brain_extraction.__all__,
    *tissue.__all__,
    *pair_preparation.__all__,
]
