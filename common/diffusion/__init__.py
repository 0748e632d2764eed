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

# VE-SDE, DPS guidance and wavelet fusion (SRMRI, methods.md §3)
from .guidance import DPSEval, dps_eval, dps_step, sample_heun_dps, sample_srmri, upsample_measurement
from .vesde import (
    corrector_step,
    dsm_loss,
    get_sigmas_vesde,
    predictor_step,
    sample_pc,
    sample_sigma_vesde,
    score_to_denoiser,
    sigma_max_rule,
    tweedie,
    vesde_sigma,
)
from .wavelets import dwt2, idwt2, wavedec2, wavelet_fusion, waverec2

__all__ += [
    "DPSEval",
    "corrector_step",
    "dps_eval",
    "dps_step",
    "dsm_loss",
    "dwt2",
    "get_sigmas_vesde",
    "idwt2",
    "predictor_step",
    "sample_heun_dps",
    "sample_pc",
    "sample_sigma_vesde",
    "sample_srmri",
    "score_to_denoiser",
    "sigma_max_rule",
    "tweedie",
    "upsample_measurement",
    "vesde_sigma",
    "wavedec2",
    "wavelet_fusion",
    "waverec2",
]
