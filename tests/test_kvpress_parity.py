"""Kept KV positions of the selection baselines against kvpress 0.5.5's presses (issue #11).

The fixture (``tests/fixtures/kvpress``: a tiny random Llama, Q-Filters, 3 random contexts of 509,
446 and 383 tokens, and kvpress's kept positions per layer and KV head at ``compression_ratio=0.75``)
was generated once, in a separate environment with kvpress, by ``scripts/kvpress_parity/make_fixture.py``.
Here the same model (loaded offline from the fixture) is compressed at ratio 4 by ctxzip's baselines
with kvpress's options (average pooling, kvpress's budget rounding, the same window, kernel, sinks,
beta and filters); the kept sets must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from ctxzip.compressors import compressor_class
from ctxzip.compressors.baselines.calibration import save_artifact
from ctxzip.compressors.baselines.selection import prefill_context

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress"
RATIO = 4.0  # kvpress compression_ratio 0.75

# ctxzip options that reproduce each recorded press
MATCHED = {
    "snapkv": ("snapkv", dict(window=64, kernel_size=5, pooling="avg", budget_rounding="kvpress")),
    "streaming_llm": ("streaming_llm", dict(sinks=4, budget_rounding="kvpress")),
    "pyramidkv": ("pyramidkv", dict(window=64, kernel_size=5, pooling="avg", beta=20, uniform_fallback=True,
                                    budget_rounding="kvpress")),
    "pyramidkv_beta3": ("pyramidkv", dict(window=32, kernel_size=5, pooling="avg", beta=3, uniform_fallback=True,
                                          budget_rounding="kvpress")),
}


@pytest.fixture(scope="module")
def recorded():
    with open(FIXTURE / "kept_positions.json") as f:
        record = json.load(f)
    model = LlamaForCausalLM.from_pretrained(FIXTURE / record["model"], dtype=torch.float32,
                                             local_files_only=True).eval()
    # one prefill per context (observation window 64, the widest used) serves every method
    prefills = [prefill_context(model, torch.tensor([ids]), window=64) for ids in record["contexts"]]
    return record, model, prefills


def build(name, model, **config):
    cls = compressor_class(name)
    return cls(cls.config_class(ratio=RATIO, **config), model).eval()


def kept_positions(compressor, model, prefill):
    """Per layer, per KV head: the sorted context positions whose keys the memory holds."""
    full = prefill.kv
    memory = compressor.compress_from(prefill, [RATIO])[0]
    counts = memory.meta.get("layer_slots", [[memory.slots] * model.config.num_hidden_layers])[0]
    layers = []
    for layer, count in enumerate(counts):
        keys, prefill = memory.tensors[f"key.{layer}"][0, :, memory.slots - count:], full[f"key.{layer}"][0]
        heads = []
        for h in range(keys.shape[0]):
            nearest = torch.cdist(keys[h].double(), prefill[h].double()).argmin(dim=1)
            assert torch.equal(prefill[h][nearest], keys[h])  # gathered rows of the full cache
            heads.append(sorted(nearest.tolist()))
        layers.append(heads)
    return layers


def jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def compare(compressor, recorded, press):
    """(mean Jaccard over contexts, layers and heads, whether every kept set is identical)."""
    record, model, prefills = recorded
    scores, same = [], True
    for prefill, expected in zip(prefills, record["presses"][press]["kept"]):
        ours = kept_positions(compressor, model, prefill)
        assert [len(layer[0]) for layer in ours] == [len(layer[0]) for layer in expected]  # budgets
        for ours_layer, layer in zip(ours, expected):
            for ours_head, head in zip(ours_layer, layer):
                scores.append(jaccard(ours_head, head))
                same &= ours_head == head
    return sum(scores) / len(scores), same


@pytest.mark.parametrize("press", sorted(MATCHED))
def test_kept_positions_match_kvpress(recorded, press):
    name, options = MATCHED[press]
    mean, same = compare(build(name, recorded[1], **options), recorded, press)
    assert same, f"{press}: mean Jaccard {mean:.4f} against kvpress"


@pytest.mark.parametrize("convention", ["kvpress", "ctxzip"])
def test_qfilters_match_kvpress_in_either_filter_convention(recorded, tmp_path, convention):
    """kvpress scores ``-<k, f>``; ctxzip's own filters ``u = -f`` score ``+<k, u>``: the same ranking."""
    model = recorded[1]
    filters = load_file(str(FIXTURE / "qfilters.safetensors"))["filters"]
    if convention == "ctxzip":
        filters = -filters
    path = save_artifact(tmp_path / f"{convention}.safetensors", {"filters": filters}, "qfilters", model, {})
    compressor = build("qfilters", model, filters_path=str(path), filters_convention=convention,
                       budget_rounding="kvpress")
    mean, same = compare(compressor, recorded, "qfilters")
    assert same, f"qfilters ({convention} convention): mean Jaccard {mean:.4f} against kvpress"


def test_default_ceil_budget_keeps_one_more_slot_than_kvpress(recorded):
    record, model, _ = recorded
    ids = torch.tensor([record["contexts"][0]])  # 509 tokens: ceil(509 / 4) = 128, int(509 * 0.25) = 127
    assert build("snapkv", model, window=64).compress(ids).slots == 128
    assert build("snapkv", model, window=64, budget_rounding="kvpress").compress(ids).slots == 127


@pytest.mark.parametrize("name", ["snapkv", "streaming_llm", "chunkkv", "pyramidkv", "qfilters"])
def test_every_selection_config_takes_budget_rounding(recorded, tmp_path, name):
    record, model, prefills = recorded
    options = dict(window=8) if name != "qfilters" else dict(filters_path=str(save_artifact(
        tmp_path / "f.safetensors", {"filters": load_file(str(FIXTURE / "qfilters.safetensors"))["filters"]},
        "qfilters", model, {})))
    with pytest.raises(ValueError, match="budget_rounding"):
        build(name, model, budget_rounding="floor", **options)
    slots = [build(name, model, budget_rounding=rounding, **options).compress_from(prefills[0], [RATIO])[0]
             .meta["real_slots"][0] for rounding in ("ceil", "kvpress")]
    assert slots == [128, 127]  # 509 tokens at ratio 4
