"""LCIRC / QD-LCIRC on the tiny model: zero gates are the base model, the recurrence built piece by piece is the
recurrence built at once, the query changes a QD memory and never an LCIRC one, truncated BPTT cuts gradients
where it says, and bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch

from ctxzip.compressors import (
    BaseModelMismatchError,
    CompressedLM,
    LCIRCCompressor,
    LCIRCConfig,
    QDLCIRCCompressor,
    load_base,
)
from ctxzip.compressors.hub import init_from_export, load_compressor
from ctxzip.compressors.models import TINY_MODEL, tiny_llama
from ctxzip.compressors.perceiver import CrossAttention, PerceiverResampler

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 8
SMALL = dict(num_latents=4, segment_length=16, perceiver_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(TINY_MODEL)[1]


def build(tokenizer, cls=LCIRCCompressor, seed: int = 0, **config) -> CompressedLM:
    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).eval()
    return CompressedLM(cls(LCIRCConfig(**{**SMALL, **config}), model).eval(), tokenizer)


def test_zero_gates_are_exactly_the_base_model(tokenizer) -> None:
    clm = build(tokenizer)
    reference = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).eval()
    reference.load_state_dict(clm.model.state_dict())
    memory = clm.compress(CONTEXT)
    ids = torch.tensor([clm.prompt_ids("What is the pass key?")])
    with torch.no_grad(), clm.compressor.reading(memory):
        read = clm.model(ids).logits
    assert torch.equal(read, reference(ids).logits)
    # and the blocks do act once a gate opens
    with torch.no_grad():
        clm.compressor.blocks[0].attn_gate.fill_(0.5)
        with clm.compressor.reading(memory):
            assert not torch.allclose(clm.model(ids).logits, read)


def test_default_blocks_every_third_layer_and_the_last(tokenizer) -> None:
    clm = build(tokenizer)
    assert clm.compressor.xattn_layers == [0, 1]  # the tiny model has two layers
    config = LCIRCConfig(xattn_every=3)
    assert sorted(set([*range(0, 30, config.xattn_every), 29])) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    with pytest.raises(ValueError, match="xattn_layers"):
        build(tokenizer, xattn_layers=[5])


@pytest.mark.parametrize("cls", [LCIRCCompressor, QDLCIRCCompressor])
def test_memory_built_segment_by_segment_equals_the_memory_built_at_once(tokenizer, cls) -> None:
    clm = build(tokenizer, cls, gate_init=0.5)
    ids, mask = clm.tokenize_context(CONTEXT)
    prefix = clm.compressor.template_tokens
    query = torch.tensor([clm.layout.encode("What is the pass key?")])
    with torch.no_grad():
        whole = clm.compressor.compress(ids, mask, query_ids=query)
        first = clm.compressor.compress(ids[:, :prefix + 16], query_ids=query)
        second = clm.compressor.extend(first, ids[:, prefix + 16:prefix + 48], query_ids=query)
        pieces = clm.compressor.extend(second, ids[:, prefix + 48:], query_ids=query)  # a partial last segment
    segments = -(-(ids.shape[1] - prefix) // 16)
    assert whole.slots == segments * 4 == pieces.slots
    torch.testing.assert_close(pieces.tensors["latents"], whole.tensors["latents"])
    assert pieces.source_tokens == whole.source_tokens and pieces.ratio == pytest.approx(whole.ratio)
    assert pieces.meta["prefix_ids"] == clm.layout.prefix_ids


def test_query_changes_a_qd_memory_and_never_an_lcirc_one(tokenizer) -> None:
    lcirc = build(tokenizer, gate_init=0.5)
    assert torch.equal(lcirc.compress(CONTEXT, query="the key?").tensors["latents"],
                       lcirc.compress(CONTEXT, query="the colour?").tensors["latents"])
    qd = build(tokenizer, QDLCIRCCompressor, gate_init=0.5)
    key, colour = (qd.compress(CONTEXT, query=q).tensors["latents"] for q in ("the key?", "the colour?"))
    assert not torch.allclose(key, colour)
    # without a query, the documented fallback: the mixer is skipped, what LCIRC makes with the same weights
    qd_weights = {k: v for k, v in qd.compressor.own_state_dict().items() if not k.startswith("mixer.")}
    lcirc.compressor.load_state_dict(qd_weights, strict=False)
    torch.testing.assert_close(qd.compress(CONTEXT).tensors["latents"], lcirc.compress(CONTEXT).tensors["latents"])
    # a fresh QD-LCIRC (mixer gates at zero) is the LCIRC it starts from, whatever the query
    fresh = build(tokenizer, QDLCIRCCompressor)
    assert torch.equal(fresh.compress(CONTEXT, query="the key?").tensors["latents"],
                       fresh.compress(CONTEXT).tensors["latents"])


def test_an_empty_query_row_is_not_mixed(tokenizer) -> None:
    # the collator gives a row without a question an all-masked query: that row must get the query-agnostic memory
    qd = build(tokenizer, QDLCIRCCompressor, gate_init=0.5)
    ids, mask = qd.tokenize_context(CONTEXT)
    asked = torch.tensor([qd.layout.encode("the key?")] * 2)
    query_mask = torch.tensor([[1] * asked.shape[1], [0] * asked.shape[1]])
    with torch.no_grad():
        both = qd.compressor.compress(ids.expand(2, -1), mask.expand(2, -1), query_ids=asked, query_mask=query_mask)
        alone = qd.compressor.compress(ids, mask)
        with_query = qd.compressor.compress(ids, mask, query_ids=asked[:1])
    torch.testing.assert_close(both.tensors["latents"][1:], alone.tensors["latents"])
    torch.testing.assert_close(both.tensors["latents"][:1], with_query.tensors["latents"])


def test_block_keys_values_are_computed_once_per_generation(tokenizer, monkeypatch) -> None:
    clm = build(tokenizer, gate_init=0.5)
    memory = clm.compress(CONTEXT)
    calls = []
    original = CrossAttention.keys_values
    monkeypatch.setattr(CrossAttention, "keys_values", lambda self, inputs: calls.append(1) or original(self, inputs))
    clm.generate("What is the pass key?", memory=memory, max_new_tokens=6)
    assert len(calls) == len(clm.compressor.blocks)  # once per block, not once per decoded token
    calls.clear()
    clm.answer_many(memory, ["What is the pass key?", "What colour is the sky?"], max_new_tokens=3)
    assert len(calls) == len(clm.compressor.blocks)  # one batch of prompts: once


def grads_of_initial_latents(tokenizer, grad_segments: int, at: str = "last") -> torch.Tensor | None:
    clm = build(tokenizer, gate_init=0.5, grad_segments=grad_segments, grad_segments_at=at).compressor.train()
    ids, mask = CompressedLM(clm, tokenizer).tokenize_context(CONTEXT)
    target = torch.tensor([clm.layout.encode(" and so on")])
    out = clm(context_ids=ids, context_mask=mask, input_ids=target, attention_mask=torch.ones_like(target),
              labels=target)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert clm.blocks[0].attn_gate.grad is not None and clm.resampler.layers[0][0].to_q.weight.grad.abs().sum() > 0
    return clm.initial_latents.latents.grad


def test_truncated_bptt_keeps_gradients_only_through_the_chosen_steps(tokenizer) -> None:
    # h(0) feeds only the first step: it gets a gradient when every step keeps its own, none under depth 1
    full = grads_of_initial_latents(tokenizer, 0)
    assert full is not None and full.abs().sum() > 0
    assert grads_of_initial_latents(tokenizer, 1) is None


def test_perceiver_refuses_a_segment_longer_than_its_position_table() -> None:
    resampler = PerceiverResampler(width=8, num_layers=1, heads=2, head_dim=4, inner=16, max_inputs=5)
    with pytest.raises(ValueError, match="longer than the position table"):
        resampler(torch.zeros(1, 2, 8), torch.zeros(1, 6, 8))


def test_cross_attention_rows_with_nothing_to_read_get_zeros_and_finite_gradients() -> None:
    attention = CrossAttention(width=8, heads=2, head_dim=4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    inputs = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = attention(x, inputs, mask)
    assert torch.equal(out[1], torch.zeros(3, 8)) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # the padded inputs are not read
    changed = inputs.clone()
    changed[0, 2:] = 100.0
    torch.testing.assert_close(attention(x, changed, mask)[0], out[0])


def test_qd_lcirc_starts_from_an_lcirc_export_and_exports_refuse_another_width(tokenizer, tmp_path) -> None:
    lcirc = build(tokenizer, gate_init=0.3, seed=1)
    folder = lcirc.save_pretrained(tmp_path / "lcirc")
    qd = build(tokenizer, QDLCIRCCompressor, seed=2)
    fresh = init_from_export(qd.compressor, folder)
    assert fresh and all(name.startswith("mixer.") for name in fresh)
    for name, tensor in lcirc.compressor.own_state_dict().items():
        assert torch.equal(qd.compressor.own_state_dict()[name], tensor), name
    wider = tiny_llama(vocab_size=len(tokenizer), hidden_size=96)
    with pytest.raises(BaseModelMismatchError, match="hidden_size"):
        load_compressor(folder, model=wider, tokenizer=tokenizer)


def test_an_export_reloads_and_generates_identically(tokenizer, tmp_path) -> None:
    clm = build(tokenizer, QDLCIRCCompressor, gate_init=0.5)
    question = "What is the pass key?"
    expected = clm.generate(question, memory=clm.compress(CONTEXT, query=question), max_new_tokens=6)
    folder = clm.save_pretrained(tmp_path / "qd")
    compressor, _ = load_compressor(folder, model=tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2),
                                    tokenizer=tokenizer)
    assert isinstance(compressor, QDLCIRCCompressor)
    again = CompressedLM(compressor, tokenizer)
    assert again.generate(question, memory=again.compress(CONTEXT, query=question), max_new_tokens=6) == expected
