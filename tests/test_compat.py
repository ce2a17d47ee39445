"""The transformers facts ctxzip relies on (compressors/compat.py) and the attention overrides built on
AttentionInterface (compressors/attention.py): they must hold on the floor (5.17) and on the lock."""

from __future__ import annotations

import builtins
import dataclasses
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast

from ctxzip.compressors import compat
from ctxzip.compressors.attention import QueryCapture, attention_modules, block_keys, overriding_attention


def test_cache_argument_matches_this_release() -> None:
    """Written for 5.17 (``past_key_values``) and 5.24 (``cache``); a release between or after them
    must name the field one of the two ways, and the model forward must accept that name."""
    version = Version(transformers.__version__)
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert compat.CACHE_ARGUMENT in fields, f"transformers {version}: {sorted(fields)}"
    if version <= Version(compat.WRITTEN_FOR[0]):
        assert compat.CACHE_ARGUMENT == "past_key_values"
    if version >= Version(compat.WRITTEN_FOR[1]):
        assert compat.CACHE_ARGUMENT == "cache"


def test_model_calls_through_compat_raise_no_deprecation_warning(tiny) -> None:
    model, _ = tiny()
    ids = torch.randint(3, 100, (1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(input_ids=ids, use_cache=True)
        cache = compat.cache_of(out)
        model(input_ids=ids[:, :1], use_cache=True, **compat.with_cache(cache))
    assert cache.get_seq_length() == 7


def test_attn_implementation_is_readable(tiny) -> None:
    model, _ = tiny()
    assert compat.attn_implementation(model.config) in ("sdpa", "eager")


@torch.no_grad()
def test_override_without_a_module_entry_is_the_original_attention(tiny) -> None:
    model, _ = tiny()
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    before = model(input_ids=ids, attention_mask=mask).logits
    original = compat.attn_implementation(model.config)
    seen = []

    def spy(module, query, key, value, attention_mask, fallback, **kwargs):
        seen.append(query.shape)
        return fallback(module, query, key, value, attention_mask, **kwargs)

    layers = attention_modules(model)
    with overriding_attention(model, {layers[0]: spy}):
        assert compat.attn_implementation(model.config) == "ctxzip_" + original
        with overriding_attention(model, {}):  # nested: still switched, still one spy
            during = model(input_ids=ids, attention_mask=mask).logits
        assert compat.attn_implementation(model.config) == "ctxzip_" + original
    assert compat.attn_implementation(model.config) == original
    assert len(seen) == 1 and seen[0][2] == 9
    torch.testing.assert_close(during, before, rtol=0, atol=0)


@torch.no_grad()
def test_query_capture_holds_the_queries_attention_used(tiny) -> None:
    model, _ = tiny()
    ids = torch.randint(3, 100, (1, 12))
    with QueryCapture(model, 4) as capture:
        model(input_ids=ids)
    layers = attention_modules(model)
    assert sorted(capture.queries) == list(range(len(layers)))
    attn = layers[0]
    assert capture.queries[0].shape == (1, model.config.num_attention_heads, 4, attn.head_dim)
    # the first layer's queries are q_proj of the normed embeddings, rotated: recompute them
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    q = attn.q_proj(hidden).view(1, 12, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(12)[None])
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(capture.queries[0], q[:, :, -4:])


def test_block_keys_keeps_the_mask_format() -> None:
    blocked = torch.tensor([[True, False, False], [False, False, False]])
    causal = block_keys(None, blocked, q_len=2)
    assert causal.dtype == torch.bool and causal.shape == (2, 1, 2, 3)
    assert not causal[0, 0, :, 0].any() and causal[1, 0, 1].all() and not causal[1, 0, 0, 2]
    additive = torch.zeros(2, 1, 1, 3)
    out = block_keys(additive, blocked, q_len=1)
    assert out[0, 0, 0, 0] == torch.finfo(torch.float32).min and out[1].eq(0).all()


def test_missing_triton_on_a_gpu_machine_warns_once(monkeypatch) -> None:
    from ctxzip.compressors.cskv import attention

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    attention.triton_available.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        with pytest.warns(RuntimeWarning, match="PyTorch reference"):
            assert not attention.triton_available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not attention.triton_available()  # cached: no second warning
    finally:
        attention.triton_available.cache_clear()
