"""RCC on the tiny Llama: the injection identity, window-by-window encoding beyond the base model's positions,
objectives, training and the artifact round trip (both training options), bad input."""

from __future__ import annotations

import pytest
import torch

from ctxzip.compressors import (
    BaseModelMismatchError,
    CompressedLM,
    ContextTooLongError,
    RCCCompressor,
    RCCConfig,
)
from ctxzip.compressors.baselines.full_context import prefill_kv
from ctxzip.compressors.hub import load_compressor
from ctxzip.compressors.models import tiny_llama
from ctxzip.compressors.rcc import kept_positions

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 6
PROMPT = "What is the pass key?"


@pytest.fixture(scope="module")
def tokenizer():
    from ctxzip.compressors import TINY_MODEL, load_base

    return load_base(TINY_MODEL)[1]


def make(tokenizer, seed: int = 0, **config) -> CompressedLM:
    settings = {"window": 16, "rate": 4, "lora_r": 2, "decoder_lora_r": 2, **config}
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2, seed=seed).eval()
    return CompressedLM(RCCCompressor(RCCConfig(**settings), model).eval(), tokenizer)


def kept_token_ids(clm: CompressedLM, context: str) -> list[int]:
    """The context tokens whose states RCC keeps: window by window, the last of every group of ``rate``."""
    config = clm.compressor.compressor_config
    ids = clm.layout.encode(context)
    kept = []
    for start in range(0, len(ids), config.window):
        window = ids[start:start + config.window]
        kept += [window[i] for i in kept_positions(len(window), config.rate).tolist()]
    return kept


def perturb(clm: CompressedLM, which: str, std: float = 0.3) -> None:
    with torch.no_grad():
        for name, parameter in clm.compressor.named_parameters():
            if which in name:
                parameter.normal_(std=std)


def test_kept_positions_are_the_last_of_every_group_and_the_last_real_token() -> None:
    assert kept_positions(16, 4).tolist() == [3, 7, 11, 15]
    assert kept_positions(10, 4).tolist() == [3, 7, 9]  # a short (padded) window: its last partial group
    assert kept_positions(3, 4).tolist() == [2]


def test_identity_projections_read_every_c_th_token_and_zero_layer_projections_are_the_base_model(tokenizer) -> None:
    """E = I, A_i = 0 and zero LoRA B: the memory is exactly the base model's KV of [template prefix; the kept
    context tokens], and the decoder's logits after it are the base model's on that sequence + the prompt.
    Non-zero A_i change both; zeroing them again restores the base model exactly."""
    clm = make(tokenizer)
    model = clm.model
    kept = clm.layout.prefix_ids + kept_token_ids(clm, CONTEXT)
    reference_ids = torch.tensor([kept])
    reference = prefill_kv(clm.compressor, reference_ids, torch.ones_like(reference_ids))
    memory = clm.compress(CONTEXT)
    assert memory.slots == len(kept) and memory.source_tokens == [len(clm.layout.context_ids(CONTEXT))]
    for name, tensor in reference.items():
        torch.testing.assert_close(memory.tensors[name], tensor)
    prompt = clm.prompt_ids(PROMPT)
    with torch.no_grad():
        expected = model(torch.tensor([kept + prompt])).logits[:, len(kept):]
        ids = torch.tensor([prompt])
        with clm.compressor.reading(memory):
            step = clm.compressor.decoder_forward(memory, ids, torch.ones_like(ids))
    torch.testing.assert_close(step.logits, expected)

    perturb(clm, "layer_projections")
    injected = clm.compress(CONTEXT)
    assert not torch.allclose(injected.tensors["key.1"], memory.tensors["key.1"])
    with torch.no_grad():
        for projection in clm.compressor.layer_projections:
            projection.weight.zero_()
    for name, tensor in clm.compress(CONTEXT).tensors.items():
        torch.testing.assert_close(tensor, memory.tensors[name])


def test_zero_projections_are_the_base_model_reading_zero_vectors(tokenizer) -> None:
    clm = make(tokenizer, projection_init="zero")
    perturb(clm, "lora_A")  # B = 0 still: the adapters change nothing
    memory = clm.compress(CONTEXT)
    prefix = clm.layout.prefix_ids
    placeholders = len(kept_token_ids(clm, CONTEXT))
    embeds = clm.model.get_input_embeddings()(torch.tensor([prefix]))
    inputs = torch.cat([embeds, torch.zeros(1, placeholders, embeds.shape[-1])], dim=1)
    with torch.no_grad():
        out = clm.model(inputs_embeds=inputs, use_cache=True)
    from ctxzip.compressors.compat import cache_of

    for layer, item in enumerate(cache_of(out).layers):
        torch.testing.assert_close(memory.tensors[f"key.{layer}"], item.keys)
        torch.testing.assert_close(memory.tensors[f"value.{layer}"], item.values)


def test_a_context_beyond_the_base_models_positions_is_compressed_window_by_window(tokenizer) -> None:
    clm = make(tokenizer, window=64, rate=32)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau " * 300
    ids = clm.layout.context_ids(words)
    assert len(ids) > clm.model.config.max_position_embeddings  # 4096 on the tiny model
    memory = clm.compress(words)
    windows = -(-(len(ids) - len(clm.layout.prefix_ids)) // 64)
    assert memory.slots == len(clm.layout.prefix_ids) + 2 * windows
    assert memory.ratio > 20
    assert isinstance(clm.generate(PROMPT, memory=memory, max_new_tokens=3), str)
    from ctxzip.compressors.baselines import FullContext, FullContextConfig

    with pytest.raises(ContextTooLongError):
        CompressedLM(FullContext(FullContextConfig(max_context_tokens=1 << 20), clm.model), tokenizer).compress(words)
    with pytest.raises(ContextTooLongError, match="decoder positions"):
        make(tokenizer, window=8, rate=1).compress(words)  # rate 1: one placeholder per token


def test_bad_configs_are_clear_errors(tokenizer) -> None:
    unbound = RCCCompressor(RCCConfig(window=16, rate=4, lora_r=2), tiny_llama(vocab_size=len(tokenizer)))
    with pytest.raises(RuntimeError, match="use_tokenizer"):  # training must lay the context out as inference
        unbound.compress(torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of rate"):
        RCCConfig(window=100, rate=32)
    with pytest.raises(ValueError, match="train_mode"):
        RCCConfig(window=64, rate=32, train_mode="half")
    with pytest.raises(ValueError, match="positions"):
        RCCCompressor(RCCConfig(window=8192, rate=32), tiny_llama(vocab_size=len(tokenizer)))


def test_short_contexts_are_padded_not_tiled_and_batch_rows_read_as_alone(tokenizer) -> None:
    clm = make(tokenizer)
    perturb(clm, "layer_projections", std=0.05)
    short = "Alice keeps a kite."
    alone = clm.compress(short)
    assert alone.slots == len(clm.layout.prefix_ids) + -(-len(clm.layout.encode(short)) // 4)
    batch = clm.compress([CONTEXT, short])
    row = batch.select(1)
    mask = row.slot_mask()[0].bool()
    for name in ("key.0", "value.1"):
        torch.testing.assert_close(row.tensors[name][:, :, mask], alone.tensors[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_export_reloads_and_generates_identically(tokenizer, tmp_path, train_mode: str) -> None:
    clm = make(tokenizer, train_mode=train_mode)
    perturb(clm, "layer_projections", std=0.05)
    perturb(clm, "lora_B", std=0.05)
    if train_mode == "full":
        with torch.no_grad():
            clm.compressor.encoder.get_decoder().layers[0].mlp.up_proj.weight.add_(0.05)
            clm.model.get_decoder().layers[1].self_attn.q_proj.weight.add_(0.05)
    expected = clm.generate(PROMPT, memory=clm.compress(CONTEXT), max_new_tokens=6)
    folder = clm.save_pretrained(tmp_path / "rcc")
    if train_mode == "lora":
        assert (folder / "encoder" / "adapter_model.safetensors").is_file()
        assert (folder / "decoder" / "adapter_config.json").is_file()
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).eval()
    compressor, _ = load_compressor(folder, model=model, tokenizer=tokenizer)
    again = CompressedLM(compressor, tokenizer)
    assert again.generate(PROMPT, memory=again.compress(CONTEXT), max_new_tokens=6) == expected
    other = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, head_dim=8)
    with pytest.raises(BaseModelMismatchError, match="hidden_size"):
        load_compressor(folder, model=other, tokenizer=tokenizer)
    deeper = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3)
    with pytest.raises(BaseModelMismatchError, match="num_hidden_layers"):
        load_compressor(folder, model=deeper, tokenizer=tokenizer)


def test_full_mode_trains_both_copies_but_not_the_vocabulary(tokenizer) -> None:
    compressor = make(tokenizer, train_mode="full").compressor
    trainable = {n for n, p in compressor.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") for n in trainable) and any(n.startswith("model.") for n in trainable)
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)
    assert set(compressor.own_state_dict()) == trainable


def test_reconstruction_loss_falls_when_overfitting_one_batch(tokenizer) -> None:
    from ctxzip.data import build_task
    from ctxzip.trainers import MemoryCollator

    torch.manual_seed(0)
    rows = list(build_task("reconstruction", tokenizer, num_samples=2, context_tokens=48, seed=0,
                           span_tokens=20, cue_tokens=(4, 8)))
    clm = make(tokenizer)
    compressor = clm.compressor.train()
    batch = MemoryCollator(tokenizer, max_context_tokens=256, max_target_tokens=64)(rows)
    batch.pop("objective")
    parameters = [p for p in compressor.parameters() if p.requires_grad]
    names = [n for n, p in compressor.named_parameters() if p.requires_grad]
    assert any(".encoder." in n for n in names) and any(".decoder." in n for n in names)
    assert any(n.startswith("layer_projections.") for n in names)
    before = {n: p.detach().clone() for n, p in compressor.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    losses = []
    for _ in range(25):
        loss = compressor(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    changed = {n for n, p in compressor.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    for part in (".encoder.", ".decoder.", "layer_projections.", "embed_projection."):
        assert any(part in n for n in changed), f"no {part} parameter was trained"


def test_recipes_refuse_gradient_checkpointing(tmp_path) -> None:
    # the injection hooks read states that exist only during the decoder's forward: a recomputed layer would add
    # nothing, so training with checkpointing would silently compute wrong gradients
    from transformers import TrainingArguments

    from ctxzip.trainers.memory_recipe import train_memory_compressor

    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="rcc cannot train with --gradient_checkpointing"):
        train_memory_compressor(RCCCompressor, RCCConfig(), script_args=None, training_args=args, model_args=None)
