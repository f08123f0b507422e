"""Shared fixtures: small synthetic cohorts of real SVS files, written once per test session."""

from __future__ import annotations

import pytest

from slidemil.synthetic import synth


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """6 real SVS slides (2048 px at 0.5 µm/px), 3 classes, several slides per patient.

    Returns the output folder; ``folder / "cohort.csv"`` is the cohort, ``folder / "truth"``
    the ground truth. Read-only for tests: copy before changing anything.
    """
    out = tmp_path_factory.mktemp("small_cohort")
    synth(out, slides=6, classes=3, size=2048, seed=7, quiet=True)
    return out


@pytest.fixture(scope="session")
def mixed_mpp_cohort(tmp_path_factory):
    """4 slides at 0.25 and 0.5 µm/px (same physical size), 2 classes."""
    out = tmp_path_factory.mktemp("mixed_mpp_cohort")
    synth(out, slides=4, classes=2, size=1536, mpp=[0.25, 0.5], seed=3, quiet=True)
    return out


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(request):
    """A module that sets ``TORCH_THREADS = n`` runs torch with n threads: CI machines are small
    and shared, and oversubscribed threads make small models several times slower."""
    threads = getattr(request.module, "TORCH_THREADS", None)
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)
