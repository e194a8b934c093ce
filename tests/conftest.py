import os

import pytest

# Offline by default: a hub id must fail fast, never hang on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The thread count `ddil` itself would pick (1 on 2 cores), so the suite needs no OMP_NUM_THREADS.
from ddil_cli.cli.common import default_threads, set_threads  # noqa: E402

set_threads(default_threads())


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("DDIL_CACHE", str(cache / "ddil"))
