"""CSKV with post-RoPE key latents: exactness at full rank, the query-weighted factors, calibration, decoding in
rank space (fused CPU kernels against the reference), memories, training and export."""

from __future__ import annotations

import pytest
import torch
from test_cskv import decode_logits, full_cache_logits, ids, make, train_steps

from ctxzip.compressors import CompressedLM, Memory, load_compressor, save_compressor
from ctxzip.compressors.cskv import CSKVConfig
from ctxzip.compressors.cskv.factorization import query_weighted_factors, rotation_invariant_factors
from ctxzip.compressors.cskv.reference import apply_rope, rope_cos_sin

pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(tiny, **config):
    compressor = make(tiny, key_space="post_rope", max_context_tokens=512, **config)
    compressor.calibrate([(ids(48, seed=11, batch=2), None), (ids(40, seed=12), None)])
    return compressor


def test_key_space_is_validated() -> None:
    with pytest.raises(ValueError, match=r"key_space must be one of \['pre_rope', 'post_rope'\]"):
        CSKVConfig(key_space="after")
    with pytest.raises(ValueError, match=r"post_rope_factors must be one of \['rotation_invariant', 'pca'\]"):
        CSKVConfig(post_rope_factors="svd")


def moments(kv_heads: int = 2, head_dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(4000, kv_heads, head_dim, generator=generator) * torch.linspace(3, 0.1, head_dim)
    queries = torch.randn(4000, kv_heads, 3, head_dim, generator=generator) * torch.linspace(0.1, 3, head_dim)
    key_moment = keys.flatten(1).T.double() @ keys.flatten(1).double()
    return keys, queries, key_moment


@pytest.mark.parametrize("rank", [6, 7, 16])
def test_rotation_invariant_factors_commute_with_rope(rank) -> None:
    keys, queries, key_moment = moments()
    query_moment = torch.einsum("nkga,nkgb->kab", queries.double(), queries.double())
    down, up = rotation_invariant_factors(key_moment, query_moment, rank)
    assert down.shape == (rank, 16) and up.shape == (16, rank)
    torch.testing.assert_close(down @ up, torch.eye(rank), atol=1e-4, rtol=1e-4)  # a projection
    projection = up @ down
    rotated = keys[:50].transpose(0, 1)[None]  # [1, kv_heads, tokens, head_dim]
    cos, sin = rope_cos_sin(torch.arange(50)[None] * 37, 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    turned = apply_rope(rotated, cos, sin)

    def project(k: torch.Tensor) -> torch.Tensor:  # [1, heads, T, d] -> the same, through the factors
        flat = k[0].transpose(0, 1).reshape(-1, 16)
        return (flat @ projection.T).view(-1, 2, 8).transpose(0, 1)[None]

    if rank % 2 == 0:  # RoPE then project = project then RoPE
        torch.testing.assert_close(project(turned), apply_rope(project(rotated), cos, sin), atol=1e-4, rtol=1e-4)
    if rank == 16:
        torch.testing.assert_close(projection, torch.eye(16), atol=1e-4, rtol=1e-4)


def test_full_rank_post_rope_latents_reproduce_the_full_cache(tiny) -> None:
    compressor = calibrated(tiny, density=1.0, window=3)
    context, prompt = ids(40), ids(5, seed=1)
    memory = compressor.compress(context)
    assert memory.meta["cskv"]["key_space"] == "post_rope"
    assert memory.tensors["latent_k.0"].shape == (1, 37, 32)
    got = decode_logits(compressor, memory, prompt)
    want = full_cache_logits(compressor.base_lm, context, prompt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_query_weighted_factors_minimize_the_score_error() -> None:
    keys, queries, key_moment = moments()  # the queries read the keys' small channels
    query_moment = torch.einsum("nkga,nkgb->kab", queries.double(), queries.double())

    def score_error(down: torch.Tensor, up: torch.Tensor) -> float:
        error = (keys.flatten(1) - keys.flatten(1) @ down.T @ up.T).view(-1, 2, 8)
        return float(torch.einsum("nkgd,nkd->nkg", queries, error).pow(2).mean())

    weighted = query_weighted_factors(key_moment, query_moment, 6)
    plain = query_weighted_factors(key_moment, torch.eye(8).expand(2, 8, 8), 6)
    torch.testing.assert_close(plain[0], plain[1].T)  # identity queries: PCA
    assert score_error(*weighted) < 0.5 * score_error(*plain)
    down, up = query_weighted_factors(key_moment, query_moment, 16)
    torch.testing.assert_close(up @ down, torch.eye(16), atol=1e-4, rtol=1e-4)


def test_calibration_sets_the_key_factors_and_refuses_pre_rope(tiny) -> None:
    compressor = make(tiny, density=0.5, key_space="post_rope", max_context_tokens=512)
    before = compressor.factors[0].k.down.weight.clone()
    assert compressor.factors[0].k.down.weight.shape == (16, 32)  # a projection of the 32 key channels
    assert compressor.calibrate([(ids(48, seed=11, batch=2), None)]) == 96
    assert not torch.equal(before, compressor.factors[0].k.down.weight)
    asvd = make(tiny, density=0.5, key_space="post_rope", max_context_tokens=512, init="asvd")
    asvd.calibrate([(ids(48, seed=11, batch=2), None)])  # k_proj's moment scaled as ASVD scales it: another fit
    assert not torch.allclose(asvd.factors[0].k.down.weight, compressor.factors[0].k.down.weight)
    pre = make(tiny, density=0.5)
    with pytest.raises(ValueError, match="key_space='pre_rope'"):
        pre.calibrate_keys(compressor.key_statistics([(ids(8), None)]))


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_low_rank_post_rope_decodes_and_fused_equals_reference(tiny, bits, fused, monkeypatch) -> None:
    """The decode step (fused CPU kernels or not) equals the prefill path over the same cache."""
    monkeypatch.setenv("CTXZIP_DISABLE_KERNELS", "0" if fused == "1" else "1")
    compressor = calibrated(tiny, density=0.4, window=4, quant_bits=bits, quant_group_size=5)
    context = ids(37)
    memory = compressor.compress(context)
    token = ids(1, seed=3)
    mask = torch.ones(1, 1, dtype=torch.long)
    with compressor.reading(memory):
        step = compressor.decoder_forward(memory, token, mask).logits[:, -1]  # one new token: the decode path
        two = compressor.decoder_forward(memory, torch.cat([token, token], 1), torch.ones(1, 2, dtype=torch.long))
    # the prefill path (several new tokens) rebuilds the keys; its first position's logits read the same cache
    torch.testing.assert_close(step, two.logits[:, 0], atol=1e-4, rtol=1e-4)
    want = full_cache_logits(compressor.base_lm, context, ids(5, seed=1))
    got = decode_logits(compressor, memory, ids(5, seed=1))
    assert got.isfinite().all() and not torch.allclose(got, want, atol=1e-3)


def test_batched_padded_rows_save_load_and_generate(tiny, tmp_path) -> None:
    compressor = calibrated(tiny, density=0.5, window=6, quant_bits=8, quant_group_size=8)
    _, tokenizer = tiny()
    clm = CompressedLM(compressor, tokenizer)
    texts = ["The pass key is 4411. " * 6, "Short context about cats."]
    batched = clm.compress(texts)
    for row, text in enumerate(texts):
        single = clm.compress(text)
        assert clm.generate("What is the key?", memory=batched.select(row), max_new_tokens=6) == \
            clm.generate("What is the key?", memory=single, max_new_tokens=6)
    loaded = Memory.load(batched.save(tmp_path / "ctx.mem"))
    assert clm.generate("Key?", memory=loaded.select(0), max_new_tokens=4) == \
        clm.generate("Key?", memory=batched.select(0), max_new_tokens=4)
    pre = make(tiny, density=0.5, window=6, quant_bits=8, quant_group_size=8)
    with pytest.raises(ValueError, match="another format"):
        pre.decoder_forward(batched.select(0), ids(3), torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("fit", ["rotation_invariant", "pca"])
def test_both_fits_decode_close_to_the_full_cache_at_high_rank(tiny, fit) -> None:
    compressor = calibrated(tiny, density=0.9, window=2, post_rope_factors=fit)
    context, prompt = ids(40), ids(5, seed=1)
    got = decode_logits(compressor, compressor.compress(context), prompt)
    want = full_cache_logits(compressor.base_lm, context, prompt)
    low = calibrated(tiny, density=0.25, window=2, post_rope_factors=fit)
    worse = decode_logits(low, low.compress(context), prompt)
    assert (got - want).abs().mean() < (worse - want).abs().mean()


def test_training_moves_the_values_not_the_calibrated_keys_and_exports(tiny, tmp_path) -> None:
    compressor = calibrated(tiny, density=0.25, value_density=0.5, quant_bits=8, quant_group_size=8).train()
    assert not any(p.requires_grad for p in compressor.factors[0].k.parameters())
    factors = {k: v.clone() for k, v in compressor.own_state_dict().items()}
    outs = train_steps(compressor)
    assert all(float(out["key_mse"]) == 0.0 for out in outs)
    losses = [float(out["loss"]) for out in outs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    after = compressor.own_state_dict()
    assert all(torch.equal(v, after[k]) == (".k." in k) for k, v in factors.items())
    compressor.eval()
    _, tokenizer = tiny()
    save_compressor(compressor, tmp_path / "cskv", tokenizer)
    model, _ = tiny()
    loaded, _ = load_compressor(tmp_path / "cskv", model=model, tokenizer=tokenizer)
    context, prompt = ids(30), ids(4, seed=2)
    torch.testing.assert_close(decode_logits(loaded, loaded.compress(context), prompt),
                               decode_logits(compressor, compressor.compress(context), prompt), atol=0, rtol=0)
