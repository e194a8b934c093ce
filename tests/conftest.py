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


@pytest.fixture(scope="session")
def tiny_sd_root(tmp_path_factory):
    """A tiny SD 1.5-shaped teacher (`teacher/`) and two prompts (`prompts.txt`), built once for the
    whole run: the tests that use it read it and write their runs elsewhere."""
    from tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(root / "teacher")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root
