"""Helpers of the network tests: parameter counts and weights randomised past their zero initialisations."""

from __future__ import annotations

import torch


def n_params(m: torch.nn.Module) -> int:
    """Number of parameters of ``m``."""
    return sum(p.numel() for p in m.parameters())


def randomize(m: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter with N(0, std²) noise: zero-initialised layers (heads, second convolutions, attention
    projections) would otherwise hide the rest of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m
