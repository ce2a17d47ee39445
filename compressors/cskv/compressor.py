"""The CSKV compressor: low-rank K/V channel shrinking with a bi-branch cache.

Paper: Wang et al. 2024, "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context
Scenarios" (arXiv 2409.10593); related: Palu (Chang et al. 2024, arXiv 2407.21118).

Faithful: ``k_proj`` / ``v_proj`` factored into down / up projections with rank set by a density,
SVD or ASVD init, a bi-branch cache (latents of old tokens, full K/V of a recent window),
optional low-bit latents, training of the factors only by layer-wise K/V reconstruction (MSE),
with fake quantization (straight-through) when ``quant_bits`` is set. As in the paper's code, a
prefill attends with the exact keys / values of its own tokens; the cache then keeps latents.
Different: one joint latent per layer for all KV heads (as in the paper's code, not Palu's
per-head groups); with ``key_space="pre_rope"`` keys are stored before RoPE and rotated after reconstruction
(Palu-style) so that the latent is position-free; with ``key_space="post_rope"`` (beyond the paper) a key latent
projects the rotated key onto query-weighted principal directions calibrated at random positions
(``factorization.query_weighted_factors``), so that a decode step scores queries against latents in rank space
(``reference.decode_attention_rank_space``, fused CPU kernels in ``cpu_kernel.py``) and never rebuilds a key; 8 / 4-bit latents use per-token groups of channels (the paper uses
KIVI-style per-channel keys over token blocks); the recipe configs keep every value channel
(``value_density: 1.0``) where the paper shrinks K and V alike (benchmarks/results/cskv_ablation).
Beyond the paper (Llama / Mistral): on a layer with a key norm after ``k_proj`` (Qwen3 per head,
OLMo2 over all heads) the latent is still ``down(x)``, and a reconstructed key goes through the
layer's own ``k_norm`` before RoPE, as the layer computes its keys (exact at full rank); the
reconstruction loss then compares keys after the norm, what the cache holds.
A layer whose attention the fused decode step does not compute (a key norm; logit soft-capping,
Gemma2) decodes through the model's own attention function over keys and values reconstructed from
the latents. A fused ``qkv_proj`` (Phi3) and partial rotary embeddings are refused
(``UnsupportedModelError``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..attention import attention_modules, head_counts, norm_keys, overriding_attention, unsupported
from ..base import Compressor, DecoderStep, memory_prefix, register_compressor
from ..compat import with_cache
from ..memory import Memory
from ..models import whole_parameters
from .attention import LatentReader
from .cache import CacheSpec, CSKVCache, LayerSpec
from .config import CSKVConfig, rank_for
from .factorization import (
    InputStatistics,
    KeyStatistics,
    LowRankKV,
    asvd_scale,
    query_weighted_factors,
    rotation_invariant_factors,
)
from .quant import fake_quantize

# RoPE variants whose cos / sin are cos / sin(position * inv_freq) * attention_scaling.
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def factorable_attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every decoder layer, checked to have separate ``k_proj`` / ``v_proj`` linear
    layers CSKV can factor (Llama, Qwen2/3, Mistral, Gemma2, OLMo2; a key norm after ``k_proj`` is allowed).
    Anything else is refused with an ``UnsupportedModelError`` naming the family and the reason."""
    modules = attention_modules(model)
    for index, attn in enumerate(modules):
        missing = [n for n in ("k_proj", "v_proj", "head_dim") if not hasattr(attn, n)]
        if missing and isinstance(getattr(attn, "qkv_proj", None), nn.Module):
            raise unsupported(CSKVCompressor.compressor_type, model, "its attention computes queries, keys and values "
                              "with one fused qkv_proj; CSKV factors separate k_proj / v_proj layers")
        if missing:
            raise unsupported(CSKVCompressor.compressor_type, model, f"layer {index} attention "
                              f"({type(attn).__name__}) lacks {missing}; CSKV factors separate k_proj / v_proj layers")
        for name in ("k_proj", "v_proj"):
            weight = getattr(getattr(attn, name), "weight", None)
            if weight is None or not weight.is_floating_point() or hasattr(weight, "quant_state"):
                raise ValueError(f"layer {index} {name} is not a plain float linear layer (a quantized base "
                                 "model cannot be factored; load it in float)")
        if getattr(attn, "k_norm", None) is not None:  # checked here, not at the first reconstruction
            norm_keys(attn, attn.k_proj.weight.new_zeros(1, head_counts(attn)[1] * attn.head_dim),
                      CSKVCompressor.compressor_type, model)
    return modules


def rope_type(model: PreTrainedModel) -> str:
    params = getattr(model.config, "rope_parameters", None) or {}
    return str(params.get("rope_type", getattr(model.model.rotary_emb, "rope_type", "default")))


@register_compressor
class CSKVCompressor(Compressor):
    compressor_type = "cskv"
    config_class = CSKVConfig
    memory_kind = "latent_kv"

    def __init__(self, config: CSKVConfig, model: PreTrainedModel) -> None:
        model.requires_grad_(False)  # only the factors train
        super().__init__(config, model)
        attns = factorable_attention_modules(self.base_lm)
        kind = rope_type(self.base_lm)
        if kind not in _ROPE_TYPES:
            raise unsupported(self.compressor_type, self.base_lm, f"CSKV rotates reconstructed keys with RoPE of "
                              f"type {list(_ROPE_TYPES)}; this model uses {kind!r}")
        rotated = 2 * self.base_lm.model.rotary_emb.inv_freq.numel()
        if rotated != attns[0].head_dim:
            raise unsupported(self.compressor_type, self.base_lm, f"its rotary embedding turns {rotated} of the "
                              f"{attns[0].head_dim} channels of a head (partial rotary); CSKV rotates whole heads")
        self.factors = nn.ModuleList()
        for attn, (key_density, value_density) in zip(attns, config.densities(len(attns))):
            k_proj, v_proj = attn.k_proj, attn.v_proj
            factors = LowRankKV(k_proj.in_features, k_proj.out_features,
                                rank_for(key_density, k_proj.out_features),
                                rank_for(value_density, v_proj.out_features), bias=k_proj.bias is not None,
                                post_rope=config.post_rope)
            factors.to(device=k_proj.weight.device, dtype=k_proj.weight.dtype)
            if config.post_rope:  # calibrated, not trained (``forward`` says why)
                factors.k.requires_grad_(False)
            self.factors.append(factors)
        self._attention = tuple(attns)  # a tuple: not registered again as submodules
        self._installed_depth = 0
        self._installed_stack: contextlib.ExitStack | None = None
        # a layer's k_norm (Qwen3: per head; OLMo2: over all heads), applied to reconstructed keys before RoPE
        key_norms = [functools.partial(norm_keys, attn, method=self.compressor_type, model=self.base_lm)
                     if getattr(attn, "k_norm", None) is not None else None for attn in attns]
        self.reader = LatentReader(self.factors, self.rope, key_norms=key_norms, post_rope=config.post_rope)
        self.initialize_svd()

    # ----- factors ------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_svd(self, input_scales: list[torch.Tensor] | None = None) -> None:
        """(Re)set every factor pair from the base projections: SVD, or ASVD with ``input_scales``."""
        for index, (attn, factors) in enumerate(zip(self._attention, self.factors)):
            scale = None if input_scales is None else input_scales[index]
            with whole_parameters(*attn.k_proj.parameters(), *attn.v_proj.parameters()):
                if self.compressor_config.post_rope:
                    # Until calibrated: the key space's top principal directions of k_proj's output
                    u = torch.linalg.svd(attn.k_proj.weight.detach().float(), full_matrices=False)[0]
                    basis = u[:, : factors.k.rank]
                    factors.k.set_factors(basis.T, basis)
                else:
                    factors.k.initialize(attn.k_proj.weight, attn.k_proj.bias, scale)
                factors.v.initialize(attn.v_proj.weight, attn.v_proj.bias, scale)

    @torch.no_grad()
    def activation_means(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                         ) -> tuple[list[torch.Tensor], int]:
        """Mean |x| per input channel of every layer's ``k_proj`` (``v_proj`` reads the same x) over
        calibration ``(input_ids, attention_mask)`` batches, and the number of tokens seen."""
        stats = InputStatistics([attn.k_proj for attn in self._attention])
        tokens = 0
        try:
            for ids, mask in batches:
                ids = ids.to(self.device)
                mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
                stats.mask = mask
                self.decoder_model(input_ids=ids, attention_mask=mask, use_cache=False)
                tokens += int(mask.sum())
        finally:
            stats.remove()
        if tokens == 0:
            raise ValueError("ASVD calibration needs at least one token")
        return stats.means(), tokens

    def calibrate_asvd(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                       means: list[torch.Tensor] | None = None) -> int:
        """ASVD init from calibration batches (or from precomputed ``means``); returns the tokens seen."""
        tokens = 0
        if means is None:
            means, tokens = self.activation_means(batches)
        self.initialize_svd([asvd_scale(m, self.compressor_config.asvd_alpha) for m in means])
        return tokens

    @torch.no_grad()
    def key_statistics(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], seed: int = 0,
                       ) -> KeyStatistics:
        """Second moments of every layer's rotated keys and queries over calibration ``(input_ids, attention_mask)``
        batches, each row placed at a random position offset (seeded) so that the rotations seen span positions
        up to ``max_context_tokens``."""
        stats = KeyStatistics(len(self._attention))
        generator = torch.Generator().manual_seed(seed)
        masks: list[torch.Tensor | None] = [None]

        def capture(index: int):  # noqa: ANN202
            def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, fallback: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
                stats.add(index, query, key, masks[0])
                return fallback(module, query, key, value, attention_mask, **kwargs)
            return attend

        with overriding_attention(self.base_lm, {attn: capture(i) for i, attn in enumerate(self._attention)}):
            for ids, mask in batches:
                ids = ids.to(self.device)
                mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
                room = max(1, self.compressor_config.max_context_tokens - ids.shape[1] + 1)
                offsets = torch.randint(0, room, (ids.shape[0], 1), generator=generator).to(self.device)
                positions = torch.arange(ids.shape[1], device=self.device)[None] + offsets
                masks[0] = mask
                self.decoder_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                stats.tokens += int(mask.sum())
        if stats.tokens == 0:
            raise ValueError("post-RoPE key calibration needs at least one token")
        return stats

    @torch.no_grad()
    def calibrate_keys(self, stats: KeyStatistics, input_scales: list[torch.Tensor] | None = None) -> None:
        """Set the post-RoPE key factors (``post_rope_factors`` says how).

        ``rotation_invariant``: the keys' second moment is ``k_proj``'s, ``W S^2 W^T (+ b b^T)``, with ``S`` the
        input scaling ASVD uses (``input_scales``; none: plain ``W W^T``), as pre-RoPE ASVD keeps ``W S``; the
        queries' energy per head and frequency comes from ``stats``. ``pca``: both moments from ``stats``."""
        if not self.compressor_config.post_rope:
            raise ValueError("calibrate_keys sets post-RoPE key factors; this compressor has key_space='pre_rope'")
        for index, (attn, factors, (keys, queries)) in enumerate(zip(self._attention, self.factors, stats.moments())):
            if self.compressor_config.post_rope_factors == "pca":
                factors.k.set_factors(*query_weighted_factors(keys, queries, factors.k.rank))
                continue
            with whole_parameters(*attn.k_proj.parameters()):
                weight = attn.k_proj.weight.detach().double()
                if input_scales is not None:
                    weight = weight * input_scales[index].detach().double().to(weight.device)[None, :]
                moment = weight @ weight.T
                if attn.k_proj.bias is not None:
                    moment = moment + torch.outer(attn.k_proj.bias.double(), attn.k_proj.bias.double())
            factors.k.set_factors(*rotation_invariant_factors(moment.cpu(), queries.cpu(), factors.k.rank))

    def calibrate(self, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> int:
        """Every calibration the config asks for (ASVD scales, post-RoPE key factors); returns the tokens seen."""
        cfg, tokens, means, stats = self.compressor_config, 0, None, None
        # The passes run the whole base model: under ZeRO-3 its weights are shards until gathered here. The
        # factorizations below gather the projections they read themselves (contexts may not overlap).
        with whole_parameters(*self.base_lm.parameters()):
            if cfg.init == "asvd":
                means, tokens = self.activation_means(batches)
            if cfg.post_rope:
                stats = self.key_statistics(batches)
                tokens = stats.tokens
        scales = None if means is None else [asvd_scale(m, cfg.asvd_alpha) for m in means]
        if scales is not None:
            self.initialize_svd(scales)
        if stats is not None:
            self.calibrate_keys(stats, scales)
        return tokens

    @property
    def decoder_model(self) -> nn.Module:
        """The base model without its LM head (prefill and training need no logits)."""
        return self.base_lm.model

    @property
    def key_ranks(self) -> list[int]:
        return [f.k.rank for f in self.factors]

    @property
    def value_ranks(self) -> list[int]:
        return [f.v.rank for f in self.factors]

    def rope(self) -> tuple[torch.Tensor, float]:
        rotary = self.base_lm.model.rotary_emb
        return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))

    def cache_spec(self) -> CacheSpec:
        attn = self._attention[0]
        kv_heads = attn.k_proj.out_features // attn.head_dim
        cfg = self.compressor_config
        layers = tuple(LayerSpec(f.k.rank, f.v.rank, kv_heads, attn.head_dim) for f in self.factors)
        return CacheSpec(layers, cfg.window, cfg.quant_bits, cfg.quant_group_size, self.base_lm.dtype)

    def new_cache(self, batch: int) -> CSKVCache:
        return CSKVCache(self.cache_spec(), batch, self.device, self.reader)

    # ----- the attention path ---------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The model can read and write CSKV caches (re-entrant; ``attention.py`` says how)."""
        if self._installed_depth == 0:
            stack = contextlib.ExitStack()
            # post-RoPE key latents are made from the rotated keys in the cache update, not from k_proj's input
            branches = ("v",) if self.compressor_config.post_rope else ("k", "v")
            for index, attn in enumerate(self._attention):
                for branch in branches:
                    projection = getattr(attn, f"{branch}_proj")
                    stack.callback(projection.register_forward_hook(self.reader.latent_hook(index, branch)).remove)
            stack.enter_context(overriding_attention(
                self.base_lm, {attn: self.reader.attention_override(index) for index, attn in enumerate(self._attention)}))
            self._installed_stack = stack
            self.reader.installed = True
        self._installed_depth += 1
        try:
            yield
        finally:
            self._installed_depth -= 1
            if self._installed_depth == 0:
                self.reader.installed = False
                self.reader.latents.clear()
                self.reader.requests.clear()
                stack, self._installed_stack = self._installed_stack, None
                stack.close()

    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        with self.installed():
            yield

    # ----- encoder ------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """Prefill ``context_ids`` (left padding allowed) into the bi-branch cache; a ``latent_kv`` Memory."""
        attention_mask = self.check_context(context_ids, attention_mask)
        cache = self.new_cache(context_ids.shape[0])
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache.stage_positions(positions)
        with self.installed():
            self.decoder_model(input_ids=context_ids, attention_mask=attention_mask, position_ids=positions,
                               use_cache=True, **with_cache(cache))
        return self.memory_from_cache(cache, attention_mask)

    def memory_from_cache(self, cache: CSKVCache, attention_mask: torch.Tensor) -> Memory:
        """The ``latent_kv`` Memory of a filled cache (``attention_mask``: its context's mask)."""
        tensors = cache.tensors()
        if not bool(attention_mask.bool().all()):
            tensors["slot_mask"] = attention_mask.to(torch.int8)
        real = attention_mask.long().sum(-1).tolist()
        full = cache.full_cache_nbytes()
        meta = {"cskv": self.memory_format(), "full_kv_nbytes": full,
                "kv_reduction": 1.0 - sum(t.numel() * t.element_size() for t in tensors.values()) / full}
        return self.new_memory(tensors, source_tokens=real, slots=attention_mask.shape[1], position_offset=real,
                               meta=meta)

    def memory_format(self) -> dict[str, Any]:
        cfg = self.compressor_config
        made = {"key_ranks": self.key_ranks, "value_ranks": self.value_ranks, "window": cfg.window,
                "quant_bits": cfg.quant_bits, "quant_group_size": cfg.quant_group_size}
        if cfg.post_rope:  # absent for pre-RoPE keys, so that memories saved before the option still load
            made["key_space"] = cfg.key_space
        return made

    def memory_cache(self, memory: Memory, repeat: int = 1) -> CSKVCache:
        """A fresh cache holding a ``latent_kv`` memory (decoding mutates caches: never share one)."""
        if memory.kind != "latent_kv":
            raise ValueError(f"a CSKV compressor reads latent_kv memories, not {memory.kind!r}")
        memory.check_base(self.base_signature)
        made = memory.meta.get("cskv")
        if made != self.memory_format():
            raise ValueError(f"this memory was made by a CSKV compressor with another format ({made}); this "
                             f"one has {self.memory_format()}")
        tensors = {k: v for k, v in memory.tensors.items() if k != "slot_mask"}
        return CSKVCache.from_tensors(self.cache_spec(), tensors, repeat=repeat, reader=self.reader)

    # ----- decoder ------------------------------------------------------------------------
    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True, prompt_lengths: torch.Tensor | None = None) -> DecoderStep:
        self.check_memory(memory)
        memory = memory.expand(input_ids.shape[0])
        full_mask, position_ids = memory_prefix(memory, attention_mask)
        cache = self.memory_cache(memory)
        cache.stage_positions(position_ids)
        with self.installed():
            out = self.base_lm(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                               use_cache=True, **with_cache(cache))
        return DecoderStep(logits=out.logits, cache=cache, attention_mask=full_mask,
                           next_position=position_ids[:, -1] + 1, memory_tokens=memory.real_slots)

    # ----- training: layer-wise K/V reconstruction ------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> dict[str, Any]:
        """Layer-wise reconstruction loss: sum over layers of the MSE between the base model's keys
        (before RoPE; RoPE is a rotation, so the error is the same after it) and values and their
        reconstructions ``up(down(x))`` from the same inputs; latents are fake-quantized (straight
        through) when ``quant_bits`` is set. Post-RoPE key factors are calibrated, not trained (``key_mse`` is 0):
        training texts sit at the first positions, and fitting rotated keys there would fit those positions. The base
        model runs frozen; only the factors get gradients.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(self.device)
        count = mask.sum().clamp(min=1)
        cfg = self.compressor_config
        key_losses: dict[int, torch.Tensor] = {}
        value_losses: dict[int, torch.Tensor] = {}

        def mse(target: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
            err = (estimate.float() - target.detach().float()).pow(2).sum(-1)
            return (err * mask).sum() / (count * target.shape[-1])

        def reconstruct(projection: nn.Module, x: torch.Tensor) -> torch.Tensor:
            latent = fake_quantize(projection.down(x), cfg.quant_bits, cfg.quant_group_size)
            return projection.up(latent)

        def on_k(index: int):  # noqa: ANN202
            norm = self.reader.key_norms[index]

            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                estimate = reconstruct(self.factors[index].k, args[0].detach())
                if norm is not None:  # the keys the cache holds: after the layer's key norm
                    out, estimate = norm(out).flatten(-2), norm(estimate).flatten(-2)
                key_losses[index] = mse(out, estimate)
            return hook

        def on_v(index: int):  # noqa: ANN202
            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                value_losses[index] = mse(out, reconstruct(self.factors[index].v, args[0].detach()))
            return hook

        handles = []
        for index, attn in enumerate(self._attention):
            if not cfg.post_rope:
                handles.append(attn.k_proj.register_forward_hook(on_k(index)))
            handles.append(attn.v_proj.register_forward_hook(on_v(index)))
        try:
            # The base model is frozen and its inputs need no gradient, so autograd records only
            # the factor computations made in the hooks.
            self.decoder_model(input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        layers = len(self._attention)
        if len(key_losses) != (0 if cfg.post_rope else layers) or len(value_losses) != layers:
            raise RuntimeError(f"reconstruction losses from {len(key_losses)} / {len(value_losses)} of {layers} layers")
        key_loss = torch.stack(list(key_losses.values())).sum() if key_losses else torch.zeros((), device=self.device)
        value_loss = torch.stack(list(value_losses.values())).sum()
        return {"loss": key_loss + value_loss, "key_mse": key_loss.detach(), "value_mse": value_loss.detach()}
