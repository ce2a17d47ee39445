"""The fused LM loss (trainers/fused_loss.py) against the plain loss it replaces.

- In process, with the ``torch`` backend: the plumbing (head as identity, shifting, ignored labels,
  per-example means, a compressor's forward, a causal LM's loss) gives the plain loss and gradients.
- Liger-Kernel's kernels under ``TRITON_INTERPRET=1`` in a fresh interpreter (triton decides at
  import whether it interprets, and the test session may have imported it already): the same
  values and gradients from the real fused path, for a raw hidden / head pair and a gist
  compressor. Skipped when liger-kernel or triton is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ctxzip.compressors.base import hidden_states_as_logits, per_example_lm_loss
from ctxzip.compressors.gist import GistCompressor, GistConfig
from ctxzip.compressors.models import tiny_llama
from ctxzip.trainers.fused_loss import (
    causal_lm_loss,
    compressor_lm_loss,
    liger_available,
    per_example_lm_loss_from_hidden,
)

ROOT = Path(__file__).resolve().parents[1]


def _labels(batch: int, steps: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, steps), generator=g)
    labels[0, :3] = -100
    labels[-1, -2:] = -100
    return labels


def test_torch_backend_matches_plain_loss_and_grads() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 97, bias=False)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    labels = _labels(3, 8, 97)
    labels[1] = -100  # an example without any label: loss 0, as the plain loss gives
    weights = torch.tensor([0.5, 1.0, 2.0])
    fused = per_example_lm_loss_from_hidden(hidden, head, labels, backend="torch")
    (fused * weights).sum().backward()
    grad_fused, hidden.grad = hidden.grad.clone(), None
    plain = per_example_lm_loss(head(hidden), labels)
    (plain * weights).sum().backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, hidden.grad)
    assert fused.detach()[1].item() == 0.0


def test_bad_inputs_are_clear_errors() -> None:
    head = nn.Linear(16, 97)
    with pytest.raises(ValueError, match="hidden size"):
        per_example_lm_loss_from_hidden(torch.randn(2, 5, 97), head, _labels(2, 5, 97), backend="torch")
    with pytest.raises(ValueError, match="backend"):
        per_example_lm_loss_from_hidden(torch.randn(2, 5, 16), head, _labels(2, 5, 97), backend="cuda")
    with pytest.raises(ValueError, match="labels"):
        per_example_lm_loss_from_hidden(torch.randn(2, 5, 16), head, _labels(2, 4, 97), backend="torch")


def test_head_is_identity_only_inside_the_context() -> None:
    model = tiny_llama(vocab_size=128)
    ids = torch.randint(3, 128, (1, 6))
    with hidden_states_as_logits(model) as head:
        with hidden_states_as_logits(model):  # re-entrant: the inner exit must not restore early
            pass
        hidden = model(input_ids=ids).logits
        assert head is model.get_output_embeddings()
    assert hidden.shape == (1, 6, model.config.hidden_size)
    assert "forward" not in vars(model.get_output_embeddings())
    torch.testing.assert_close(model(input_ids=ids).logits, head(hidden))


def _gist_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding in one context
    return {"context_ids": torch.randint(3, vocab, (2, 20), generator=g), "context_mask": mask, "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": _labels(2, 7, vocab, seed=2)}


def _trained_grads(compressor: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in compressor.named_parameters() if p.requires_grad and p.grad is not None}
    compressor.zero_grad(set_to_none=True)
    return grads


def test_compressor_loss_fused_path_matches_forward() -> None:
    compressor = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=8, lora_r=2), tiny_llama(vocab_size=128))
    batch = _gist_batch(128)
    plain = compressor(**batch)
    plain["loss"].backward()
    want = _trained_grads(compressor)
    fused = compressor_lm_loss(compressor, batch, fused=True, backend="torch")
    fused["loss"].backward()
    got = _trained_grads(compressor)
    torch.testing.assert_close(fused["per_example_loss"], plain["per_example_loss"])
    assert fused["ratio"] == plain["ratio"]
    assert want and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert compressor_lm_loss(compressor, batch, fused=False)["loss"].item() == pytest.approx(plain["loss"].item())


def test_causal_lm_loss_fused_path_matches_transformers_loss() -> None:
    model = tiny_llama(vocab_size=128)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = causal_lm_loss(model, ids, mask, labels, fused=True, backend="torch")
    torch.testing.assert_close(got, want)


_INTERPRETED_CHECK = r"""
import json, torch
from torch import nn
from ctxzip.compressors.base import hidden_states_as_logits, per_example_lm_loss
from ctxzip.compressors.gist import GistCompressor, GistConfig
from ctxzip.compressors.models import tiny_llama
from ctxzip.trainers.fused_loss import compressor_lm_loss, per_example_lm_loss_from_hidden

out = {}
torch.manual_seed(0)
head = nn.Linear(16, 300, bias=False)
hidden = torch.randn(3, 9, 16, requires_grad=True)
labels = torch.randint(0, 300, (3, 9)); labels[0, :3] = -100; labels[2, -2:] = -100
w = torch.tensor([0.5, 1.0, 2.0])
fused = per_example_lm_loss_from_hidden(hidden, head, labels, backend="liger")
(fused * w).sum().backward(); g_fused, hidden.grad = hidden.grad.clone(), None
plain = per_example_lm_loss(head(hidden), labels)
(plain * w).sum().backward()
out["raw_loss"] = float((fused - plain).abs().max())
out["raw_grad"] = float((g_fused - hidden.grad).abs().max())
out["raw_grad_scale"] = float(hidden.grad.abs().max())

compressor = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=8, lora_r=2), tiny_llama(vocab_size=300))
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 300, (2, 7), generator=g)
batch = {"context_ids": torch.randint(3, 300, (2, 20), generator=g), "context_mask": torch.ones(2, 20, dtype=torch.long),
         "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
a = compressor(**batch); a["loss"].backward()
want = {n: p.grad.clone() for n, p in compressor.named_parameters() if p.grad is not None}
compressor.zero_grad(set_to_none=True)
b = compressor_lm_loss(compressor, batch, fused=True, backend="liger"); b["loss"].backward()
got = {n: p.grad.clone() for n, p in compressor.named_parameters() if p.grad is not None}
out["gist_loss"] = float((a["per_example_loss"] - b["per_example_loss"]).abs().max())
out["gist_grad"] = max(float((got[n] - want[n]).abs().max()) for n in want)
out["gist_grads"] = len(want)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed (pip install liger-kernel)")
def test_liger_kernel_matches_plain_loss_under_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    diffs = json.loads(lines[-1][len("RESULT "):])
    assert diffs["raw_loss"] < 1e-5 and diffs["gist_loss"] < 1e-5, diffs
    assert diffs["raw_grad"] < 1e-5 * max(1.0, diffs["raw_grad_scale"]), diffs
    assert diffs["gist_grads"] > 0 and diffs["gist_grad"] < 1e-5, diffs


def _trainer(tiny, tmp_path: Path, **kwargs):
    import datasets
    from transformers import TrainingArguments

    from ctxzip.trainers import MemoryCollator, MemoryCompressorTrainer

    model, tokenizer = tiny()
    compressor = GistCompressor(GistConfig(segment_length=16, tokens_per_gist=4, lora_r=2), model)
    rows = [{"context": f"The pass key is {n}{n}{n}. Filler text follows.", "question": "What is the pass key?",
             "answer": f"{n}{n}{n}", "objective": "sft"} for n in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                             label_names=["labels"])
    trainer = MemoryCompressorTrainer(model=compressor, args=args, processing_class=tokenizer,
                                      train_dataset=datasets.Dataset.from_list(rows),
                                      data_collator=MemoryCollator(tokenizer, 64, 64), **kwargs)
    return trainer, trainer.data_collator(rows)


@pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed (pip install liger-kernel)")
def test_trainer_flag_routes_the_loss_through_hidden_states(tiny, tmp_path) -> None:
    """``fused_lm_loss=True`` hands the compressor a loss from hidden states; with that loss's torch
    backend (no Triton needed here) the trainer's loss is the plain one."""
    from functools import partial

    plain, batch = _trainer(tiny, tmp_path / "plain")
    fused, _ = _trainer(tiny, tmp_path / "fused", fused_lm_loss=True)
    assert fused.lm_loss is not None and fused.lm_loss.keywords == {"backend": "liger"}
    fused.lm_loss = partial(per_example_lm_loss_from_hidden, backend="torch")
    want = plain.compute_loss(plain.model, dict(batch))
    got = fused.compute_loss(fused.model, dict(batch))
    torch.testing.assert_close(got, want)


def test_trainer_flag_without_liger_is_a_clear_error(tiny, tmp_path, monkeypatch) -> None:
    import ctxzip.trainers.memory_trainer as memory_trainer

    monkeypatch.setattr(memory_trainer, "liger_available", lambda: False)
    with pytest.raises(ImportError, match="fused_lm_loss needs Liger-Kernel"):
        _trainer(tiny, tmp_path, fused_lm_loss=True)


def test_the_fused_loss_on_cpu_without_the_interpreter_names_the_flag(monkeypatch) -> None:
    """Triton has no CPU driver: the error says what to pass instead of Triton's "0 active drivers"."""
    from ctxzip.trainers.fused_loss import liger_available, per_example_lm_loss_from_hidden

    if not liger_available():
        pytest.skip("liger-kernel is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    head = torch.nn.Linear(8, 11, bias=False)
    with pytest.raises(RuntimeError, match="--fused_lm_loss false"):
        per_example_lm_loss_from_hidden(torch.randn(2, 5, 8), head, torch.randint(0, 11, (2, 5)), backend="liger")
