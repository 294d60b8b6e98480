"""Shared test fixtures: the repository root on sys.path and the committed sample's location."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests: the same examples on every run (CI must not flake) and no per-example
# deadline (this 2-core machine is noisy). HYPOTHESIS_PROFILE=explore searches afresh.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLE = REPO / "data" / "sample"

# The notebooks (run under nbval) and `make notebooks` in the tests write their figures here,
# not into the committed figures/ (some, like training times, differ on every run).
FIGURES_TMP = tempfile.TemporaryDirectory(prefix="vprlib-test-figures-")
os.environ.setdefault("VPRLIB_FIGURES", FIGURES_TMP.name)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The committed sample data (GSV-Cities/ and benchmarks/)."""
    if not (SAMPLE / "GSV-Cities" / "Dataframes").is_dir():
        pytest.fail(f"sample data missing under {SAMPLE}: run `make sample-data`")
    return SAMPLE


@pytest.fixture(scope="session")
def gsv_root(sample_root) -> Path:
    return sample_root / "GSV-Cities"


@pytest.fixture(scope="session")
def bench_root(sample_root) -> Path:
    return sample_root / "benchmarks"


@pytest.fixture
def hub_dir(tmp_path):
    """A temporary torch hub cache, so tests never touch (or download into) the real one."""
    import torch

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)
