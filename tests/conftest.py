"""Test-wide settings: one thread per process (two processes of two threads each are 3-10x slower here)."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MRI_DIR = REPO.parent / "shared" / "data" / "mri"


@pytest.fixture(scope="session")
def mri_dir() -> Path:
    """The real scans of ../shared/data/mri (skips when the folder is absent)."""
    if not (MRI_DIR / "manifest.json").exists():
        pytest.skip(f"real scans not found at {MRI_DIR}")
    return MRI_DIR
