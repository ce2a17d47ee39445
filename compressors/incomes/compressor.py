"""InComeS: edits compressed into the keys/values of one gist token each, read through a selection branch.

Paper: Li et al. 2025, "InComeS: Integrating Compression and Selection Mechanisms into LLMs for Efficient
Model Editing" (arXiv 2505.22156); public code Syon-Li/InComeS.

How it works here. An edit ("The capital of Veloria is Tarsen.") is read as bare text followed by one gist
token, whose embedding is this compressor's own parameter (the vocabulary is never resized; it starts at
the mean word embedding, as the public code). In the gist layers (default: the upper half, layers >= L/2)
the gist position's key and value become the edit's pool entry. Edits are compressed independently (one
forward over a batch of edits), so an entry never depends on the other edits, and a pool is a union:
``Memory.cat`` appends entries and the order of entries never changes what the decoder computes.

The decoder reads the plain conversation (the chat template's prefix, kept as text, then the prompt) and in
every gist layer its attention adds a second branch before ``o_proj``:
``softmax(q [z_l; K_pool]^T * scaling) [0; V_pool]``, with ``z_l`` a learned "zero gist" key per layer and KV
head whose value is zero: attending to it selects no edit. The branch is a function registered through
transformers' ``AttentionInterface`` (``compressors.attention``), so the modeling code is not forked; the
queries are the layer's own (rotated) queries. With an empty pool the branch is skipped and the model is
exactly the model without it; entries that are padding (a ``slot_mask``) are never read. Tokens never read
a gist of their own input: the edits' pass has no pool and the query pass has no gist token (the public
code masks the same thing inside one sequence).

Gist keys are taken *before* rotary embedding (the output of ``k_proj``, or the key part of a fused ``qkv_proj``
(Phi3), then of ``k_norm`` when the layer has one, per head (Qwen3) or over all heads (OLMo2)) while the queries
are rotated, as the public code does (``gist_key_rope: false``, the default); ``gist_key_rope: true`` keeps the
rotated key at the gist's own position instead.

The memory (kind ``pool``): ``key.{layer}`` / ``value.{layer}`` ``[rows, entries, kv_heads, head_dim]`` for
each gist layer, ``edit_id`` ``[rows, entries]`` (a stable 63-bit hash of each edit's tokens: which edit an
entry came from) and ``slot_mask`` when rows hold different numbers of entries. ``compress`` gives one row
per edit (the contract); ``CompressedLM.compress([...])`` unites the edits into one pool (what it does for
every ``pool`` memory). A pool records the gist layers and ``gist_key_rope`` and is refused by a compressor
configured otherwise (or built on another base); one made by a differently trained compressor of the same
configuration is not detected. ``nbytes`` per edit on SmolLM2-135M (15 gist layers, 3 KV heads of 64) in fp32:
15 x 2 x 3 x 64 x 4 + 8 = 23,048 bytes. Its ratio is edit tokens per entry.

Training (``compressors.incomes.trainer``): one pool per batch (the batch's edits plus distractors, the pool size
drawn per step), shared by its queries, as the public code's chunks; the loss is the paper's
``sum_t w_t CE_t / #(w_t != 0) + KL(p_teacher || p_student)`` with ``w_t = 0.5 relu(log pT(x_t | edit) -
log pT(x_t))``, the teacher being the frozen base reading the edit in context (``distillation_loss``).

Faithful: one gist per edit, gist K/V of the upper half of the layers, pre-RoPE gist keys against rotated
queries (flag), the zero gist per layer and KV head (randn init), the selection branch added before
``o_proj``, separate edit and query passes, the weighted CE + KL objective over the same tokens as the public
code (weighted CE on the answer, KL on the question and the answer), pools of several sizes per step.
Not faithful: the base (SmolLM2-135M-Instruct, not Llama-3.2-1B), the data (offline counterfactual edits,
or zsRE / CounterFact records; not the paper's mixture of s2orc, QA and editing sets) and the scale; the
texts sit in the chat layout (the edit as the user turn's context for the teacher) instead of the public
code's ``BOS edit "\\n" query``; ``train_mode: lora`` (the CPU quickstart) trains LoRA adapters instead of the
whole model (``train_mode: upper`` fully trains the gist layers; the paper trains every layer); the
eval-time temperature of 0.45 on the gist logits for pools over 10 entries is not applied; the teacher
without the edit reads the student's own input (prefix, prompt), not the bare query.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..adapters import ALL_PROJECTIONS, LoraSettings, add_named_lora
from ..attention import Override, attention_modules, key_projection, norm_keys, overriding_attention
from ..base import Compressor, CompressorConfig, DecoderStep, register_compressor, template_prefix_before
from ..compat import cache_of
from ..memory import Memory
from ..models import whole_parameters

TRAIN_MODES = ("lora", "upper")


@dataclass
class InComeSConfig(CompressorConfig, LoraSettings):
    """Hyper-parameters of the InComeS compressor."""

    max_context_tokens: int = field(default=128, metadata={
        "help": "longest edit a compress() call accepts, in tokens (the public code drops edits over 128)"})
    gist_layers: list[int] = field(default_factory=list, metadata={
        "help": "decoder layers whose gist keys/values form the pool and whose attention reads it (empty: the "
                "upper half, layers >= L/2, as the paper)"})
    gist_key_rope: bool = field(default=False, metadata={
        "help": "rotate the gist keys at the gist's position (False: keys before rotary embedding against rotated "
                "queries, as the public code)"})
    max_pool_entries: int = field(default=4096, metadata={
        "help": "most entries a pool the decoder reads may hold (a larger pool is refused with an error)"})
    train_mode: str = field(default="lora", metadata={
        "help": "lora: LoRA adapters on every layer (the frozen base is the teacher); upper: the gist layers train "
                "fully (a frozen copy of the base is the teacher)"})
    lora_r: int = field(default=16, metadata={"help": "rank of the LoRA adapter (train_mode lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / rank)"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS), metadata={
        "help": "modules of the base model that get LoRA layers"})

    def __post_init__(self) -> None:
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        if self.max_pool_entries < 1:
            raise ValueError("max_pool_entries must be >= 1")
        if self.train_mode == "lora" and self.lora_r < 1:
            raise ValueError("train_mode lora needs lora_r >= 1")


@register_compressor
class InComeSCompressor(Compressor):
    compressor_type = "incomes"
    config_class = InComeSConfig
    memory_kind = "pool"
    compresses_template = False  # an edit is read as bare text; the decoder keeps the template's prefix as text
    card_note = ("InComeS (arXiv 2505.22156), for model editing: `clm.compress([edit, ...])` makes one `pool` memory "
                 "of the edits (one gist key/value entry per edit in each upper layer), `pool.cat(clm.compress([...]))` "
                 "adds edits, `clm.generate(question, memory=pool)` answers with them. Distilled from the frozen base "
                 "reading each edit in context; what is and is not faithful to the paper is in ctxzip's "
                 "`compressors/incomes/compressor.py`.")

    def __init__(self, config: InComeSConfig, model: PreTrainedModel) -> None:
        depth = model.config.num_hidden_layers
        gist_layers = sorted(set(config.gist_layers or range(depth // 2, depth)))
        if any(not 0 <= i < depth for i in gist_layers):
            raise ValueError(f"gist_layers {config.gist_layers} must be decoder layers 0..{depth - 1}")
        teacher = None
        if config.train_mode == "upper":
            teacher = frozen_copy(model)
            model.requires_grad_(False)
            layers = model.get_decoder().layers
            for i in gist_layers:
                layers[i].requires_grad_(True)
        elif not hasattr(model, "peft_config"):
            model = add_named_lora(model, {"default": config.lora_r}, config)
        super().__init__(config, model)
        self.gist_layers = gist_layers
        # a frozen submodule (train_mode upper): moved and partitioned with the compressor, never saved or trained
        self.teacher_model = teacher
        base = self.base_lm.config
        embed = self.base_lm.get_input_embeddings()
        heads = base.num_attention_heads
        kv_heads = getattr(base, "num_key_value_heads", None) or heads
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // heads
        # an nn.Embedding read by calling it: under ZeRO-3 only the module's forward gathers its weight
        self.gist_embedding = nn.Embedding(1, embed.embedding_dim)
        with whole_parameters(embed.weight), torch.no_grad():
            self.gist_embedding.weight.copy_(embed.weight.float().mean(0, keepdim=True))
        self.kv_heads, self.head_dim = kv_heads, head_dim
        # one zero-gist key per gist layer and KV head (randn, as the public code); an nn.Embedding read by calling
        # it, like the gist embedding (a bare parameter read outside any forward is an empty shard under ZeRO-3)
        self.zero_keys = nn.Embedding(len(gist_layers), kv_heads * head_dim)
        nn.init.normal_(self.zero_keys.weight, generator=torch.Generator().manual_seed(0))
        self.gist_embedding.to(device=embed.weight.device, dtype=embed.weight.dtype)
        self.zero_keys.to(device=embed.weight.device, dtype=embed.weight.dtype)
        if not config.gist_key_rope:  # refused here, not at the first compress: no key projection to read
            modules = attention_modules(self.base_lm)
            for i in gist_layers:
                key_projection(modules[i], self.compressor_type, self.base_lm)

    # ----- what is saved and which model teaches ------------------------------------------------
    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The gist embedding and zero keys, and with ``train_mode: upper`` the gist layers' weights (LoRA
        adapters are saved as a PEFT adapter)."""
        state = self.state_dict()
        own = {k: v for k, v in state.items() if k.startswith(("gist_embedding.", "zero_keys."))}
        if self.compressor_config.train_mode == "upper":
            trained = {name for name, p in self.named_parameters() if p.requires_grad}
            own.update({k: v for k, v in state.items() if k in trained})
        return own

    @contextlib.contextmanager
    def plain_base(self) -> Iterator[None]:
        """The base without the LoRA adapter (``train_mode: upper`` trains the base's own layers: there is no
        adapter to take off; its frozen copy is ``teacher()``)."""
        if self.compressor_config.train_mode == "upper":
            yield
            return
        with self.model.disable_adapter():
            yield

    def release_training_state(self) -> None:
        """A loaded ``train_mode: upper`` compressor drops its frozen copy of the base (only training reads it):
        half the weights held at inference."""
        self.teacher_model = None

    @contextlib.contextmanager
    def teacher(self) -> Iterator[PreTrainedModel]:
        """The frozen base model that reads edits in context: the base without the LoRA adapter, or the copy
        kept by ``train_mode: upper``."""
        if self.teacher_model is not None:
            yield self.teacher_model
            return
        if self.compressor_config.train_mode == "upper":  # its copy was released (release_training_state)
            raise RuntimeError("this train_mode: upper compressor was loaded for use and released its teacher copy; "
                               "to train it further, start a new one from the export (--init_from)")
        with self.plain_base():
            yield self.base_lm

    def zero_key(self, index: int) -> torch.Tensor:
        """The zero gist's key of gist layer ``index``: ``[kv_heads, head_dim]``."""
        ids = torch.tensor([index], device=self.zero_keys.weight.device)
        return self.zero_keys(ids).view(self.kv_heads, self.head_dim)

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """One pool row per edit (``[edits, length]``, bare text, left padding allowed): each row holds its
        edit's gist keys/values in every gist layer. ``Memory.cat`` / ``pooled()`` unite rows into pools."""
        attention_mask = self.check_context(context_ids, attention_mask)
        batch = context_ids.shape[0]
        embeds = self.base_lm.get_input_embeddings()(context_ids)
        gist = self.gist_embedding(torch.zeros(batch, 1, dtype=torch.long, device=context_ids.device))
        inputs = torch.cat([embeds, gist.to(embeds.dtype)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        captured: dict[str, torch.Tensor] = {}
        with self._capturing_gists(captured):
            self.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=1)
        tensors = {name: captured[name] for layer in self.gist_layers for name in (f"key.{layer}", f"value.{layer}")}
        tensors = {name: t[:, None] for name, t in tensors.items()}  # [rows, 1 entry, kv_heads, head_dim]
        tensors["edit_id"] = torch.tensor([[edit_hash(ids[m.bool()])] for ids, m in zip(context_ids, attention_mask)],
                                          device=context_ids.device)
        meta = self.pool_meta()
        return self.new_memory(tensors, source_tokens=attention_mask.sum(-1).tolist(), slots=1,
                               position_offset=[len(meta["prefix_ids"])] * batch, meta=meta)

    @contextlib.contextmanager
    def _capturing_gists(self, captured: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside, a forward over rows that end with the gist stores its key and value in every gist layer."""
        modules = attention_modules(self.base_lm)
        rope = self.compressor_config.gist_key_rope

        def capture(layer: int) -> Override:
            def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, fallback: Callable[..., Any], **kwargs: Any) -> Any:
                captured[f"value.{layer}"] = value[:, :, -1]
                if rope:
                    captured[f"key.{layer}"] = key[:, :, -1]
                return fallback(module, query, key, value, attention_mask, **kwargs)
            return attend

        def unrotated_key(layer: int, attention: nn.Module, keys_of: Callable[..., torch.Tensor],
                          ) -> Callable[..., None]:
            def hook(projection: nn.Module, args: Any, output: torch.Tensor) -> None:
                # the gist's keys as the layer rotates them: after its k_norm when it has one (Qwen3, OLMo2)
                captured[f"key.{layer}"] = norm_keys(attention, keys_of(output[:, -1]), self.compressor_type,
                                                     self.base_lm)
            return hook

        hooks = []
        if not rope:
            for i in self.gist_layers:
                projection, keys_of = key_projection(modules[i], self.compressor_type, self.base_lm)
                hooks.append(projection.register_forward_hook(unrotated_key(i, modules[i], keys_of)))
        try:
            with overriding_attention(self.base_lm, {modules[i]: capture(i) for i in self.gist_layers}):
                yield
        finally:
            for handle in hooks:
                handle.remove()

    def empty_pool(self) -> Memory:
        """A pool of no edits: the decoder reading it is exactly the model without the selection branch."""
        reference = self.gist_embedding.weight
        tensors = {name: reference.new_zeros(1, 0, self.kv_heads, self.head_dim)
                   for layer in self.gist_layers for name in (f"key.{layer}", f"value.{layer}")}
        tensors["edit_id"] = torch.zeros(1, 0, dtype=torch.long, device=reference.device)
        meta = self.pool_meta()
        return self.new_memory(tensors, source_tokens=[0], slots=0, position_offset=[len(meta["prefix_ids"])],
                               meta=meta)

    def pool_meta(self) -> dict[str, Any]:
        """What a pool records of the compressor that made it: the decoder's text prefix, and the configuration
        its entries depend on (``check_memory`` refuses a pool whose configuration differs)."""
        prefix = self.layout.prefix_ids if self.layout is not None else []
        return {"prefix_ids": list(prefix), "gist_layers": list(self.gist_layers),
                "gist_key_rope": self.compressor_config.gist_key_rope}

    # ----- decoder ------------------------------------------------------------------------
    def check_memory(self, memory: Memory) -> None:
        super().check_memory(memory)
        if memory.meta.get("gist_layers") != self.gist_layers:
            raise ValueError(f"this pool holds gists of layers {memory.meta.get('gist_layers')}, this InComeS "
                             f"compressor reads layers {self.gist_layers}: it was made by another configuration")
        rope = memory.meta.get("gist_key_rope", self.compressor_config.gist_key_rope)  # (absent in older pools)
        if rope != self.compressor_config.gist_key_rope:
            raise ValueError(f"this pool's gist keys were taken {'after' if rope else 'before'} rotary embedding "
                             f"(gist_key_rope={rope}), this compressor reads gist_key_rope="
                             f"{self.compressor_config.gist_key_rope} keys: it was made by another configuration")
        if memory.slots > self.compressor_config.max_pool_entries:
            raise ValueError(f"a pool of {memory.slots} entries is larger than max_pool_entries="
                             f"{self.compressor_config.max_pool_entries} of this compressor (raise it in the config "
                             "to read larger pools)")

    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        """While active, the gist layers' attention adds the selection branch over ``memory``'s entries
        (``None`` or an empty pool: nothing is added)."""
        if memory is None or memory.slots == 0:
            yield
            return
        self.check_memory(memory)
        modules = attention_modules(self.base_lm)
        overrides = {modules[layer]: self._selection(index, layer, memory) for index, layer in enumerate(self.gist_layers)}
        with overriding_attention(self.base_lm, overrides):
            yield

    def _selection(self, index: int, layer: int, memory: Memory) -> Override:
        keys, values = memory.tensors[f"key.{layer}"], memory.tensors[f"value.{layer}"]
        mask = memory.slot_mask().bool()

        def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Any, fallback: Callable[..., Any], **kwargs: Any) -> Any:
            out, weights = fallback(module, query, key, value, attention_mask, **kwargs)
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            branch = selection_branch(query, keys.to(query.device), values.to(query.device), mask.to(query.device),
                                      self.zero_key(index), scaling)
            return out + branch.transpose(1, 2).to(out.dtype), weights

        return attend

    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True, prompt_lengths: torch.Tensor | None = None) -> DecoderStep:
        """The template prefix (as text), then the input rows; the gist layers read the pool."""
        self.check_memory(memory)
        ids, mask, positions, prefix = template_prefix_before(memory, input_ids, attention_mask)
        out = self.base_lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
        return DecoderStep(logits=out.logits[:, prefix:], cache=cache_of(out) if use_cache else None,
                           attention_mask=mask, next_position=positions[:, -1] + 1, memory_tokens=memory.real_slots)

    # ----- training -------------------------------------------------------------------------
    def forward(self, context_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, context_mask: torch.Tensor | None = None,
                teacher_ids: torch.Tensor | None = None, teacher_mask: torch.Tensor | None = None,
                teacher_offsets: torch.Tensor | None = None, **_: Any) -> dict[str, Any]:
        """Distillation on one batch: ``context_ids`` are the pool's edits (the batch's own and distractors,
        one pool shared by every row); rows ``input_ids`` (prompt + reply, right-padded, ``labels`` on the
        reply) are read by the student after the pool, and ``teacher_ids`` (the template prefix, the row's edit
        as context, then the same prompt + reply from ``teacher_offsets``) by the frozen teacher."""
        if teacher_ids is None or teacher_mask is None or teacher_offsets is None:
            raise ValueError("InComeS trains by distillation: the batch needs teacher_ids, teacher_mask and "
                             "teacher_offsets (compressors.incomes.trainer.EditCollator makes them)")
        with self.encoding():
            pool = self.compress(context_ids, context_mask).pooled()
        with self.reading(pool):
            student = self.decoder_forward(pool, input_ids, attention_mask, use_cache=False).logits
        with torch.no_grad(), self.teacher() as teacher:
            with_edit = teacher(input_ids=teacher_ids, attention_mask=teacher_mask).logits
            index = (teacher_offsets[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device))
            with_edit = with_edit.gather(1, index.clamp(max=with_edit.shape[1] - 1)[..., None].expand(
                -1, -1, with_edit.shape[-1]))
            plain_ids, plain_mask, positions, prefix = template_prefix_before(pool, input_ids, attention_mask)
            without_edit = teacher(input_ids=plain_ids, attention_mask=plain_mask, position_ids=positions).logits[:, prefix:]
        losses, parts = distillation_loss(student, with_edit, without_edit, labels, attention_mask)
        return {"loss": losses.mean(), "per_example_loss": losses, "ratio": pool.ratio,
                "metrics": {"pool_entries": float(pool.slots), **{k: float(v.mean()) for k, v in parts.items()}}}


def selection_branch(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     zero_key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``softmax(q [z; K]^T * scaling) [0; V]`` per query head: ``[batch, heads, q_len, head_dim]``.

    ``query`` ``[batch, heads, q_len, head_dim]``; ``keys`` / ``values`` ``[rows, entries, kv_heads, head_dim]``
    (rows 1 or batch); ``mask`` ``[rows, entries]`` (True: a real entry); ``zero_key`` ``[kv_heads, head_dim]``.
    Query head h reads KV head ``h // (heads / kv_heads)`` (grouped-query attention). Softmax in fp32.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = keys.shape[2]
    grouped = query.float().view(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    keys = keys.float().permute(0, 2, 1, 3).expand(batch, -1, -1, -1)  # [batch, kv_heads, entries, head_dim]
    values = values.float().permute(0, 2, 1, 3).expand(batch, -1, -1, -1)
    pool_scores = torch.einsum("bkgqd,bked->bkgqe", grouped, keys) * scaling
    pool_scores = pool_scores.masked_fill(~mask.expand(batch, -1)[:, None, None, None, :], float("-inf"))
    zero_scores = torch.einsum("bkgqd,kd->bkgq", grouped, zero_key.float())[..., None] * scaling
    weights = torch.softmax(torch.cat([zero_scores, pool_scores], dim=-1), dim=-1)[..., 1:]  # the zero gist reads 0
    out = torch.einsum("bkgqe,bked->bkgqd", weights, values)
    return out.reshape(batch, heads, q_len, head_dim).to(query.dtype)


def distillation_loss(student: torch.Tensor, with_edit: torch.Tensor, without_edit: torch.Tensor,
                      labels: torch.Tensor, attention_mask: torch.Tensor,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InComeS's loss per row: ``sum_t w_t CE_t / #(w_t != 0)`` over the labelled tokens, plus the mean over
    every real next token (prompt and reply) of ``KL(p_teacher || p_student)``.

    ``w_t = 0.5 relu(log pT(x_t | edit) - log pT(x_t))``: how much reading the edit raises the teacher's
    probability of the token. Logits ``[batch, tokens, vocab]`` are aligned on the same rows; position t
    predicts token t + 1. Returns the per-row loss and its parts (``weighted_ce``, ``kl``, ``weight_mean``).
    """
    targets = labels[:, 1:]
    labelled = targets != -100
    real = attention_mask[:, 1:].bool()
    log_student = F.log_softmax(student[:, :-1].float(), dim=-1)
    log_teacher = F.log_softmax(with_edit[:, :-1].float(), dim=-1)
    log_plain = F.log_softmax(without_edit[:, :-1].float(), dim=-1)
    safe = targets.clamp(min=0)[..., None]
    gain = (log_teacher.gather(-1, safe) - log_plain.gather(-1, safe)).squeeze(-1)
    weights = (0.5 * torch.relu(gain) * labelled).detach()
    cross_entropy = -log_student.gather(-1, safe).squeeze(-1)
    weighted_ce = (weights * cross_entropy).sum(-1) / (weights != 0).sum(-1).clamp(min=1)  # 0, not 0/0, without gain
    kl_tokens = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    kl = (kl_tokens * real).sum(-1) / real.sum(-1).clamp(min=1)
    weight_mean = (weights.sum(-1) / labelled.sum(-1).clamp(min=1))
    return weighted_ce + kl, {"weighted_ce": weighted_ce.detach(), "kl": kl.detach(), "weight_mean": weight_mean}


def edit_hash(token_ids: torch.Tensor) -> int:
    """A stable 63-bit id of an edit's tokens (which edit a pool entry came from)."""
    digest = hashlib.blake2b(bytes(str(token_ids.tolist()), "utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of ``model``: ``deepcopy``, or, for a model DeepSpeed ZeRO-3 partitioned at construction
    (which cannot be copied), the same checkpoint loaded again (partitioned the same way)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        copied = type(model).from_pretrained(model.config.name_or_path, dtype=model.dtype)
    else:
        copied = copy.deepcopy(model)
    return copied.requires_grad_(False).eval()
