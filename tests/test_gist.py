"""Gist compressor mechanics on the tiny model, and the full-context / truncation baselines."""

import math

import pytest
import torch
from transformers import GenerationConfig

from ctxzip.compressors import ContextTooLongError, EmptyInputError, GistCompressor, GistConfig, Memory
from ctxzip.compressors.baselines import FullContext, FullContextConfig, Truncation, TruncationConfig
from ctxzip.compressors.baselines.truncation import kept_indices
from ctxzip.compressors.compat import cache_of, with_cache
from ctxzip.compressors.generation import generate_from_memory
from ctxzip.compressors.padding import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(10, 2000, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(gist: GistCompressor, seed: int = 0) -> GistCompressor:
    """Non-trivial weights: random gists and a non-zero LoRA B (PEFT starts B at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gist.named_parameters():
            if name.startswith("gist_embeddings") or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return gist


def make_gist(tiny, **config) -> GistCompressor:
    model, _ = tiny()
    settings = dict(tokens_per_gist=4, segment_length=16, lora_r=4)
    settings.update(config)
    return randomize(GistCompressor(GistConfig(**settings), model).eval())


def decode(compressor, memory: Memory, prompt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.ones_like(prompt) if mask is None else mask
    with torch.no_grad(), compressor.reading(memory):
        return compressor.decoder_forward(memory, prompt, mask).logits


# ----- slots, ratio, positions --------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 3, 4, 5, 13, 16])
def test_one_segment_gets_ceil_len_over_tokens_per_gist_slots(tiny, length: int) -> None:
    gist = make_gist(tiny)
    with torch.no_grad():
        memory = gist.compress(ids(length, seed=length))
    slots = math.ceil(length / 4)
    assert memory.kind == "kv" and memory.compressor_type == "gist"
    assert memory.slots == slots and memory.source_tokens == [length]
    assert memory.ratio == pytest.approx(length / slots)
    assert memory.position_offset == [length + slots]  # tokens, then gists, then the decoder
    assert memory.num_layers == 2 and memory.tensors["key.0"].shape == (1, 2, slots, 16)
    assert "slot_mask" not in memory.tensors


@pytest.mark.parametrize(("length", "segment_length", "per_gist", "segments"), [
    (21, 8, 3, [5, 8, 8]), (32, 8, 4, [8, 8, 8, 8]), (9, 8, 8, [1, 8]), (17, 16, 5, [1, 16])])
def test_multi_segment_slots_are_the_sum_over_segments(tiny, length, segment_length, per_gist, segments) -> None:
    gist = make_gist(tiny, segment_length=segment_length, tokens_per_gist=per_gist)
    with torch.no_grad():
        memory = gist.compress(ids(length, seed=1))
    slots = sum(math.ceil(s / per_gist) for s in segments)  # segments are cut from the right
    assert memory.slots == slots and memory.source_tokens == [length]
    assert memory.ratio == pytest.approx(length / slots)
    assert memory.position_offset == [length + slots]


def test_gist_keys_values_are_those_of_one_pass_over_context_and_gists(tiny) -> None:
    """One segment is exactly the LM (with LoRA) over [context, gists] at positions 0..n+k-1."""
    gist = make_gist(tiny)
    context = ids(10, seed=2)
    with torch.no_grad():
        memory = gist.compress(context)
        embeds = torch.cat([gist.base_lm.get_input_embeddings()(context),
                            gist.gist_embeddings.weight[None, :3]], dim=1)
        out = gist.model(inputs_embeds=embeds, use_cache=True)
    for layer, item in enumerate(cache_of(out).layers):
        assert torch.allclose(memory.tensors[f"key.{layer}"], item.keys[:, :, -3:], atol=1e-5)
        assert torch.allclose(memory.tensors[f"value.{layer}"], item.values[:, :, -3:], atol=1e-5)


def test_decoder_continues_at_the_position_offset(tiny) -> None:
    """Decoding after a gist memory = the base LM over the prompt at positions offset.. reading the gist KV."""
    gist = make_gist(tiny)
    prompt = ids(5, seed=3)
    with torch.no_grad():
        memory = gist.compress(ids(10, seed=2))
        logits = decode(gist, memory, prompt)
        with gist.model.disable_adapter():
            positions = torch.arange(memory.position_offset[0], memory.position_offset[0] + 5)[None]
            ref = gist.base_lm(input_ids=prompt, position_ids=positions, **with_cache(memory.to_cache())).logits
            shifted = gist.base_lm(input_ids=prompt, position_ids=positions + 1,
                                   **with_cache(memory.to_cache())).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    assert not torch.allclose(logits, shifted, atol=1e-4)  # positions matter, so the check is real


# ----- training ---------------------------------------------------------------------------------------
def _training_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    target = ids(6, seed=seed + 10, batch=2)
    labels = target.clone()
    labels[:, :2] = -100
    return {"context_ids": ids(12, seed=seed, batch=2), "input_ids": target,
            "attention_mask": torch.ones_like(target), "labels": labels}


@pytest.mark.parametrize("scope", ["all", "gists"])
def test_compress_is_differentiable_and_only_trainable_params_change(tiny, scope: str) -> None:
    gist = make_gist(tiny, adapter_scope=scope)
    gist.train()
    trainable = {n: p for n, p in gist.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in gist.named_parameters() if not p.requires_grad}
    assert "gist_embeddings.weight" in trainable
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert all("lora_" in n or n.startswith("gist_") for n in trainable)
    assert any("embed_tokens" in n for n in frozen) and any("q_proj.base_layer" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in gist.named_parameters()}

    out = gist(**_training_batch())
    assert out["loss"].requires_grad and out["per_example_loss"].shape == (2,)
    assert out["ratio"] == pytest.approx(12 / 3)
    out["loss"].backward()
    # The last layer's query / output projections cannot reach a KV memory (only keys and values
    # are kept), so their LoRA factors get no gradient; every other trainable tensor does.
    last = gist.base_lm.config.num_hidden_layers - 1
    unreachable = {n for n in trainable if f"layers.{last}.self_attn.q_proj" in n
                   or f"layers.{last}.self_attn.o_proj" in n}
    assert len(unreachable) == 4  # lora_A and lora_B of q_proj and o_proj
    for name, param in trainable.items():
        if name in unreachable:
            assert param.grad is None or not param.grad.any(), name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in frozen.items():
        assert param.grad is None, name

    optimizer = torch.optim.AdamW(gist.parameters(), lr=1e-2, weight_decay=0.1)  # every param, on purpose
    optimizer.step()
    for name, param in gist.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable and name not in unreachable), name


def test_lora_r_0_trains_only_the_gist_embeddings(tiny) -> None:
    gist = make_gist(tiny, lora_r=0)
    assert [n for n, p in gist.named_parameters() if p.requires_grad] == ["gist_embeddings.weight"]
    assert not hasattr(gist.model, "peft_config")
    gist.train()
    gist(**_training_batch(1))["loss"].backward()
    assert gist.gist_embeddings.weight.grad.abs().sum() > 0


def test_decoder_is_frozen_base_unless_lora_in_decoder(tiny) -> None:
    prompt, context = ids(4, seed=5), ids(8, seed=6)
    plain = make_gist(tiny)
    with torch.no_grad():
        memory = plain.compress(context)
        with plain.model.disable_adapter():
            ref = plain.base_lm(input_ids=prompt, **with_cache(memory.to_cache()),
                                position_ids=torch.arange(memory.position_offset[0], memory.position_offset[0] + 4)[None]
                                ).logits
    assert torch.allclose(decode(plain, memory, prompt), ref, atol=1e-5)
    in_decoder = make_gist(tiny, lora_in_decoder=True)
    with torch.no_grad():
        memory2 = in_decoder.compress(context)
    assert not torch.allclose(decode(in_decoder, memory2, prompt), ref, atol=1e-4)


# ----- where the adapter acts -------------------------------------------------------------------
def _memories_equal(first: Memory, second: Memory, atol: float = 1e-5) -> bool:
    return first.tensors.keys() == second.tensors.keys() and all(
        torch.allclose(first.tensors[name].float(), second.tensors[name].float(), atol=atol) for name in first.tensors)


def test_gists_scope_with_an_idle_adapter_equals_one_pass_over_every_segment(tiny) -> None:
    """With LoRA B at zero the adapter adds nothing, so reading the segment first and the gists after must give
    what one pass over [segment, gists] gives: the same cache, masks and positions, padding and segments included."""
    contexts = [ids(n, seed=30 + i)[0].tolist() for i, n in enumerate([40, 21, 5])]
    batch_ids, batch_mask = left_pad(contexts, pad_id=2)
    memories = {}
    for scope in ("all", "gists"):
        gist = make_gist(tiny, segment_length=8, adapter_scope=scope)
        with torch.no_grad():
            for name, param in gist.named_parameters():
                if "lora_B" in name:
                    param.zero_()
            memories[scope] = gist.compress(batch_ids, batch_mask)
    assert memories["all"].position_offset == memories["gists"].position_offset
    assert _memories_equal(memories["all"], memories["gists"])


def _adapter_token_counts(gist: GistCompressor, context: torch.Tensor) -> list[int]:
    """How many positions each call of the first layer's LoRA ``q_proj`` factor saw while compressing."""
    module = dict(gist.model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"]
    seen: list[int] = []
    handle = module.register_forward_hook(lambda _module, args, _out: seen.append(args[0].shape[-2]))
    try:
        with torch.no_grad():
            gist.compress(context)
    finally:
        handle.remove()
    return seen


def test_gists_scope_runs_the_adapter_at_the_gist_positions_only(tiny) -> None:
    context = ids(20, seed=3)  # segments of 4 and 16 tokens: 1 and 4 gists
    assert _adapter_token_counts(make_gist(tiny, adapter_scope="all"), context) == [4 + 1, 16 + 4]
    gist = make_gist(tiny, adapter_scope="gists")
    assert _adapter_token_counts(gist, context) == [1, 4]
    # A randomized adapter changes the gists, and the decoder (after as_decoder) compresses the same way.
    with torch.no_grad():
        trained = gist.compress(context)
        gist.as_decoder()
        with gist.encoding():
            assert _memories_equal(gist.compress(context), trained)
        assert _adapter_token_counts(gist, context) == []  # outside encoding() the adapter is off
    idle = make_gist(tiny, adapter_scope="gists")
    with torch.no_grad():
        for name, param in idle.named_parameters():
            if "lora_B" in name:
                param.zero_()
        assert not _memories_equal(idle.compress(context), trained)


INTERLEAVED = {"adapter_scope": "gists", "gist_layout": "interleaved"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_interleaved_gist_reads_up_to_its_own_tokens_only(tiny, attention) -> None:
    gist = make_gist(tiny, **INTERLEAVED)
    gist.base_lm.set_attn_implementation(attention)  # the mask's form depends on it (bool / additive)
    context = ids(14, seed=7)  # one segment: gists for tokens 0-3, 4-7, 8-11, 12-13
    with torch.no_grad():
        memory = gist.compress(context)
        for changed, first_affected in [(13, 3), (9, 2), (2, 0)]:
            edited = context.clone()
            edited[0, changed] = (edited[0, changed] + 1) % 2000 + 10
            other = gist.compress(edited)
            for layer in range(gist.base_lm.config.num_hidden_layers):
                key, other_key = memory.tensors[f"key.{layer}"], other.tensors[f"key.{layer}"]
                assert torch.allclose(key[:, :, :first_affected], other_key[:, :, :first_affected], atol=1e-6)
            assert not torch.allclose(memory.tensors["value.1"][:, :, first_affected],
                                      other.tensors["value.1"][:, :, first_affected], atol=1e-4)
    assert memory.slots == 4 and memory.position_offset == [14]  # the decoder goes on right after the context


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_interleaved_gists_carry_over_segments(tiny, attention) -> None:
    # Three layers: a memory slot's layer-0 keys/values come from its own embedding alone, so a token of the first
    # segment reaches the third segment's gists at layer 2 (first segment's gists at layer 1, then layer 2).
    model, _ = tiny(num_hidden_layers=3)
    gist = randomize(GistCompressor(GistConfig(tokens_per_gist=4, segment_length=16, lora_r=4, **INTERLEAVED),
                                    model).eval())
    gist.base_lm.set_attn_implementation(attention)
    context = ids(40, seed=8)  # segments of 8, 16 and 16 tokens (cut from the right)
    with torch.no_grad():
        memory = gist.compress(context)
        edited = context.clone()
        edited[0, 0] += 1
        other = gist.compress(edited)
    assert memory.slots == 2 + 4 + 4 and memory.position_offset == [40]
    # The first token reaches every later gist through the memory of the first segment.
    assert not torch.allclose(memory.tensors["value.2"][:, :, -1], other.tensors["value.2"][:, :, -1], atol=1e-5)


def test_interleaved_sdpa_and_eager_masks_agree(tiny) -> None:
    contexts = [ids(n, seed=40 + i)[0].tolist() for i, n in enumerate([21, 9])]
    batch_ids, batch_mask = left_pad(contexts, pad_id=2)
    gist = make_gist(tiny, segment_length=8, **INTERLEAVED)
    memories = []
    for attention in ("sdpa", "eager"):
        gist.base_lm.set_attn_implementation(attention)
        with torch.no_grad():
            memories.append(gist.compress(batch_ids, batch_mask))
    assert _memories_equal(*memories, atol=1e-4)


# ----- batching -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("lengths", "segment_length"), [
    ([13, 7, 16], 16),  # one segment; 4, 2 and 4 gists
    ([12, 11], 16),  # the same gist count, different padding
    ([40, 20, 5], 8),  # several segments; the short rows have fewer
])
@pytest.mark.parametrize(("scope", "layout"), [("all", "end"), ("gists", "end"), ("gists", "interleaved")])
def test_left_padded_batch_equals_rows_compressed_alone(tiny, lengths, segment_length, scope, layout) -> None:
    gist = make_gist(tiny, segment_length=segment_length, adapter_scope=scope, gist_layout=layout)
    assert_batch_equals_rows_alone(gist, lengths, seed=20)


def assert_batch_equals_rows_alone(gist: GistCompressor, lengths: list[int], seed: int) -> None:
    """Left-padded contexts of ``lengths`` compressed as one batch read as each row compressed alone."""
    contexts = [ids(n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]
    prompt = ids(5, seed=9)
    batch_ids, batch_mask = left_pad(contexts, pad_id=2)
    with torch.no_grad():
        batched = gist.compress(batch_ids, batch_mask)
        alone = [gist.compress(torch.tensor([c])) for c in contexts]
        batched_logits = decode(gist, batched, prompt.expand(len(lengths), -1))
    assert batched.source_tokens == lengths
    assert batched.position_offset == [m.position_offset[0] for m in alone]
    assert batched.slots == max(m.slots for m in alone)
    for row, memory in enumerate(alone):
        assert torch.allclose(batched_logits[row], decode(gist, memory, prompt)[0], atol=1e-4), row
        # A row selected from the batch reads the same as the row compressed alone.
        assert torch.allclose(decode(gist, batched.select(row), prompt), decode(gist, memory, prompt), atol=1e-4)


def test_extra_padding_columns_are_ignored(tiny) -> None:
    gist = make_gist(tiny, segment_length=8)
    context = ids(10, seed=4)
    padded = torch.cat([torch.full((1, 9), 2), context], dim=1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    prompt = ids(3, seed=5)
    with torch.no_grad():
        a, b = gist.compress(context), gist.compress(padded, mask)
    assert a.slots == b.slots and a.position_offset == b.position_offset
    assert torch.allclose(decode(gist, a, prompt), decode(gist, b, prompt), atol=1e-4)


# ----- the raw recent window ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["end", "interleaved"])
def test_recent_tokens_are_what_the_decoder_reads_after_the_gists_of_the_text_before(tiny, layout) -> None:
    """A memory with a raw window of 6 tokens = the gists of the first tokens, then the window read by the decoder:
    a prompt after it gets the logits of window + prompt decoded after the gists alone."""
    gist = make_gist(tiny, segment_length=8, gist_layout=layout, adapter_scope="gists")
    windowed = make_gist(tiny, segment_length=8, gist_layout=layout, adapter_scope="gists", recent_tokens=6)
    windowed.load_state_dict(gist.state_dict())
    context, prompt = ids(23, seed=6), ids(4, seed=7)
    with torch.no_grad():
        memory = windowed.compress(context)
        gists = gist.compress(context[:, :17])
        ref = decode(gist, gists, torch.cat([context[:, 17:], prompt], dim=1))[:, 6:]
        logits = decode(windowed, memory, prompt)
    assert memory.slots == gists.slots + 6 and memory.source_tokens == [23]
    assert memory.position_offset == [gists.position_offset[0] + 6]
    assert torch.allclose(logits, ref, atol=1e-4)


def test_a_window_longer_than_the_context_is_the_full_context(tiny) -> None:
    model, _ = tiny()
    gist = randomize(GistCompressor(GistConfig(tokens_per_gist=4, segment_length=8, lora_r=4, recent_tokens=32),
                                    model).eval())
    context, prompt = ids(11, seed=1), ids(5, seed=2)
    with torch.no_grad():
        memory = gist.compress(context)
        logits = decode(gist, memory, prompt)
        with gist.model.disable_adapter():  # the plain model: the encoder's LoRA is injected into it
            ref = model(input_ids=torch.cat([context, prompt], dim=1)).logits[:, 11:]
    assert memory.slots == 11 and memory.ratio == 1.0 and memory.position_offset == [11]
    assert torch.allclose(logits, ref, atol=1e-4)


def test_recent_tokens_left_padded_batch_equals_rows_compressed_alone(tiny) -> None:
    gist = make_gist(tiny, segment_length=8, recent_tokens=6, **INTERLEAVED)
    # the last row is shorter than the window: no gists, a padded window
    assert_batch_equals_rows_alone(gist, [30, 13, 4], seed=30)


def test_training_draws_a_window_per_batch_and_reading_keeps_recent_tokens(tiny) -> None:
    """In training, train_recent_fraction draws the window's length per batch (from the seeded generator), and the
    memory is the one recent_tokens of that length reads; in eval mode the fraction plays no part."""
    gist = make_gist(tiny, segment_length=8, recent_tokens=3, train_recent_fraction=0.5, **INTERLEAVED)
    context = ids(22, seed=4)
    with torch.no_grad():
        assert gist.compress(context).slots == 5 + 3  # eval mode: 19 tokens in 5 gists, then 3 raw
        drawn = []
        for seed in range(12):
            torch.manual_seed(seed)
            window = int(torch.randint(0, 11 + 1, ()))  # up to half of 22 tokens
            torch.manual_seed(seed)
            trained = gist.train().compress(context)
            reference = make_gist(tiny, segment_length=8, recent_tokens=window, **INTERLEAVED)
            reference.load_state_dict(gist.state_dict())
            expected = reference.compress(context)
            assert trained.slots == expected.slots and trained.position_offset == expected.position_offset
            assert all(torch.equal(trained.tensors[k], expected.tensors[k]) for k in expected.tensors)
            drawn.append(window)
    assert len(set(drawn)) > 3 and max(drawn) <= 11


def test_a_training_step_with_a_drawn_window_reaches_the_gists(tiny) -> None:
    """The forward a trainer calls, in training mode: a finite loss whose gradient reaches the gist embeddings (a
    window of at most 12 of the 24 tokens leaves gists), and a ratio that changes with the drawn window."""
    gist = make_gist(tiny, segment_length=8, train_recent_fraction=0.5, **INTERLEAVED).train()
    context, target = ids(24, seed=8), ids(5, seed=9)
    ratios = set()
    for seed in range(6):
        torch.manual_seed(seed)
        gist.zero_grad()
        out = gist(context_ids=context, input_ids=target, attention_mask=torch.ones_like(target), labels=target)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and gist.gist_embeddings.weight.grad.abs().sum() > 0
        ratios.add(round(float(out["ratio"]), 4))
    assert len(ratios) > 1


def test_recent_tokens_can_be_set_when_loading(tiny, tmp_path) -> None:
    from ctxzip.compressors import CompressedLM, load_base
    from ctxzip.compressors.hub import load_compressor, save_compressor

    model, _ = tiny()
    _, tokenizer = load_base("tiny-random-llama")
    gist = make_gist(tiny, segment_length=8)
    save_compressor(gist, tmp_path / "gist", tokenizer)
    loaded, _ = load_compressor(tmp_path / "gist", config_overrides={"recent_tokens": 5})
    assert loaded.compressor_config.recent_tokens == 5
    with torch.no_grad():
        assert loaded.compress(ids(21, seed=3)).slots == 4 + 5  # 16 tokens in 4 gists, then 5 raw
    lm = CompressedLM.from_pretrained(tmp_path / "gist", config_overrides={"recent_tokens": 2})
    assert lm.compressor.compressor_config.recent_tokens == 2
    with pytest.raises(ValueError, match="unknown GistConfig keys"):
        load_compressor(tmp_path / "gist", config_overrides={"recent_token": 5})


# ----- bad input ------------------------------------------------------------------------------------
def test_empty_context_raises(tiny) -> None:
    gist = make_gist(tiny)
    with pytest.raises(EmptyInputError):
        gist.compress(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(EmptyInputError):  # one row of the batch has no real token
        gist.compress(ids(4, seed=0, batch=2), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="batch, length"):
        gist.compress(ids(4, seed=0)[0])


def test_context_longer_than_max_context_tokens_raises(tiny) -> None:
    gist = make_gist(tiny, max_context_tokens=8)
    with torch.no_grad():
        gist.compress(ids(8, seed=0))
    with pytest.raises(ContextTooLongError, match="max_context_tokens=8"):
        gist.compress(ids(9, seed=0))
    model, _ = tiny(max_position_embeddings=32)
    long_base = GistCompressor(GistConfig(segment_length=16, lora_r=0), model)
    with pytest.raises(ContextTooLongError, match="32 positions"):
        long_base.compress(ids(33, seed=0))


def test_gist_config_validates() -> None:
    with pytest.raises(ValueError, match="recent_tokens"):
        GistConfig(recent_tokens=-1)
    with pytest.raises(ValueError, match="train_recent_fraction"):
        GistConfig(train_recent_fraction=1.0)
    with pytest.raises(ValueError):
        GistConfig(tokens_per_gist=0)
    with pytest.raises(ValueError):
        GistConfig(tokens_per_gist=8, segment_length=4)
    with pytest.raises(ValueError):
        GistConfig(init="zeros")
    with pytest.raises(ValueError, match="adapter_scope"):
        GistConfig(adapter_scope="context")
    with pytest.raises(ValueError, match="gist_layout"):
        GistConfig(gist_layout="middle")
    with pytest.raises(ValueError, match="needs adapter_scope 'gists'"):
        GistConfig(gist_layout="interleaved")
    with pytest.raises(ValueError, match="tokens_per_gits"):
        GistConfig.from_dict({"tokens_per_gits": 4})


# ----- full context: the positions / cache plumbing ----------------------------------------------------
def test_full_context_memory_gives_the_logits_of_the_plain_model(tiny) -> None:
    model, _ = tiny()
    full = FullContext(FullContextConfig(), model).eval()
    context, prompt = ids(11, seed=1), ids(6, seed=2)
    with torch.no_grad():
        memory = full.compress(context)
        logits = decode(full, memory, prompt)
        ref = model(input_ids=torch.cat([context, prompt], dim=1)).logits[:, 11:]
    assert memory.slots == 11 and memory.ratio == 1.0 and memory.position_offset == [11]
    assert torch.allclose(logits, ref, atol=1e-4)


def test_full_context_padded_contexts_and_prompts(tiny) -> None:
    model, _ = tiny()
    full = FullContext(FullContextConfig(), model).eval()
    contexts = [ids(9, seed=1)[0].tolist(), ids(4, seed=2)[0].tolist()]
    prompts = [ids(3, seed=3)[0].tolist(), ids(6, seed=4)[0].tolist()]
    context_ids, context_mask = left_pad(contexts, pad_id=2)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id=2)
    with torch.no_grad():
        memory = full.compress(context_ids, context_mask)
        logits = decode(full, memory, prompt_ids, prompt_mask)
        for row in range(2):
            ref = model(input_ids=torch.tensor([contexts[row] + prompts[row]])).logits[0, -1]
            assert torch.allclose(logits[row, -1], ref, atol=1e-4), row
    assert memory.position_offset == [9, 4] and memory.tensors["slot_mask"].tolist()[1] == [0] * 5 + [1] * 4


def test_decode_loop_from_full_context_equals_hf_greedy_generate(tiny) -> None:
    model, _ = tiny()
    full = FullContext(FullContextConfig(), model).eval()
    context, prompt = ids(10, seed=7), ids(4, seed=8)
    with torch.no_grad():
        memory = full.compress(context)
        ours = generate_from_memory(full, memory, prompt, torch.ones_like(prompt), GenerationConfig(
            max_new_tokens=6, do_sample=False, eos_token_id=[2], pad_token_id=2))
        whole = torch.cat([context, prompt], dim=1)
        ref = model.generate(whole, attention_mask=torch.ones_like(whole), max_new_tokens=6, do_sample=False,
                             eos_token_id=[2], pad_token_id=2)[:, whole.shape[1]:]
    assert ours.tolist() == ref.tolist()


# ----- truncation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("length", "ratio"), [(10, 3.0), (12, 4.0), (7, 1.0), (5, 2.5), (3, 8.0)])
def test_truncation_keeps_ceil_n_over_ratio_recent_tokens(tiny, length: int, ratio: float) -> None:
    model, _ = tiny()
    trunc = Truncation(TruncationConfig(ratio=ratio), model).eval()
    full = FullContext(FullContextConfig(), model).eval()
    context, prompt = ids(length, seed=length), ids(3, seed=1)
    kept = max(1, math.ceil(length / ratio))
    with torch.no_grad():
        memory = trunc.compress(context)
        alone = full.compress(context[:, -kept:])
    assert memory.slots == kept and memory.source_tokens == [length] and memory.position_offset == [kept]
    assert memory.ratio == pytest.approx(length / kept)
    assert torch.allclose(decode(trunc, memory, prompt), decode(full, alone, prompt), atol=1e-5)


def test_truncation_first_last_and_padded_batch(tiny) -> None:
    assert kept_indices(10, 4, "first_last") == [0, 1, 8, 9]
    assert kept_indices(10, 5, "first_last") == [0, 1, 7, 8, 9]
    assert kept_indices(3, 5, "recent") == [0, 1, 2]
    model, _ = tiny()
    trunc = Truncation(TruncationConfig(ratio=2.0, keep="first_last"), model).eval()
    contexts = [ids(12, seed=1)[0].tolist(), ids(6, seed=2)[0].tolist()]
    batch_ids, batch_mask = left_pad(contexts, pad_id=2)
    with torch.no_grad():
        memory = trunc.compress(batch_ids, batch_mask)
    assert memory.slots == 6 and memory.source_tokens == [12, 6] and memory.position_offset == [6, 3]
    assert memory.tensors["slot_mask"].tolist() == [[1] * 6, [0] * 3 + [1] * 3]


def test_truncation_ratio_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        TruncationConfig(ratio=0.5)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        TruncationConfig.from_dict({"ratio": 0.99})
    with pytest.raises(ValueError, match="keep"):
        TruncationConfig(keep="middle")
