from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """The shared public data sets; tests that need them skip cleanly when absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not present")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def small_checkpoint():
    """A tiny MLP checkpoint over the default metrics (window 8) for in-process trainers."""
    from tests.trainer_fixtures import small_checkpoint as make

    return make()
