"""Shared pytest setup. Sections: (1) Hub environment, (2) local Hub fixture; add new fixtures below."""

# =============================================================================================
# 1. Hub environment: MUST run before anything imports huggingface_hub, transformers or peft.
#    huggingface_hub reads HF_ENDPOINT, HF_HOME and friends once, when it is imported, so the
#    values below are set at import time of this conftest (pytest imports it before test modules).
# =============================================================================================
import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# hub_server.py sits beside this file; make it importable whatever pytest's import mode is.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from hub_server import LocalHub, free_port  # noqa: E402

HUB_PORT = free_port()
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"

# A throwaway HF_HOME: downloads, tree caches and token files never touch the user's own cache.
_HF_HOME = tempfile.mkdtemp(prefix="ctxzip-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ.update(
    {
        "HF_ENDPOINT": HUB_URL,  # every Hub call goes to LocalHub, never to huggingface.co
        "HF_TOKEN": "hf_dummy_token_for_tests",  # push calls need *a* token; LocalHub accepts any
        "HF_HOME": _HF_HOME,
        "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),  # would otherwise win over HF_HOME if set
        "HF_XET_CACHE": os.path.join(_HF_HOME, "xet"),
        "HF_HUB_DISABLE_XET": "1",  # hf_xet is installed; LocalHub speaks plain HTTP only
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "3",  # seconds for the metadata HEAD; LocalHub answers in ms
        "HF_HUB_OFFLINE": "0",  # LocalHub is the only reachable endpoint, so "online" is safe
    }
)
os.environ.pop("TRANSFORMERS_OFFLINE", None)  # also read by huggingface_hub as offline mode

import pytest  # noqa: E402


# =============================================================================================
# 2. Local Hub fixture
# =============================================================================================
@pytest.fixture(scope="session")
def local_hub() -> Iterator[LocalHub]:
    """A running LocalHub at HF_ENDPOINT, shared by the whole session: use unique repo names."""
    import huggingface_hub.constants

    # If something imported huggingface_hub before this conftest, it would still target huggingface.co.
    assert huggingface_hub.constants.ENDPOINT == HUB_URL, (
        f"huggingface_hub uses {huggingface_hub.constants.ENDPOINT}, not {HUB_URL}: it was imported "
        "before tests/conftest.py set HF_ENDPOINT"
    )
    with LocalHub(HUB_PORT) as hub:
        yield hub


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
