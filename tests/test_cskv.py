"""CSKV: factorization, the bi-branch cache, its real size, decoding, training, export and the recipe."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from ctxzip.compressors import BaseModelMismatchError, CompressedLM, Memory, load_compressor, save_compressor
from ctxzip.compressors.compat import cache_of, with_cache
from ctxzip.compressors.cskv import CSKVCache, CSKVCompressor, CSKVConfig
from ctxzip.compressors.cskv.quant import dequantize, quantize, store

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def make(tiny, **config) -> CSKVCompressor:
    model, _ = tiny()
    return CSKVCompressor(CSKVConfig(**config), model).eval()


def ids(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 2000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_logits(compressor, memory: Memory, prompt: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Logits of the prompt's last token and of ``steps`` greedy tokens, decoded from ``memory``."""
    mask = torch.ones_like(prompt)
    out = []
    with compressor.reading(memory):
        step = compressor.decoder_forward(memory, prompt, mask)
        logits, cache, mask, position = step.logits[:, -1], step.cache, step.attention_mask, step.next_position
        out.append(logits)
        for _ in range(steps):
            token = logits.argmax(-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            res = compressor.base_lm(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                                     use_cache=True, **with_cache(cache))
            logits, cache, position = res.logits[:, -1], cache_of(res), position + 1
            out.append(logits)
    return torch.stack(out, 1)


@torch.no_grad()
def full_cache_logits(model, context: torch.Tensor, prompt: torch.Tensor, steps: int = 4) -> torch.Tensor:
    out, cache = [], DynamicCache()
    res = model(input_ids=torch.cat([context, prompt], 1), use_cache=True, **with_cache(cache))
    logits = res.logits[:, -1]
    out.append(logits)
    for _ in range(steps):
        res = model(input_ids=logits.argmax(-1)[:, None], use_cache=True, **with_cache(cache_of(res)))
        logits = res.logits[:, -1]
        out.append(logits)
    return torch.stack(out, 1)


# ----- config errors -------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), "half"])
def test_density_outside_unit_interval_is_an_error(density) -> None:
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        CSKVConfig(density=density)
    with pytest.raises(ValueError, match=r"layer_densities\[1\] must be"):
        CSKVConfig(layer_densities=[0.5, 2.0])


def test_other_config_errors(tiny) -> None:
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        CSKVConfig(window=-1)
    for bits in (3, 16, 2):
        with pytest.raises(ValueError, match=r"quant_bits must be one of \[None, 8, 4\]"):
            CSKVConfig(quant_bits=bits)
    with pytest.raises(ValueError, match="init must be one of"):
        CSKVConfig(init="pca")
    with pytest.raises(ValueError, match="layer_densities has 3 entries but the base model has 2 layers"):
        make(tiny, layer_densities=[0.5, 0.5, 0.5])


# ----- factorization -------------------------------------------------------------------------
def test_full_rank_factorization_reproduces_the_original_logits(tiny) -> None:
    compressor = make(tiny, density=1.0, window=0)
    for attn, factors in zip(compressor._attention, compressor.factors):
        weight = factors.k.up.weight @ factors.k.down.weight
        torch.testing.assert_close(weight, attn.k_proj.weight, atol=1e-5, rtol=1e-4)
    context, prompt = ids(40), ids(5, seed=1)
    memory = compressor.compress(context)
    assert memory.meta["cskv"]["key_ranks"] == [32, 32]  # density 1: every channel (2 KV heads x 16)
    got = decode_logits(compressor, memory, prompt)
    want = full_cache_logits(compressor.base_lm, context, prompt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_asvd_calibration_reinitializes_factors(tiny) -> None:
    svd = make(tiny, density=0.5, init="asvd")
    before = {k: v.clone() for k, v in svd.own_state_dict().items()}
    seen = svd.calibrate_asvd([(ids(24, seed=3, batch=2), None)])
    assert seen == 48
    assert any(not torch.equal(before[k], v) for k, v in svd.own_state_dict().items())
    full = make(tiny, density=1.0, init="asvd")
    full.calibrate_asvd([(ids(24, seed=3), None)])
    for attn, factors in zip(full._attention, full.factors):  # at full rank ASVD is still exact
        torch.testing.assert_close(factors.v.up.weight @ factors.v.down.weight, attn.v_proj.weight,
                                   atol=1e-4, rtol=1e-3)


# ----- the cache ------------------------------------------------------------------------------
def test_window_covering_the_context_is_exactly_the_full_cache(tiny) -> None:
    compressor = make(tiny, density=0.25, window=64)
    context, prompt = ids(40), ids(5, seed=1)
    memory = compressor.compress(context)
    with torch.no_grad():
        full = cache_of(compressor.base_lm(input_ids=context, use_cache=True))
    for layer, item in enumerate(full.layers):
        assert memory.tensors[f"latent_k.{layer}"].shape[1] == 0
        assert torch.equal(memory.tensors[f"window_k.{layer}"], item.keys)
        assert torch.equal(memory.tensors[f"window_v.{layer}"], item.values)
    got = decode_logits(compressor, memory, prompt)
    want = full_cache_logits(compressor.base_lm, context, prompt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_low_rank_cache_changes_logits_but_decodes(tiny) -> None:
    compressor = make(tiny, density=0.25, window=4)
    context, prompt = ids(40), ids(5, seed=1)
    got = decode_logits(compressor, compressor.compress(context), prompt)
    want = full_cache_logits(compressor.base_lm, context, prompt)
    assert got.isfinite().all() and not torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_reported_bytes_are_the_tensors_held(tiny, bits) -> None:
    compressor = make(tiny, density=0.3, window=8, quant_bits=bits, quant_group_size=4)
    rank = round(0.3 * 32)  # 10 latent channels of 32
    memory = compressor.compress(ids(50))
    held = sum(t.numel() * t.element_size() for t in memory.tensors.values())
    assert memory.nbytes == held
    cache = compressor.memory_cache(memory)
    assert cache.nbytes == held and set(cache.tensors()) == set(memory.tensors)
    per_token = {None: 2 * rank * 4, 8: 2 * (rank + 2 * 2 * 3), 4: 2 * (rank // 2 + 2 * 2 * 3)}[bits]
    window = 2 * 16 * 4 * 2 + 2 * rank * 4  # full K/V (2 heads x 16 dims, fp32) + pending latents
    assert held == 50 * 4 + 2 * (42 * per_token + 8 * window)  # positions + 2 layers
    if bits is not None:
        assert memory.tensors["latent_k.codes.0"].dtype == torch.uint8
    assert memory.meta["full_kv_nbytes"] == 2 * 2 * 50 * 32 * 4
    # Decoding grows the cache by what it holds, nothing else.
    step = compressor.decoder_forward(memory, ids(3, seed=2), torch.ones(1, 3, dtype=torch.long))
    assert step.cache.nbytes == sum(t.numel() * t.element_size() for t in step.cache.tensors().values())
    assert step.cache.get_seq_length() == 53 and step.cache.layer(0).window_len == 8


def test_quantization_round_trip_and_packing() -> None:
    x = torch.randn(2, 5, 11) * torch.linspace(3, 0.1, 11)
    for bits in (8, 4):
        codes, scale, zero = quantize(x, bits, 4)
        assert codes.dtype == torch.uint8 and codes.shape[-1] == (11 if bits == 8 else 6)
        assert scale.dtype == torch.float16 and scale.shape[-1] == 3
        back = dequantize(codes, scale, zero, bits, 11, 4)
        group = torch.arange(11) // 4
        assert ((back - x).abs() <= scale.float()[..., group] * 0.5 + 1e-3).all()
    codes, *_ = quantize(torch.tensor([[[0.0, 1.0, 2.0, 15.0]]]), 4, 4)  # scale 1, zero 0
    assert codes.tolist() == [[[0 | 2 << 4, 1 | 15 << 4]]]  # byte j: channel j low, j + 2 high
    assert store(x, None, 4, torch.float16).data.dtype == torch.float16


def test_batched_padded_contexts_decode_like_single_rows(tiny) -> None:
    compressor = make(tiny, density=0.5, window=6, quant_bits=8, quant_group_size=8)
    _, tokenizer = tiny()
    clm = CompressedLM(compressor, tokenizer)
    texts = ["The pass key is 4411. " * 6, "Short context about cats."]
    batched = clm.compress(texts)
    assert "slot_mask" in batched.tensors and batched.batch_size == 2
    for row, text in enumerate(texts):
        single = clm.compress(text)
        assert single.source_tokens == [batched.source_tokens[row]]
        a = clm.generate("What is the key?", memory=batched.select(row), max_new_tokens=6)
        b = clm.generate("What is the key?", memory=single, max_new_tokens=6)
        assert a == b
    answers = clm.answer_many(clm.compress(texts[0]), ["q one", "another question"], max_new_tokens=4)
    assert len(answers) == 2


def test_memory_save_load_and_plain_attention_refuses_the_cache(tiny, tmp_path) -> None:
    compressor = make(tiny, density=0.5, window=4, quant_bits=4, quant_group_size=8)
    memory = compressor.compress(ids(30))
    loaded = Memory.load(memory.save(tmp_path / "ctx.mem"))
    assert loaded.kind == "latent_kv" and loaded.nbytes == memory.nbytes
    prompt = ids(4, seed=5)
    torch.testing.assert_close(decode_logits(compressor, loaded, prompt, 2), decode_logits(compressor, memory, prompt, 2))
    cache = compressor.memory_cache(memory)
    with pytest.raises(RuntimeError, match="compressor.reading"):
        compressor.base_lm(input_ids=prompt, **with_cache(cache))
    other = make(tiny, density=0.25, window=4, quant_bits=4, quant_group_size=8)
    with pytest.raises(ValueError, match="another format"):
        other.decoder_forward(memory, prompt, torch.ones_like(prompt))


# ----- training -------------------------------------------------------------------------------
def train_steps(compressor, steps: int = 8) -> list[dict]:
    """``steps`` Adam steps of the reconstruction loss on two rows (the second padded); each step's outputs."""
    optimizer = torch.optim.Adam([p for p in compressor.parameters() if p.requires_grad], lr=3e-3)
    batch, mask = ids(32, seed=7, batch=2), torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    outs = []
    for _ in range(steps):
        out = compressor(input_ids=batch, attention_mask=mask)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        outs.append({k: v.detach() for k, v in out.items()})
    return outs


def test_reconstruction_training_moves_only_the_factors(tiny) -> None:
    compressor = make(tiny, density=0.25, quant_bits=4, quant_group_size=8).train()
    trainable = {n for n, p in compressor.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("factors.") for n in trainable)
    base = {k: v.clone() for k, v in compressor.base_lm.state_dict().items()}
    factors = {k: v.clone() for k, v in compressor.own_state_dict().items()}
    losses = [float(out["loss"]) for out in train_steps(compressor)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, compressor.base_lm.state_dict()[k]) for k, v in base.items())
    assert all(not torch.equal(v, compressor.own_state_dict()[k]) for k, v in factors.items())


# ----- export ---------------------------------------------------------------------------------
def test_export_reloads_identically_and_refuses_another_shape(tiny, tmp_path) -> None:
    compressor = make(tiny, density=0.5, window=4, quant_bits=8, quant_group_size=8)
    with torch.no_grad():
        for p in compressor.factors.parameters():
            p.add_(0.01 * torch.randn_like(p))  # as if trained
    _, tokenizer = tiny()
    save_compressor(compressor, tmp_path / "cskv", tokenizer)
    meta = json.loads((tmp_path / "cskv" / "compressor_config.json").read_text())
    assert meta["compressor_type"] == "cskv" and meta["memory_kind"] == "latent_kv"
    model, _ = tiny()
    loaded, _ = load_compressor(tmp_path / "cskv", model=model, tokenizer=tokenizer)
    prompt, context = ids(4, seed=2), ids(30)
    torch.testing.assert_close(decode_logits(loaded, loaded.compress(context), prompt),
                               decode_logits(compressor, compressor.compress(context), prompt), atol=0, rtol=0)
    other, _ = tiny(hidden_size=32, head_dim=8, intermediate_size=64)
    with pytest.raises(BaseModelMismatchError, match="different shape"):
        load_compressor(tmp_path / "cskv", model=other, tokenizer=tokenizer)


def test_cache_object_is_a_transformers_cache(tiny) -> None:
    compressor = make(tiny, density=0.5, window=2)
    memory = compressor.compress(ids(10))
    cache = compressor.memory_cache(memory, repeat=3)
    assert isinstance(cache, CSKVCache) and cache.batch_size == 3
    assert cache.get_seq_length() == 10 and cache.get_mask_sizes(1, 0) == (11, 0)
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.tensors()["latent_k.1"].shape[0] == 2 and cache.positions.shape == (2, 10)


# ----- the recipe -----------------------------------------------------------------------------
RECIPE_ARGS = [
    "--config", str(ROOT / "recipes/configs/cskv/quickstart.yaml"), "--model_name_or_path", "tiny-random-llama",
    "--train_samples", "16", "--train_tokens", "32", "--calibration_samples", "4", "--density", "0.5",
    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2", "--warmup_steps", "0",
    "--num_eval_samples", "0", "--eval_context_tokens", "48", "--max_steps", "12", "--quant_bits", "4",
]


def test_killed_recipe_resumes_and_exports_a_reloadable_compressor(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    spec = importlib.util.spec_from_file_location("recipe_cskv", ROOT / "recipes" / "cskv.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up there
    spec.loader.exec_module(recipe)
    args = [*RECIPE_ARGS, "--output_dir", str(out)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "cskv.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to clean up, as in a real crash
    _, stderr = proc.communicate()
    assert first.is_file(), f"the run never wrote its first checkpoint: {stderr[-2000:]}"
    assert not (out / "compressor_config.json").exists(), "the run finished before it could be killed"
    # Resume in this process (saves an interpreter start-up): the run continues from its checkpoint.
    from accelerate.state import AcceleratorState

    try:
        recipe.main(*recipe.make_parser().parse_args_and_config(args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests get a fresh accelerate state
    printed = capsys.readouterr().out
    assert "resuming from " in printed and "reloads and generates identically" in printed
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == sorted(steps) and steps[-1] == 12
    assert all("key_mse" in e and "value_mse" in e for e in state["log_history"] if "loss" in e)
    clm = CompressedLM.from_pretrained(out)
    memory = clm.compress("The pass key is 12345. Remember it.")
    assert memory.kind == "latent_kv" and memory.meta["cskv"]["quant_bits"] == 4
