"""Shared fixtures.

- `tiny_model_dir`: a tiny random Llama built and pulled (exported with
  Optimum through streamgen's own pipeline) once per test session.
- `real_model_dir`: the default model, pulled once into the cache
  ($STREAMGEN_HOME or ~/.cache/streamgen) and reused across sessions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama  # noqa: E402

from streamgen.engine.device import Device  # noqa: E402
from streamgen.engine.loader import LoadedModel, load_model  # noqa: E402
from streamgen.models.cache import DEFAULT_MODEL, CacheLayout, streamgen_home  # noqa: E402
from streamgen.models.progress import StageProgress  # noqa: E402
from streamgen.models.pull import pull  # noqa: E402

CPU = Device("cpu")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> CacheLayout:
    return CacheLayout(tmp_path_factory.mktemp("streamgen-home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_hf_dir: Path, tiny_cache: CacheLayout) -> Path:
    return pull(str(tiny_hf_dir), "none", tiny_cache, StageProgress(0, open(os.devnull, "w")))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, CPU)


@pytest.fixture(scope="session")
def real_cache() -> CacheLayout:
    return CacheLayout(streamgen_home())


@pytest.fixture(scope="session")
def real_model_dir(real_cache: CacheLayout) -> Path:
    return pull(DEFAULT_MODEL, "none", real_cache)


@pytest.fixture(scope="session")
def real_model(real_model_dir: Path) -> LoadedModel:
    return load_model(real_model_dir, CPU)
