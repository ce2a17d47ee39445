"""Record kvpress's kept KV positions on a tiny random Llama: the fixture of tests/test_kvpress_parity.py.

Run ONCE, in its own environment (kvpress pins transformers < 5.3, which this project's lock does not
share), from the repository root::

    python3.11 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 "transformers==5.2.*" safetensors
    /tmp/kvpress-venv/bin/python scripts/kvpress_parity/make_fixture.py tests/fixtures/kvpress

It writes into that folder (offline, no Hub access needed):

- ``model/``: a tiny random Llama (3 layers, hidden 64, 4 query heads, 2 KV heads of dim 16, vocab
  256, fp32; seed 0), ``config.json`` + ``model.safetensors``;
- ``qfilters.safetensors``: random Q-Filters ``[layers, kv_heads, head_dim]`` (seed 1) in kvpress's
  (the Hub's) sign convention: kvpress scores keys by ``-<k, f>``;
- ``kept_positions.json``: the token ids of 3 random contexts (lengths 509, 446, 383: not multiples of
  4, so the budget rounding matters), and, per press, its parameters, the per-layer kept counts and
  the kept positions ``[context][layer][kv_head]`` (sorted).

Each press runs at ``compression_ratio=0.75`` (4x) in a prefill ``with press(model)``; the kept positions
are recovered by matching every key of the compressed cache to the row of the uncompressed prefill's
cache that is bit-identical to it (the press gathers rows of that cache, and the prefill itself does
not depend on the press), so nothing of kvpress's internals is hooked. Q-Filters come from the saved
tensor through a ``QFilterPress`` subclass whose ``post_init_from_model`` sets them instead of
downloading filters from the Hub.

Measured agreement with ctxzip (``tests/test_kvpress_parity.py``, matched options, mean Jaccard of
the kept sets over contexts, layers and KV heads; kvpress 0.5.5, transformers 5.2.0, torch 2.13.0
CPU here, ctxzip's own lock there): 1.0, every kept set identical, for SnapKV, StreamingLLM,
PyramidKV (the uniform fallback at beta 20 / window 64, and the pyramid at beta 3 / window 32,
whose 383-token context falls back) and Q-Filters (its filters with ``filters_convention="kvpress"``,
or negated with the default convention). The options matter: with ctxzip's default
``budget_rounding="ceil"`` (one slot more at these lengths) SnapKV and StreamingLLM agree at 0.991;
max pooling instead of avg, 0.660; pooling that lets the window's scores leak into the positions
before it, 0.989; PyramidKV without ``uniform_fallback``, 0.522 (beta 20) and 0.882 (beta 3);
with the fallback but ceil rounding, 0.997 (beta 20) and 0.877 (beta 3: at ceil's budget of 96 the
383-token context no longer falls back).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import kvpress
import torch
import transformers
from kvpress import PyramidKVPress, QFilterPress, SnapKVPress, StreamingLLMPress
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

COMPRESSION_RATIO = 0.75  # ctxzip ratio 4
LENGTHS = (509, 446, 383)
VOCAB = 256


def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=1024,
                         rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


@dataclass
class LocalQFilterPress(QFilterPress):
    """``QFilterPress`` with filters given as a tensor (kvpress's own sign convention), not from the Hub."""

    filters: torch.Tensor | None = None

    def post_init_from_model(self, model):
        self.q_filters = self.filters.to(model.dtype)


def prefill_keys(model, ids, press=None) -> list[torch.Tensor]:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [layer.keys[0] for layer in cache.layers]  # [kv_heads, n, head_dim]


def kept_positions(full: torch.Tensor, compressed: torch.Tensor) -> list[list[int]]:
    """Per KV head: the positions of ``full`` [H, n, D] whose rows ``compressed`` [H, k, D] holds."""
    heads = []
    for h in range(full.shape[0]):
        nearest = torch.cdist(compressed[h].double(), full[h].double()).argmin(dim=1)  # [k]
        if not torch.equal(full[h][nearest], compressed[h]):
            raise RuntimeError("a kept key is not bit-identical to its nearest prefill key")
        positions = sorted(nearest.tolist())
        if len(set(positions)) != len(positions):
            raise RuntimeError("two kept keys matched the same position")
        heads.append(positions)
    return heads


def main(out: Path) -> None:
    transformers.utils.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    model.save_pretrained(out / "model", safe_serialization=True)
    model = LlamaForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    config = model.config
    gen = torch.Generator().manual_seed(1)
    filters = torch.randn(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, generator=gen)
    save_file({"filters": filters}, str(out / "qfilters.safetensors"))
    filters = load_file(str(out / "qfilters.safetensors"))["filters"]
    contexts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]

    presses = {
        "snapkv": (SnapKVPress(compression_ratio=COMPRESSION_RATIO), {"window_size": 64, "kernel_size": 5}),
        "streaming_llm": (StreamingLLMPress(compression_ratio=COMPRESSION_RATIO), {"n_sink": 4}),
        "pyramidkv": (PyramidKVPress(compression_ratio=COMPRESSION_RATIO),
                      {"window_size": 64, "kernel_size": 5, "beta": 20}),
        "pyramidkv_beta3": (PyramidKVPress(compression_ratio=COMPRESSION_RATIO, window_size=32, beta=3),
                            {"window_size": 32, "kernel_size": 5, "beta": 3}),
        "qfilters": (LocalQFilterPress(compression_ratio=COMPRESSION_RATIO, filters=filters),
                     {"filters": "qfilters.safetensors (kvpress convention: score -<k, f>)"}),
    }
    for press, params in presses.values():  # the recorded parameters are the press's own
        for name, value in params.items():
            if name != "filters":
                assert getattr(press, name) == value, (name, getattr(press, name), value)

    record = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
              "transformers": transformers.__version__, "torch": torch.__version__,
              "compression_ratio": COMPRESSION_RATIO, "model": "model", "contexts": contexts, "presses": {}}
    for name, (press, params) in presses.items():
        kept, counts = [], []
        for ids in contexts:
            ids = torch.tensor([ids])
            full = prefill_keys(model, ids)
            compressed = prefill_keys(model, ids, press)
            layers = [kept_positions(f, c) for f, c in zip(full, compressed)]
            kept.append(layers)
            counts.append([len(layer[0]) for layer in layers])
        record["presses"][name] = {"press": type(press).__mro__[0 if name != "qfilters" else 1].__name__,
                                   "params": {"compression_ratio": COMPRESSION_RATIO, **params},
                                   "layer_counts": counts, "kept": kept}
        print(name, counts)
    with open(out / "kept_positions.json", "w") as f:
        json.dump(record, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/kvpress"))
