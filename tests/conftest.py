import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Presets are materialised once per test session into a private cache, never into ~/.cache.
os.environ.setdefault("CAPFILT_CACHE_DIR", str(Path(tempfile.gettempdir()) / "capfilt-test-cache"))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(8)]
