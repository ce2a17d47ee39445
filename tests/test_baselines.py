"""Training-free KV baselines: exact budgets, ratio 1 == full context, real smaller KV, masking."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from ctxzip.compressors import CompressedLM, compressor_class, load_base
from ctxzip.compressors.attention import QueryCapture
from ctxzip.compressors.baselines import FullContext, FullContextConfig
from ctxzip.compressors.baselines.pyramidkv import pyramid_budgets
from ctxzip.compressors.baselines.selection import window_scores
from ctxzip.compressors.baselines.streaming_llm import sink_and_recent
from ctxzip.compressors.compat import cache_of
from ctxzip.compressors.generation import generate_from_memory

SELECTION = ("streaming_llm", "snapkv", "chunkkv", "pyramidkv")
TEXT = "The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 12


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_base("tiny-random-llama")
    return model.eval(), tokenizer


def build(name, model, **config):
    cls = compressor_class(name)
    return cls(cls.config_class(**config), model).eval()


def context(tokenizer, text=TEXT):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return ids, torch.ones_like(ids)


def greedy(compressor, tokenizer, memory, steps=8):
    clm = CompressedLM(compressor, tokenizer)
    prompt = torch.tensor([clm.prompt_ids("What is the pass key?")])
    return generate_from_memory(compressor, memory, prompt, torch.ones_like(prompt), GenerationConfig(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=2))


@pytest.mark.parametrize("name", SELECTION)
def test_ratio_one_reproduces_full_context(tiny, name):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    full = FullContext(FullContextConfig(), model).eval()
    reference = full.compress(ids, mask)
    compressor = build(name, model, ratio=1.0)
    memory = compressor.compress(ids, mask)
    assert memory.slots == reference.slots and memory.position_offset == reference.position_offset
    for key, tensor in reference.tensors.items():
        assert torch.equal(memory.tensors[key], tensor), key
    assert torch.equal(greedy(compressor, tokenizer, memory), greedy(full, tokenizer, reference))


@pytest.mark.parametrize("name", SELECTION)
@pytest.mark.parametrize("ratio", [3.0, 16.0])
def test_budget_is_exact_and_memory_is_real(tiny, name, ratio):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    n = ids.shape[1]
    budget = math.ceil(n / ratio)
    memory = build(name, model, ratio=ratio, window=8).compress(ids, mask)
    layers = model.config.num_hidden_layers
    assert memory.position_offset == [n] and memory.source_tokens == [n]
    if name == "pyramidkv":
        counts = memory.meta["layer_slots"][0]
        assert sum(counts) == layers * budget and memory.slots == max(counts)
        assert counts == sorted(counts, reverse=True)
    else:
        assert memory.slots == budget
        assert memory.tensors["key.0"].shape[2] == budget
        assert memory.nbytes == 2 * layers * budget * memory.tensors["key.0"][0, :, 0].numel() * 4
    assert memory.meta["real_slots"] == [pytest.approx(budget)]
    greedy(build(name, model, ratio=ratio), tokenizer, memory, steps=2)  # the decoder reads it


def test_kept_positions_are_gathered_from_the_full_cache(tiny):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    n = ids.shape[1]
    full = FullContext(FullContextConfig(), model).eval().compress(ids, mask)
    memory = build("streaming_llm", model, ratio=4.0, sinks=4).compress(ids, mask)
    kept = sink_and_recent(n, math.ceil(n / 4), 4)
    assert kept[:4] == [0, 1, 2, 3] and kept[-1] == n - 1
    assert torch.equal(memory.tensors["key.1"], full.tensors["key.1"][:, :, kept])
    snap = build("snapkv", model, ratio=4.0, window=8).compress(ids, mask)
    # the observation window is always kept, at the end of every head
    assert torch.equal(snap.tensors["value.0"][:, :, -8:], full.tensors["value.0"][:, :, -8:])


def test_shared_prefill_matches_separate_compression(tiny):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    for name in SELECTION:
        shared = build(name, model, ratio=2.0).compress_ratios(ids, mask, [2.0, 5.0])
        alone = build(name, model, ratio=5.0).compress(ids, mask)
        for key in alone.tensors:
            assert torch.allclose(shared[1].tensors[key], alone.tensors[key]), (name, key)


def test_one_prefill_serves_every_method_as_its_own_compression(tiny):
    """The eval runner's shared prefill (widest window, token NLL) gives each method exactly the
    memories it builds alone."""
    from ctxzip.compressors.baselines.selection import prefill_context

    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    prefill = prefill_context(model, ids, window=40, token_nll=True)
    assert len(prefill.token_nll) == ids.shape[1] and prefill.queries[0].shape[2] == 40
    for name in [*SELECTION, "selective_context", "full_context"]:
        method = build(name, model, ratio=3.0) if name != "full_context" else FullContext(FullContextConfig(), model)
        shared = method.compress_from(prefill, [3.0])[0]
        alone = method.compress(ids, mask)
        assert shared.slots == alone.slots and shared.position_offset == alone.position_offset, name
        for key in alone.tensors:
            assert torch.allclose(shared.tensors[key], alone.tensors[key], atol=1e-5), (name, key)
    narrow = prefill_context(model, ids, window=2)
    with pytest.raises(ValueError, match="window"):
        build("snapkv", model, ratio=3.0, window=8).compress_from(narrow, [3.0])
    with pytest.raises(ValueError, match="token_nll"):
        build("selective_context", model, ratio=3.0).compress_from(narrow, [3.0])


def test_window_queries_match_the_models_attention(tiny):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    window = 6
    with QueryCapture(model, window) as catcher:
        out = model(input_ids=ids, use_cache=True)
    model.config._attn_implementation = "eager"
    try:
        eager = model(input_ids=ids, output_attentions=True)
    finally:
        model.config._attn_implementation = "sdpa"
    keys = cache_of(out).layers[1].keys
    scores = window_scores(catcher.queries[1], keys, mask)
    attn = eager.attentions[1][:, :, -window:]  # [B, Hq, w, n]
    expected = attn.view(1, keys.shape[1], -1, window, ids.shape[1]).mean(dim=(2, 3))
    assert torch.allclose(scores, expected, atol=1e-5)


def test_pyramid_padding_is_never_read(tiny):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    compressor = build("pyramidkv", model, ratio=3.0, window=4)
    memory = compressor.compress(ids, mask)
    counts = memory.meta["layer_slots"][0]
    assert len(set(counts)) > 1
    corrupted = memory._replace(tensors=dict(memory.tensors))
    for layer, count in enumerate(counts):
        pad = memory.slots - count
        for part in ("key", "value"):
            t = corrupted.tensors[f"{part}.{layer}"].clone()
            t[:, :, :pad] = 1e3 * torch.randn_like(t[:, :, :pad])
            corrupted.tensors[f"{part}.{layer}"] = t
    assert torch.equal(greedy(compressor, tokenizer, memory, 4), greedy(compressor, tokenizer, corrupted, 4))
    prompt = torch.tensor([[5, 6, 7]])
    logits = []
    for m in (memory, corrupted):
        with compressor.reading(m):
            logits.append(compressor.decoder_forward(m, prompt, torch.ones_like(prompt)).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_pyramid_budgets_sum_exactly():
    for n, budget, layers in [(100, 50, 30), (2048, 128, 30), (10, 10, 4), (37, 3, 7), (5, 1, 30)]:
        counts = pyramid_budgets(n, budget, layers, 20.0)
        assert sum(counts) == layers * budget and all(1 <= c <= n for c in counts)


def test_batched_rows_of_different_lengths(tiny):
    model, tokenizer = tiny
    clm = CompressedLM(build("snapkv", model, ratio=4.0, window=4), tokenizer)
    ids, mask = clm.tokenize_context([TEXT, TEXT[:120]])
    memory = clm.compressor.compress(ids, mask)
    lengths = mask.sum(-1).tolist()
    assert memory.meta["real_slots"] == [math.ceil(n / 4) for n in lengths]
    assert memory.tensors["slot_mask"].sum(-1).tolist() == memory.meta["real_slots"]
    single = clm.compressor.compress(*clm.tokenize_context(TEXT[:120]))  # the same row alone
    assert torch.allclose(memory.tensors["key.0"][1, :, -single.slots:], single.tensors["key.0"][0], atol=1e-5)


def test_bad_ratio_is_refused(tiny):
    model, _ = tiny
    for name in SELECTION:
        with pytest.raises(ValueError, match="ratio"):
            build(name, model, ratio=0.5)


def test_selective_context_budget_and_ratio_one(tiny):
    model, tokenizer = tiny
    ids, mask = context(tokenizer)
    n = ids.shape[1]
    compressor = build("selective_context", model, ratio=1.0).use_tokenizer(tokenizer)
    full = FullContext(FullContextConfig(), model).eval()
    reference = full.compress(ids, mask)
    memory = compressor.compress(ids, mask)
    for key, tensor in reference.tensors.items():
        assert torch.equal(memory.tensors[key], tensor), key
    assert torch.equal(greedy(compressor, tokenizer, memory), greedy(full, tokenizer, reference))
    for ratio in (3.0, 16.0):
        mem = build("selective_context", model, ratio=ratio).use_tokenizer(tokenizer).compress(ids, mask)
        budget = math.ceil(n / ratio)
        assert mem.slots == budget and mem.tensors["key.0"].shape[2] == budget
        assert mem.position_offset == [budget] and mem.source_tokens == [n]


def test_selective_context_keeps_whole_informative_units():
    from ctxzip.compressors.baselines.selective_context import select_units, word_units

    pieces = ["The", " pass", "key", " is", " 4", "8", "2", "."]
    units = word_units(pieces)
    assert units == [[0], [1, 2], [3], [4, 5, 6], [7]]
    info = [float("inf"), 1.0, 1.0, 0.1, 3.0, 3.0, 3.0, 0.2]
    assert select_units(info, units, 4) == [0, 4, 5, 6]
    assert select_units(info, units, 5) == [0, 4, 5, 6, 7]  # " pass key" does not fit, "." does
    assert select_units(info, units, 7) == [0, 1, 2, 4, 5, 6, 7]


def test_pooling_keeps_the_windows_scores_out_of_the_positions_before_it():
    from ctxzip.compressors.baselines.selection import pool

    scores = torch.tensor([[[0.1, 0.2, 0.1, 0.1, 0.1, 9.0, 9.0]]])  # the last two: the observation window
    pooled = pool(scores, kernel_size=5, kind="max", window=2)
    assert pooled[0, 0, :5].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.1])  # no 9.0 leaked in
    assert pooled[0, 0, 5:].tolist() == [9.0, 9.0]
    leaky = pool(scores, kernel_size=5, kind="max")  # pooling over the window too
    assert leaky[0, 0, 3:5].tolist() == [9.0, 9.0]
