"""Every registered method on every common decoder family, or a clear refusal naming both.

Tiny random models (2 layers, d=64, GQA 4:2; ``compressors.models.tiny_decoder``) of Llama, Qwen2 (q/k/v biases),
Qwen3 (per-head q/k norms), Mistral (sliding window), Gemma2 (alternating sliding / global layers, soft-capping,
eager attention), Phi3 (one fused ``qkv_proj``) and OLMo2 (q/k norms over all heads), with the project's tokenizer.
Each method, untrained and small as ``test_contract`` builds it, compresses a short context and generates a few
tokens from its memory; where the method keeps the full context (ratio 1, or CSKV at full rank), that is exactly
plain ``model.generate`` on the conversation. A (method, family) pair the method cannot do is listed in
``REFUSED`` with the reason: building it raises a ``CtxzipError`` naming the method and the family, so that a new
failure (or a refusal that is no longer needed) fails here.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from test_contract import RATIO_ONE, build, gen, plain_generate, settings
from test_cskv import decode_logits, full_cache_logits

from ctxzip.compressors import COMPRESSORS, TINY_MODEL, load_base
from ctxzip.compressors.conversation import ConversationLayout
from ctxzip.compressors.errors import CtxzipError
from ctxzip.compressors.models import TINY_FAMILIES, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = sorted(TINY_FAMILIES)
METHODS = sorted(COMPRESSORS)
CONTEXT = "The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 3
PROMPT = "What is the pass key?"
TOKENS = 3

#: What a method cannot do on a family, and why (the words the refusal must say besides the method and family).
REFUSED: dict[tuple[str, str], str] = {
    # CSKV factors k_proj and v_proj into low-rank pairs and hooks them for the latents; Phi3 has one qkv_proj
    ("cskv", "phi3"): "fused qkv_proj",
}

#: The settings at which a method keeps the whole context: ``test_contract``'s ratio-1 settings, and CSKV at full
#: rank with a window over the whole context (its cache then holds exactly the model's keys and values).
FULL_CONTEXT = {**RATIO_ONE, "cskv": {"density": 1.0, "window": 4096}}


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(TINY_MODEL)[1]


@functools.cache
def _prototype(family: str, vocab_size: int):
    return tiny_decoder(family, vocab_size=vocab_size, initializer_range=0.2).eval()


def family_model(family: str, tokenizer):
    """A fresh tiny model of ``family`` whose greedy tokens depend on the context (a larger init, as
    ``test_contract.sensitive_tiny``): a copy of one built once (copying is ten times faster than a random init)."""
    return copy.deepcopy(_prototype(family, len(tokenizer)))


def family_settings(method: str, family: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``test_contract``'s small settings, with each family's own calibration artifact."""
    config = settings(method, tmp_path_factory)
    folder = tmp_path_factory.getbasetemp() / "families"
    for key in ("filters_path", "heads_path"):
        if key in config:
            config[key] = str(folder / f"{method}-{family}.safetensors")
    return config


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_compresses_and_generates_on_family(method: str, family: str, tokenizer, tmp_path_factory) -> None:
    config = family_settings(method, family, tmp_path_factory)
    if (method, family) in REFUSED:
        with pytest.raises(CtxzipError) as refusal:
            build(method, config, (family_model(family, tokenizer), tokenizer))
        message = str(refusal.value).lower()
        assert method in message and family in message and REFUSED[method, family] in message, message
        return
    clm = build(method, config, (family_model(family, tokenizer), tokenizer))
    memory = clm.compress(CONTEXT)
    assert memory.batch_size == 1 and memory.slots > 0
    answer = gen(clm, [PROMPT], memory, TOKENS)
    assert len(answer) == 1 and len(answer[0]) == TOKENS


FULL_PAIRS = [(m, f) for m in sorted(FULL_CONTEXT) for f in FAMILIES if (m, f) not in REFUSED]


@pytest.mark.parametrize(("method", "family"), FULL_PAIRS)
def test_full_context_generates_exactly_what_plain_generation_does(method: str, family: str, tokenizer,
                                                                    tmp_path_factory) -> None:
    model = family_model(family, tokenizer)
    calibrated = method in ("qfilters", "ehpc")
    config = {**(family_settings(method, family, tmp_path_factory) if calibrated else {}), **FULL_CONTEXT[method]}
    clm = build(method, config, (model, tokenizer))
    memory = clm.compress(CONTEXT)
    assert memory.ratio == pytest.approx(1.0) or method not in RATIO_ONE
    ids = ConversationLayout(tokenizer).conversation_ids(PROMPT, CONTEXT)
    assert gen(clm, [PROMPT], memory, TOKENS)[0] == plain_generate(model, ids, TOKENS)


@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if ("cskv", f) not in REFUSED])
def test_cskv_full_rank_latents_reproduce_the_model(family: str, key_space: str, tokenizer) -> None:
    """With no window every past key and value is read back from its latent (pre-RoPE keys normed, as the layer
    norms them, then rotated; post-RoPE latents hold keys after both): at full rank that is the model's own cache."""
    from ctxzip.compressors.cskv import CSKVCompressor, CSKVConfig

    compressor = CSKVCompressor(CSKVConfig(density=1.0, window=0, key_space=key_space),
                                family_model(family, tokenizer)).eval()
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(3, 2000, (1, 24), generator=generator)
    prompt = torch.randint(3, 2000, (1, 4), generator=generator)
    got = decode_logits(compressor, compressor.compress(context), prompt, steps=2)
    want = full_cache_logits(compressor.base_lm, context, prompt, steps=2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_overrides_change_nothing_they_do_not_override(family: str, tokenizer) -> None:
    """Switched to ctxzip's dispatching attention function, with no override or one that only catches the queries,
    every family computes exactly what it computes alone (for ``eager``, through its own modeling file's function:
    Gemma2's soft-caps its logits)."""
    from ctxzip.compressors.attention import QueryCapture, overriding_attention

    model = family_model(family, tokenizer)
    ids = torch.randint(3, 2000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = model(ids).logits
        with overriding_attention(model, {}):
            assert torch.equal(model(ids).logits, alone)
        with QueryCapture(model, 4) as catcher:
            assert torch.equal(model(ids).logits, alone)
    assert sorted(catcher.queries) == [0, 1] and catcher.queries[0].shape == (1, 4, 4, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_incomes_gist_keys_are_the_layers_keys_before_rotary_embedding(family: str, tokenizer) -> None:
    """InComeS's pre-RoPE gist key (from ``k_proj`` or a fused ``qkv_proj``, through the layer's key norm) rotated at
    the gist's position is the key the layer itself rotated there (``gist_key_rope: true``)."""
    from ctxzip.compressors import compressor_class
    from ctxzip.compressors.cskv.reference import apply_rope

    edit = torch.tensor([tokenizer("The capital of Veloria is Tarsen.", add_special_tokens=False)["input_ids"]])
    cls = compressor_class("incomes")
    pools = {}
    for rope in (False, True):
        compressor = cls(cls.config_class(lora_r=2, gist_key_rope=rope), family_model(family, tokenizer)).eval()
        with torch.no_grad(), compressor.encoding():
            pools[rope] = compressor.compress(edit)
    rotary = compressor.base_lm.get_decoder().rotary_emb
    cos, sin = rotary(pools[True].tensors["key.1"], torch.tensor([[edit.shape[1]]]))  # the gist follows the edit
    for layer in compressor.gist_layers:
        plain = pools[False].tensors[f"key.{layer}"][:, 0, :, None]  # [1, kv_heads, 1 token, head_dim]
        torch.testing.assert_close(apply_rope(plain, cos, sin)[:, :, 0], pools[True].tensors[f"key.{layer}"][:, 0])


def test_lora_targets_name_the_fused_projections_of_phi3() -> None:
    """A LoRA on q/k/v and the MLP lands on Phi3's fused qkv_proj and gate_up_proj; a name no family has is refused."""
    from ctxzip.compressors.adapters import ALL_PROJECTIONS, lora_targets
    from ctxzip.compressors.errors import UnsupportedModelError
    from ctxzip.compressors.models import tiny_decoder

    phi3, llama = tiny_decoder("phi3"), tiny_decoder("llama")
    assert lora_targets(phi3, list(ALL_PROJECTIONS)) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets(llama, list(ALL_PROJECTIONS)) == list(ALL_PROJECTIONS)
    with pytest.raises(UnsupportedModelError, match="no_such_proj"):
        lora_targets(llama, ["q_proj", "no_such_proj"])
