"""Distillation from the full-context base: the teacher's batch is the conversation plain generation reads, the KL
vanishes when the student reads the whole context, its gradient reaches only what trains, and the trainer adds,
logs and checks it."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from ctxzip.compressors import CompressedLM, ContextTooLongError, GistCompressor, GistConfig
from ctxzip.compressors.base import per_example_kl
from ctxzip.compressors.baselines import FullContext, FullContextConfig
from ctxzip.trainers import MemoryCollator, MemoryCompressorTrainer
from ctxzip.trainers.fused_loss import per_example_lm_loss_from_hidden
from ctxzip.trainers.objectives import AUTOENCODING_PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"task": "passkey", "context": "The pass key is 48213. Remember it. Grass is green and the sky is blue.",
     "question": "What is the pass key?", "answer": "48213", "answer_prefix": "The pass key is"},
    {"task": "continuation", "context": "One, two, three, four,", "question": "", "answer": " five, six, seven."},
    {"task": "autoencoding", "context": "Cats sleep a lot.", "question": "", "answer": "Cats sleep a lot."},
]


def collate(tokenizer, rows=ROWS, **options) -> dict[str, torch.Tensor]:
    settings = {"max_context_tokens": 512, "max_target_tokens": 64, **options}
    return MemoryCollator(tokenizer, with_teacher=True, **settings)(rows)


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "objective"}


def make_gist(tiny, lora_r: int = 2) -> GistCompressor:
    """A gist compressor with random gists and a non-zero LoRA (PEFT starts B at zero: the adapter would be a no-op)."""
    model, tokenizer = tiny()
    gist = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=16, lora_r=lora_r), model).use_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in gist.named_parameters():
            if name.startswith("gist_embeddings") or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return gist


# ----- 1. the teacher's tokens ----------------------------------------------------------------------
def test_the_teacher_reads_what_full_context_generation_reads(tiny) -> None:
    model, tokenizer = tiny()
    clm = CompressedLM(FullContext(FullContextConfig(), model), tokenizer)
    batch = collate(tokenizer)
    layout = clm.layout
    for i, row in enumerate(ROWS):
        ids, mask = batch["teacher_ids"][i], batch["teacher_mask"][i]
        assert mask.tolist() == sorted(mask.tolist())  # left-padded: the forward numbers positions from the mask
        context, context_mask = clm.tokenize_context(row["context"])
        context = context[0][context_mask[0].bool()].tolist()  # what a full-context memory holds
        if row["task"] == "continuation":
            target = layout.encode(row["answer"])
        else:
            prefix = row.get("answer_prefix") or ""
            question = row["question"] or AUTOENCODING_PROMPT
            target = clm.prompt_ids(question, reply_prefix=prefix) + layout.reply_ids(row["answer"], prefix)
        expected = context + target
        assert ids[mask.bool()].tolist() == expected
        assert tokenizer.decode(ids[mask.bool()]) == tokenizer.decode(expected)
        if row["task"] == "passkey":  # the reference of ratio 1: plain generation's conversation, then the reply
            conversation = layout.conversation_ids(row["question"], row["context"], row["answer_prefix"])
            assert expected[:len(conversation)] == conversation
        # the labels the student's loss scores (not a target's first token), in the teacher's columns
        student = batch["labels"][i, 1:][batch["labels"][i, 1:] != -100]
        teacher = batch["teacher_labels"][i][batch["teacher_labels"][i] != -100]
        assert teacher.tolist() == student.tolist() and len(teacher) > 0
        width = ids.shape[0]
        assert (batch["teacher_labels"][i, :width - len(target) + 1] == -100).all()  # none on context / pads
    reply = batch["teacher_labels"][0][batch["teacher_labels"][0] != -100]
    assert tokenizer.decode(reply, skip_special_tokens=True) == " 48213"
    plain = MemoryCollator(tokenizer, max_context_tokens=512, max_target_tokens=64)(ROWS)
    assert not {"teacher_ids", "teacher_mask", "teacher_labels"} & set(plain)


def test_the_teacher_reads_the_context_as_truncated_for_the_student(tiny) -> None:
    _, tokenizer = tiny()
    batch = collate(tokenizer, rows=ROWS[:1], max_context_tokens=30)
    context = batch["context_ids"][0][batch["context_mask"][0].bool()].tolist()
    teacher = batch["teacher_ids"][0][batch["teacher_mask"][0].bool()].tolist()
    assert len(context) == 30 and teacher[:30] == context and teacher[30:] == batch["input_ids"][0].tolist()


# ----- 2. the KL ------------------------------------------------------------------------------------
def test_per_example_kl_is_zero_for_equal_logits_and_the_mean_kl_otherwise() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=generator), torch.randn(5, 11, generator=generator)
    rows = torch.tensor([0, 0, 2, 2, 2])
    assert per_example_kl(teacher, teacher, rows, 3).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    token = (p * (p.log() - log_q)).sum(-1)
    expected = [float(token[:2].mean()), 0.0, float(token[2:].mean())]  # example 1 has no token: 0
    got = per_example_kl(student, teacher, rows, 3)
    assert got.tolist() == pytest.approx(expected, rel=1e-5) and got[0] > 0 and got[2] > 0
    with pytest.raises(ValueError, match="tokens, vocab"):
        per_example_kl(student, teacher[:, :5], rows, 3)


def test_the_kl_vanishes_when_the_student_reads_the_full_context(tiny) -> None:
    """A ratio-1 student (the full context's KV) reading right-padded targets predicts exactly what the teacher,
    left-padded over context + target, predicts: every position and label lines up, for every objective."""
    model, tokenizer = tiny()
    full = FullContext(FullContextConfig(), model).use_tokenizer(tokenizer)
    with torch.no_grad():
        out = full(**forward_inputs(collate(tokenizer)))
    assert out["per_example_kl"].shape == (3,)
    assert out["per_example_kl"].abs().max() < 1e-6
    assert (out["per_example_loss"] > 0).all()


def test_the_teacher_is_the_base_without_the_adapter(tiny) -> None:
    """Given the plain base's own full-context logits as the "student", the KL is ~0 although the gist encoder's
    LoRA is on and non-zero: the teacher ran with the adapter off."""
    gist = make_gist(tiny)
    reference, tokenizer = tiny()
    batch = collate(tokenizer, rows=ROWS[:1])  # one row: no padding, the target is the teacher's tail
    ids, length = batch["teacher_ids"], batch["input_ids"].shape[1]
    with torch.no_grad():
        plain = reference(input_ids=ids).logits[:, -length:]
        with gist.model.disable_adapter():
            assert torch.allclose(gist.base_lm(input_ids=ids).logits[:, -length:], plain, atol=1e-5)
        adapted = gist.base_lm(input_ids=ids).logits[:, -length:]
        assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter matters: the check is real
        teacher = (batch["teacher_ids"], batch["teacher_mask"], batch["teacher_labels"])
        assert gist.distillation_kl(plain, batch["labels"], *teacher).abs().max() < 1e-6
        assert gist.distillation_kl(adapted, batch["labels"], *teacher).min() > 1e-4


def test_the_kl_trains_the_gists_and_the_adapter_not_the_base(tiny) -> None:
    gist = make_gist(tiny).train()
    kl = gist(**forward_inputs(collate(tokenizer=gist.tokenizer)))["per_example_kl"]
    assert kl.shape == (3,) and (kl > 0).all() and kl.requires_grad
    kl.sum().backward()
    assert gist.gist_embeddings.weight.grad is not None and gist.gist_embeddings.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gist.named_parameters() if "lora_" in n)
    assert all(p.grad is None for p in gist.parameters() if not p.requires_grad)


def test_the_fused_loss_gives_the_same_kl(tiny) -> None:
    gist = make_gist(tiny)
    inputs = forward_inputs(collate(gist.tokenizer))
    with torch.no_grad():
        plain = gist(**inputs)
        fused = gist(**inputs, lm_loss=partial(per_example_lm_loss_from_hidden, backend="torch"))
    assert torch.allclose(fused["per_example_loss"], plain["per_example_loss"], atol=1e-5)
    assert torch.allclose(fused["per_example_kl"], plain["per_example_kl"], atol=1e-5)


# ----- 3. training ----------------------------------------------------------------------------------
def memory_trainer(tiny, tmp_path: Path, distillation_weight: float, with_teacher: bool = True,
                   model: GistCompressor | None = None) -> MemoryCompressorTrainer:
    import datasets
    from transformers import TrainingArguments

    gist = model or make_gist(tiny)
    rows = [{"context": f"The pass key is {n}{n}{n}. Filler text follows here.", "question": "What is the pass key?",
             "answer": f"{n}{n}{n}"} for n in range(4)] + [dict(ROWS[1])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, label_names=["labels"], learning_rate=1e-2)
    collator = MemoryCollator(gist.tokenizer, 64, 64, with_teacher=with_teacher)
    return MemoryCompressorTrainer(model=gist, args=args, processing_class=gist.tokenizer,
                                   train_dataset=datasets.Dataset.from_list(rows), data_collator=collator,
                                   objective_weights={"sft": 1.0, "continuation": 0.5},
                                   distillation_weight=distillation_weight)


def test_the_loss_adds_the_weighted_kl_per_example(tiny, tmp_path: Path) -> None:
    trainer = memory_trainer(tiny, tmp_path, distillation_weight=0.5)
    batch = collate(trainer.model.tokenizer, rows=ROWS[:2])  # an sft row (weight 1) and a continuation (0.5)
    with torch.no_grad():
        loss, out = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        kl, ce = out["per_example_kl"], out["per_example_loss"]
        assert float(loss) == pytest.approx(float(((ce + 0.5 * kl) * torch.tensor([1.0, 0.5])).sum() / 1.5), rel=1e-5)
        off = memory_trainer(tiny, tmp_path, distillation_weight=0.0, model=trainer.model)
        loss_off, out_off = off.compute_loss(off.model, dict(batch), return_outputs=True)
    assert "per_example_kl" not in out_off  # without distillation the teacher does not run
    assert float(loss_off) == pytest.approx(float((ce * torch.tensor([1.0, 0.5])).sum() / 1.5), rel=1e-5)


def test_a_distilling_run_trains_and_logs_the_kl(tiny, tmp_path: Path) -> None:
    trainer = memory_trainer(tiny, tmp_path, distillation_weight=1.0)
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["loss_distillation"])
        assert entry["loss_distillation"] > 0
    params = dict(trainer.model.named_parameters())
    assert not torch.equal(params["gist_embeddings.weight"], trained["gist_embeddings.weight"])
    assert any(not torch.equal(params[n], before) for n, before in trained.items() if "lora_" in n)
    assert all(torch.equal(params[n], before) for n, before in frozen.items())


# ----- 4. errors ------------------------------------------------------------------------------------
def test_distillation_without_the_teacher_in_the_batch_is_an_error(tiny, tmp_path: Path) -> None:
    trainer = memory_trainer(tiny, tmp_path, distillation_weight=1.0, with_teacher=False)
    batch = MemoryCollator(trainer.model.tokenizer, 64, 64)(ROWS[:1])
    with pytest.raises(ValueError, match=r"with_teacher=True"):
        trainer.compute_loss(trainer.model, batch)
    for weight in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="distillation_weight must be"):
            memory_trainer(tiny, tmp_path, distillation_weight=weight, model=trainer.model)


def test_a_forward_that_makes_no_kl_is_an_error(tiny, tmp_path: Path) -> None:
    class NoKL(GistCompressor):  # a method whose own forward ignores the teacher
        def forward(self, **inputs):
            return {k: v for k, v in super().forward(**inputs).items() if k != "per_example_kl"}

    model, tokenizer = tiny()
    no_kl = NoKL(GistConfig(tokens_per_gist=4, segment_length=16, lora_r=0), model).use_tokenizer(tokenizer)
    trainer = memory_trainer(tiny, tmp_path, distillation_weight=1.0, model=no_kl)
    with pytest.raises(ValueError, match="NoKL.forward returned no per_example_kl"):
        trainer.compute_loss(no_kl, collate(tokenizer, rows=ROWS[:1]))


def test_forward_refuses_a_partial_or_misaligned_or_too_long_teacher(tiny) -> None:
    gist = make_gist(tiny)
    inputs = forward_inputs(collate(gist.tokenizer, rows=ROWS[:1]))
    with pytest.raises(ValueError, match="together"):
        gist(**{k: v for k, v in inputs.items() if k != "teacher_labels"})
    shifted = dict(inputs, teacher_labels=inputs["teacher_labels"].roll(1, dims=1))  # one column off
    with pytest.raises(ValueError, match="same tokens"):
        gist(**shifted)
    unlabelled = inputs["teacher_labels"].clone()
    unlabelled[unlabelled != -100] = -100
    with pytest.raises(ValueError, match="same tokens"):
        gist(**dict(inputs, teacher_labels=unlabelled))
    short, _ = tiny(max_position_embeddings=48)
    window = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=16, lora_r=0), short)
    window.use_tokenizer(gist.tokenizer)
    assert inputs["teacher_mask"].sum() > 48 and inputs["context_mask"].sum() < 48
    with pytest.raises(ContextTooLongError, match="distillation teacher reads .* more than the base model's 48 positions"):
        window(**inputs)
