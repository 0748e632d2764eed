"""Shared code of the brain MRI super-resolution bundles: data, networks, diffusion, metrics, reports."""

__version__ = "0.1.0"
