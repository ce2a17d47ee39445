"""A TRL ``DPOTrainer`` with CoLoR's length penalty (Seo et al., ACL 2025, arXiv 2412.18232).

Two losses, chosen with ``ColorDPOConfig.color_loss``; both scale the preference log-ratio of a pair
by the length gap between the rejected and the chosen compression, as CoLoR's released code does
(``custom_orpo_trainer.py``)::

    s = max(c * (|y_l| - |y_w|), 1)          # c = length_penalty_coef = 0.1; |y| = completion tokens

- ``"orpo"`` (default; what the released code trains with, on top of TRL's ORPOTrainer): reference
  free. With ``m_w, m_l`` the *mean* per-token log-probabilities of chosen / rejected,
  ``log_odds = (m_w - m_l) - (log(1 - e^{m_w}) - log(1 - e^{m_l}))`` and
  ``loss = NLL(y_w) + beta * mean(-log sigmoid(s * log_odds))``; rewards are ``beta * m``.
- ``"dpo"``: DPO with the same scale on the reference-relative margin,
  ``loss = -log sigmoid(beta * s * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))``
  (summed log-probabilities; the reference is the base model with the LoRA adapter disabled);
  rewards are ``beta * (log pi - log ref)``.

What the paper describes and what the code does: the paper trains with odds-ratio preference
optimization (ORPO) and adds a length regularization on top to enforce brevity; the released code
implements that regularization not as an added loss term but as the multiplicative factor ``s``
on the log-odds ratio above (pairs whose chosen is much shorter than the rejected weigh more; the
factor is never below 1, so a longer chosen is never penalised). ``"orpo"`` follows the code; one
difference: the code's NLL term, inherited from the TRL ORPOTrainer of its time, also covers the
prompt tokens, while here it covers the chosen completion only (as in the ORPO paper). ``"dpo"``
applies the code's factor to DPO's margin: the variant this project's issue asked for, neither the
paper's nor the code's objective.

Logged besides TRL's DPO metrics: ``rewards/margins`` (and chosen / rejected / accuracies) in the
convention of the loss in use, ``length/chosen``, ``length/rejected`` and ``length/scale`` of the
batch, ``log_odds`` and ``nll`` (orpo), and every ``length_probe_steps`` steps
``length/policy_compressed``: the mean length of the policy's own greedy compressions of a few
fixed held-out prompts (the quantity the length penalty is meant to shrink).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.trainer_utils import SchedulerType
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from ctxzip.trainers.compat import PretokenizedPreferences
from ctxzip.trainers.distributed import trainable_state
from ctxzip.trainers.guards import FiniteLossMixin

from .compressor import generate_completions

COLOR_LOSSES = ("orpo", "dpo")


def length_scale(chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, coef: float = 0.1) -> torch.Tensor:
    """``max(coef * (|y_l| - |y_w|), 1)``, per pair (CoLoR's released code)."""
    gap = (rejected_tokens.float() - chosen_tokens.float()) * coef
    return torch.clamp(gap, min=1.0)


def length_penalized_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                              ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                              beta: float = 0.1, coef: float = 0.1,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and (chosen, rejected) rewards; inputs are summed sequence log-probabilities."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    scale = length_scale(chosen_tokens, rejected_tokens, coef).to(chosen_ratio.dtype)
    losses = -F.logsigmoid(beta * scale * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log_odds_ratio(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor) -> torch.Tensor:
    """``log(odds(y_w) / odds(y_l))`` with odds = p / (1 - p) and log p the mean token log-probability."""
    def log1m_exp(x: torch.Tensor) -> torch.Tensor:  # log(1 - e^x) for x < 0, stable near 0
        x = torch.clamp(x, max=-1e-6)
        return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    return (mean_chosen - mean_rejected) - (log1m_exp(mean_chosen) - log1m_exp(mean_rejected))


def length_penalized_orpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor,
                               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, coef: float = 0.1,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair odds-ratio losses ``-log sigmoid(s * log_odds)`` and the scaled log-odds.

    The total ORPO loss is ``nll + beta * losses.mean()`` (the trainer adds the NLL of the chosen).
    """
    scaled = length_scale(chosen_tokens, rejected_tokens, coef).to(mean_chosen.dtype) * log_odds_ratio(
        mean_chosen, mean_rejected)
    return -F.logsigmoid(scaled), scaled


def _default(name: str, value: Any) -> Any:
    """DPOConfig's field ``name`` with another default and its own help (so ``--help`` still explains it)."""
    parent = DPOConfig.__dataclass_fields__[name]
    return field(default=value, metadata=dict(parent.metadata))


@dataclass
class ColorDPOConfig(DPOConfig):
    """``DPOConfig`` + CoLoR's loss settings, with defaults for a CPU quickstart of ``recipes/color_dpo.py``.

    ``beta`` is DPO's beta for ``color_loss="dpo"`` and ORPO's lambda (the weight of the odds-ratio
    term) for ``"orpo"``; the released CoLoR code trains ORPO with 2.5.
    """

    color_loss: str = field(default="orpo", metadata={"help": "orpo (released code, reference-free) or dpo"})
    length_penalty_coef: float = field(default=0.1, metadata={"help": "c in max(c * (|y_l| - |y_w|), 1)"})
    length_probe_steps: int = field(default=10, metadata={"help": "log the policy's compressed length every N "
                                                                   "steps (0 = never)"})
    length_probe_max_new_tokens: int = field(default=48, metadata={
        "help": "longest greedy compression the length probe generates, in tokens"})
    # quickstart defaults (a YAML or the command line overrides any of them); each keeps DPOConfig's help
    output_dir: str | None = _default("output_dir", "out/color-smollm2")
    beta: float = _default("beta", 2.5)
    learning_rate: float = _default("learning_rate", 5.0e-4)
    per_device_train_batch_size: int = _default("per_device_train_batch_size", 4)
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps", 1)
    num_train_epochs: float = _default("num_train_epochs", 1.0)
    lr_scheduler_type: SchedulerType | str = _default("lr_scheduler_type", "cosine")
    warmup_steps: float = _default("warmup_steps", 2)
    logging_steps: float = _default("logging_steps", 2)
    save_steps: float = _default("save_steps", 10)
    save_total_limit: int | None = _default("save_total_limit", 2)
    report_to: None | str | list[str] = _default("report_to", "none")
    max_length: int | None = _default("max_length", 512)
    # TRL turns it on by default; tiny CPU runs need no memory saving
    activation_checkpointing: bool | None = _default("activation_checkpointing", False)
    gradient_checkpointing: bool | None = _default("gradient_checkpointing", None)  # deprecated alias
    bf16: bool = _default("bf16", False)
    seed: int = _default("seed", 0)
    # The data stages run on the main process while the others wait at a barrier bounded by this timeout
    # (trainers.distributed.main_process_first); transformers' default of 30 min is short for real scale.
    ddp_timeout: int = _default("ddp_timeout", 6 * 3600)

    def __post_init__(self) -> None:
        if self.color_loss not in COLOR_LOSSES:
            raise ValueError(f"color_loss must be one of {COLOR_LOSSES}, got {self.color_loss!r}")
        if self.length_penalty_coef < 0:
            raise ValueError("length_penalty_coef must be >= 0")
        if not self.use_cpu and not torch.cuda.is_available():
            # Without it, accelerate's DeepSpeed state on a CPU-only machine counts 1 process per rank
            # and DeepSpeed's batch check fails under `--num_processes 2` (train_batch_size 4 != 4 * 1 * 2).
            self.use_cpu = True
        super().__post_init__()


def completion_log_probs(model: Any, model_kwargs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Log-probability of each next token, ``(batch, length - 1)`` (zero where ``labels`` is -100), and the outputs.

    Only the completions are scored. On a Triton device TRL's fused LM head projects exactly the labelled
    positions; elsewhere it projects every position, prompt included, and on a CPU that full-vocabulary head
    was most of the step. There the logits are asked for the last positions only (``logits_to_keep``, from
    the earliest completion of the batch on), a few times fewer than the whole sequence.
    """
    device = labels.device
    if device.type == "cuda":
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        return outputs.log_probs[:, -(labels.shape[1] - 1):].float(), outputs
    labelled = (labels != -100).any(0).nonzero()
    start = max(1, int(labelled[0])) if len(labelled) else labels.shape[1] - 1
    outputs = model(**model_kwargs, logits_to_keep=labels.shape[1] - start + 1)
    targets = labels[:, start:]
    logprobs = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
    kept = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == -100, 0.0)
    per_token = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=kept.dtype, device=device)
    per_token[:, start - 1:] = kept
    return per_token, outputs


class ColorDPOTrainer(FiniteLossMixin, PretokenizedPreferences, DPOTrainer):
    """``DPOTrainer`` whose loss is CoLoR's length-penalised ORPO or DPO (see the module docstring).

    Train a LoRA adapter: pass the base model with ``peft_config`` (optionally 4-bit). Rows may be
    pre-tokenized (``prompt_ids``/``chosen_ids``/``rejected_ids``, as ``compressors.color.data.make_pairs``
    writes them: the exact tokens the policy generated) or TRL's text preference format.
    ``length_probe`` is a list of prompt token-id lists for the compressed-length probe.
    """

    def __init__(self, *args: Any, length_probe: list[list[int]] | None = None, **kwargs: Any) -> None:
        # CoLoR's metrics per mode, averaged into the logs (TRL keeps its own in a private attribute).
        self.color_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)
        self.color_loss = getattr(self.args, "color_loss", "orpo")
        self.length_coef = getattr(self.args, "length_penalty_coef", 0.1)
        self.length_probe = length_probe or []
        self._last_probe_step = -1

    # ----- data ---------------------------------------------------------------------------
    def prepare_pretokenized(self, dataset: Any, args: Any) -> Any:
        """Pre-tokenized rows are used as they are (their tokens are exactly what the policy wrote)."""
        keep = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in dataset.column_names]
        dataset = dataset.select_columns(keep)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
        return dataset

    # ----- loss ---------------------------------------------------------------------------
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """CoLoR's loss in place of DPO's (the batch is TRL's: chosen rows, then rejected rows)."""
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:].to(torch.float32)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        model_kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                        "use_cache": False}
        per_token, outputs = completion_log_probs(model, model_kwargs, labels)
        sums = (per_token * shift_mask).sum(1)
        tokens = shift_mask.sum(1)
        chosen_sum, rejected_sum = sums.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        metrics: dict[str, torch.Tensor] = {}
        if self.color_loss == "orpo":
            mean_chosen = chosen_sum / chosen_tokens.clamp(min=1)
            mean_rejected = rejected_sum / rejected_tokens.clamp(min=1)
            losses, scaled = length_penalized_orpo_loss(mean_chosen, mean_rejected, chosen_tokens, rejected_tokens,
                                                        self.length_coef)
            nll = -chosen_sum.sum() / chosen_tokens.sum().clamp(min=1)
            loss = nll + self.beta * losses.mean()
            chosen_rewards, rejected_rewards = self.beta * mean_chosen.detach(), self.beta * mean_rejected.detach()
            metrics.update(nll=nll.detach(), log_odds=scaled.detach().mean())
        else:
            ref_chosen, ref_rejected = self._reference_logps(inputs, model_kwargs, labels, shift_mask)
            losses, chosen_rewards, rejected_rewards = length_penalized_dpo_loss(
                chosen_sum, rejected_sum, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, self.beta,
                self.length_coef)
            loss = losses.mean()
        scale = length_scale(chosen_tokens, rejected_tokens, self.length_coef)
        gather = self.accelerator.gather_for_metrics
        log = self.color_metrics[mode]
        log["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        log["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        log["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        log["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        log["logps/chosen"].append(gather(chosen_sum.detach()).mean().item())
        log["logps/rejected"].append(gather(rejected_sum.detach()).mean().item())
        log["length/chosen"].append(gather(chosen_tokens).mean().item())
        log["length/rejected"].append(gather(rejected_tokens).mean().item())
        log["length/scale"].append(gather(scale).mean().item())
        for key, value in metrics.items():
            log[key].append(gather(value.reshape(1)).mean().item())
        if return_outputs:
            return loss, outputs
        return loss

    def _reference_logps(self, inputs: dict[str, Any], model_kwargs: dict[str, Any], labels: torch.Tensor,
                         shift_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with torch.no_grad():
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None) \
                    if hasattr(unwrapped, "peft_config") else contextlib.nullcontext()
                with context:
                    per_token, _ = completion_log_probs(self.model, model_kwargs, labels)
            else:
                per_token, _ = completion_log_probs(self.ref_model, model_kwargs, labels)
        sums = (per_token * shift_mask).sum(1)
        chosen, rejected = sums.chunk(2)
        return chosen, rejected

    # ----- logging ------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "" if mode == "train" else "eval_"
        logs.update({f"{prefix}{key}": sum(values) / len(values)
                     for key, values in self.color_metrics[mode].items() if values})
        self.color_metrics[mode].clear()
        steps = getattr(self.args, "length_probe_steps", 0)
        step = self.state.global_step
        due = self._last_probe_step < 0 or step - self._last_probe_step >= steps  # first log, then every N steps
        if self.model.training and "loss" in logs and steps and self.length_probe and due and self._can_probe():
            self._last_probe_step = step
            logs["length/policy_compressed"] = self.probe_length()
        super().log(logs, start_time)

    def _can_probe(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_world_process_zero() and not (plugin is not None and plugin.zero_stage == 3)

    def probe_length(self) -> float:
        """Mean length (tokens) of the policy's greedy compressions of the probe prompts."""
        model = self.accelerator.unwrap_model(self.model)
        max_new = getattr(self.args, "length_probe_max_new_tokens", 48)
        rows = generate_completions(model, self.length_probe, self.processing_class, max_new_tokens=max_new)
        return round(sum(len(r) for r in rows) / max(1, len(rows)), 2)

    # ----- export -------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained (LoRA) tensors, gathered from every process when sharded (ZeRO-3): a collective."""
        return trainable_state(self.accelerator.unwrap_model(self.model))
