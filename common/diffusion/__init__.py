"""Diffusion machinery shared by the bundles: EDM preconditioning and samplers (more modules join here)."""

from .edm import EDMPrecond, add_training_noise, edm_coefficients, sample_sigma_lognormal
from .samplers import (
    SAMPLERS,
    get_sigmas_karras,
    make_noise,
    paper_2p5d_sigmas,
    sample_euler,
    sample_heun,
    sample_paper_2p5d,
    sample_paper_3d,
)

__all__ = [
    "EDMPrecond",
    "SAMPLERS",
    "add_training_noise",
    "edm_coefficients",
    "get_sigmas_karras",
    "make_noise",
    "paper_2p5d_sigmas",
    "sample_euler",
    "sample_heun",
    "sample_paper_2p5d",
    "sample_paper_3d",
    "sample_sigma_lognormal",
]
