"""Shared pytest setup. Sections: (1) Hub environment, (2) fake Hub fixture; add new fixtures below."""

# =============================================================================================
# 1. Hub environment: MUST run before anything imports huggingface_hub, transformers or peft.
#    huggingface_hub reads HF_ENDPOINT, HF_HOME and friends once, when it is imported, so the
#    values below are set at import time of this conftest (pytest imports it before test modules).
#    The tests never reach a Hub: Hub push / pull is tested against the fake below.
# =============================================================================================
import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# fake_hub.py sits beside this file; make it importable whatever pytest's import mode is.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# A throwaway HF_HOME: downloads, tree caches and token files never touch the user's own cache.
_HF_HOME = tempfile.mkdtemp(prefix="ctxzip-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",  # any Hub call that is not faked fails at once instead of going online
        "HF_ENDPOINT": "http://127.0.0.1:9",  # and even a call that ignored it could not reach huggingface.co
        "HF_TOKEN": "hf_dummy_token_for_tests",  # never the user's own token
        "HF_HOME": _HF_HOME,
        "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),  # would otherwise win over HF_HOME if set
        "HF_XET_CACHE": os.path.join(_HF_HOME, "xet"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
)

# Under pytest-xdist the workers share the cores: each gets its share of threads (set before torch is
# imported, and inherited by the recipes the tests launch), since oversubscribed OpenMP threads spin-wait
# on each other and tiny-model ops then run many times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
from fake_hub import FakeHub  # noqa: E402  (imports huggingface_hub: after the environment above)


# =============================================================================================
# 2. Fake Hub fixture
# =============================================================================================
@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A FakeHub (tests/fake_hub.py) standing in for ``huggingface_hub.HfApi`` and
    ``huggingface_hub.snapshot_download``, where ctxzip looks them up; empty for each test."""
    import huggingface_hub

    hub = FakeHub(tmp_path / "fake-hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.HfApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


# =============================================================================================
# 3. Other fixtures (tiny models, datasets, ...) go below.
# =============================================================================================
# ctxzip's converted-model cache (the tiny model borrows the embedded tokenizer from it): keep the
# user's default so that the one-time GGUF conversion is not repeated per test session.
os.environ.setdefault("CTXZIP_HOME", str(Path.home() / ".cache" / "ctxzip"))


@pytest.fixture(scope="session")
def tiny():
    """Factory ``tiny(**overrides) -> (model, tokenizer)``: a fresh tiny random Llama each call.

    With no overrides the model equals ``compressors.load_base("tiny-random-llama")`` (seeded,
    deterministic); overrides (``hidden_size=32, head_dim=8``, ``seed=1``, ...) give other shapes.
    """
    import ctxzip.compressors as compressors
    from ctxzip.compressors.models import tiny_llama

    _, tokenizer = compressors.load_base(compressors.TINY_MODEL)

    def make(**overrides):
        model = tiny_llama(vocab_size=len(tokenizer), **overrides).eval()
        return model, tokenizer

    return make


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny) -> Path:
    """The tiny random Llama and its tokenizer as a local model folder, for recipes launched in a subprocess (they
    load it with from_pretrained, as real models)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one intra-op thread: tiny-model ops are far too small to gain from threads,
    and on a busy 2-core machine the thread hand-offs make them ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
