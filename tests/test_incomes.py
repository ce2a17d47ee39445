"""InComeS: the selection branch against a plain reference, an empty pool is the model without it, pools are
unordered unions that survive a save, the distillation loss by hand, the collator, bad input, the edit yardstick."""

from __future__ import annotations

import math

import pytest
import torch

from ctxzip.compressors import CompressedLM, EmptyInputError, Memory, load_base
from ctxzip.compressors.errors import BaseModelMismatchError
from ctxzip.compressors.incomes import InComeSCompressor, InComeSConfig
from ctxzip.compressors.incomes.compressor import distillation_loss, selection_branch
from ctxzip.compressors.models import TINY_MODEL, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

EDITS = ["The capital of Veloria is Tarsen.", "The river of Veloria is the Ambra.", "Bob Lane plays the oboe.",
         "The currency of Quelmar is the drapa."]
QUESTION = "What is the river of Veloria?"


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(TINY_MODEL)[1]


def build(tokenizer, seed: int = 0, **config) -> CompressedLM:
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2, seed=seed).eval()
    return CompressedLM(InComeSCompressor(InComeSConfig(**{"lora_r": 2, **config}), model).eval(), tokenizer)


def decode(clm: CompressedLM, pool: Memory, prompt: str = QUESTION) -> torch.Tensor:
    ids = torch.tensor([clm.prompt_ids(prompt)])
    with torch.no_grad(), clm.compressor.reading(pool):
        return clm.compressor.decoder_forward(pool, ids, torch.ones_like(ids), use_cache=False).logits


def perturb_lora(clm: CompressedLM) -> None:
    with torch.no_grad():
        for name, parameter in clm.compressor.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)


def test_selection_branch_matches_a_per_head_reference_with_gqa_and_padding() -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, entries, dim = 2, 6, 2, 5, 4, 8
    query = torch.randn(batch, heads, q_len, dim)
    keys, values = torch.randn(1, entries, kv_heads, dim), torch.randn(1, entries, kv_heads, dim)
    mask = torch.tensor([[True, False, True, True]])
    zero = torch.randn(kv_heads, dim)
    got = selection_branch(query, keys, values, mask, zero, 0.3)
    expected = torch.zeros_like(query)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            real = mask[0].nonzero().squeeze(-1)
            scores = torch.cat([query[b, h] @ zero[kv][:, None], query[b, h] @ keys[0, real, kv].T], dim=-1) * 0.3
            weights = scores.softmax(-1)
            expected[b, h] = weights[:, 1:] @ values[0, real, kv]  # the zero gist's value is 0
    torch.testing.assert_close(got, expected)


def test_an_empty_pool_is_exactly_the_model_without_the_branch(tokenizer) -> None:
    clm = build(tokenizer)
    reference = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2, seed=0).eval()
    ids = torch.tensor([clm.layout.prefix_ids + clm.prompt_ids(QUESTION)])
    prefix = len(clm.layout.prefix_ids)
    empty = clm.compressor.empty_pool()
    assert empty.slots == 0 and empty.nbytes == 0
    with torch.no_grad():
        assert torch.equal(decode(clm, empty), reference(ids).logits[:, prefix:])  # a fresh LoRA: the base model
        assert not torch.equal(decode(clm, clm.compress(EDITS)), reference(ids).logits[:, prefix:])
        perturb_lora(clm)  # trained: an empty pool is the trained model, the branch adds nothing
        assert torch.equal(decode(clm, empty), clm.model(ids).logits[:, prefix:])


def test_a_pool_is_an_unordered_union(tokenizer) -> None:
    clm = build(tokenizer)
    perturb_lora(clm)
    pool = clm.compress(EDITS)
    assert pool.kind == "pool" and pool.batch_size == 1 and pool.slots == len(EDITS)
    grown = clm.compress(EDITS[2:]).cat(clm.compress(EDITS[:2]))
    reversed_pool = clm.compress(EDITS[::-1])
    assert sorted(grown.tensors["edit_id"][0].tolist()) == sorted(pool.tensors["edit_id"][0].tolist())
    for other in (grown, reversed_pool):
        torch.testing.assert_close(decode(clm, other), decode(clm, pool), rtol=0, atol=1e-5)
    # each entry is its edit alone: compressing it in a batch of others changes nothing
    alone = clm.compress(EDITS[1])
    row = pool.tensors["edit_id"][0].tolist().index(alone.tensors["edit_id"][0, 0].item())
    layer = clm.compressor.gist_layers[0]
    torch.testing.assert_close(pool.tensors[f"key.{layer}"][0, row], alone.tensors[f"key.{layer}"][0, 0])


def test_a_saved_pool_answers_the_same(tokenizer, tmp_path) -> None:
    clm = build(tokenizer)
    perturb_lora(clm)
    pool = clm.compress(EDITS)
    loaded = Memory.load(pool.save(tmp_path / "pool.safetensors"))
    assert loaded.nbytes == pool.nbytes and loaded.meta == pool.meta
    assert clm.generate(QUESTION, memory=loaded, max_new_tokens=6) == clm.generate(QUESTION, memory=pool,
                                                                                   max_new_tokens=6)


def test_an_upper_mode_export_reloads_without_its_teacher_copy(tokenizer, tmp_path) -> None:
    from ctxzip.compressors.hub import load_compressor

    clm = build(tokenizer, train_mode="upper")
    assert clm.compressor.teacher_model is not None  # training reads it
    with torch.no_grad():
        for p in clm.compressor.model.get_decoder().layers[clm.compressor.gist_layers[0]].parameters():
            p.add_(0.05 * torch.randn_like(p))  # a trained gist layer
    clm.save_pretrained(tmp_path / "upper")
    loaded, _ = load_compressor(tmp_path / "upper", model=tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2),
                                tokenizer=tokenizer)
    assert loaded.teacher_model is None  # half the weights held at inference
    reloaded = CompressedLM(loaded, tokenizer)
    pool = clm.compress(EDITS)
    assert reloaded.generate(QUESTION, memory=reloaded.compress(EDITS), max_new_tokens=6) == clm.generate(
        QUESTION, memory=pool, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="released its teacher copy"), loaded.teacher():
        pass


def test_gist_keys_are_taken_before_rotary_embedding_unless_flagged(tokenizer) -> None:
    unrotated, rotated = build(tokenizer), build(tokenizer, gist_key_rope=True)
    plain, turned = unrotated.compress(EDITS[0]), rotated.compress(EDITS[0])
    layer = unrotated.compressor.gist_layers[0]
    assert torch.equal(plain.tensors[f"value.{layer}"], turned.tensors[f"value.{layer}"])
    assert not torch.allclose(plain.tensors[f"key.{layer}"], turned.tensors[f"key.{layer}"])
    # the flagged key is the default one rotated at the gist's position (after the edit's tokens)
    from transformers.models.llama.modeling_llama import rotate_half

    model = unrotated.compressor.base_lm
    position = torch.tensor([[len(unrotated.layout.encode(EDITS[0]))]])
    key = plain.tensors[f"key.{layer}"][:, 0].transpose(0, 1)  # [kv_heads, 1, head_dim]
    cos, sin = model.get_decoder().rotary_emb(key, position)
    torch.testing.assert_close(key * cos + rotate_half(key) * sin, turned.tensors[f"key.{layer}"][:, 0].transpose(0, 1))


def test_distillation_loss_by_hand() -> None:
    # one row, vocabulary of 3, tokens [0, 1, 2]: position 0 predicts token 1 (prompt), position 1 token 2 (answer)
    student = torch.log(torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    with_edit = torch.log(torch.tensor([[[0.1, 0.6, 0.3], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]]))
    without = torch.log(torch.tensor([[[0.1, 0.6, 0.3], [0.3, 0.5, 0.2], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, -100, 2]])
    mask = torch.ones(1, 3, dtype=torch.long)
    loss, parts = distillation_loss(student, with_edit, without, labels, mask)
    weight = 0.5 * math.log(0.7 / 0.2)  # the edit raises p(answer) from 0.2 to 0.7
    weighted_ce = weight * -math.log(0.8) / 1  # one token with a non-zero weight
    kl_prompt = 0.1 * math.log(0.1 / 0.2) + 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.3)
    kl_answer = 0.1 * math.log(0.1 / 0.1) + 0.2 * math.log(0.2 / 0.1) + 0.7 * math.log(0.7 / 0.8)
    expected = weighted_ce + (kl_prompt + kl_answer) / 2  # KL over every real next token
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["weighted_ce"].item() == pytest.approx(weighted_ce, rel=1e-5)
    # token 1 labelled too: the edit does not change its probability (0.6 both ways), so its weight is 0 and it
    # counts neither in the sum nor in the #(w != 0) denominator
    loss, parts = distillation_loss(student, with_edit, without, torch.tensor([[-100, 1, 2]]), mask)
    assert parts["weighted_ce"].item() == pytest.approx(weighted_ce, rel=1e-5)
    assert parts["weight_mean"].item() == pytest.approx(weight / 2, rel=1e-5)  # the mean over labelled tokens
    # no gain from the edit: no weighted term (0, never 0/0)
    loss, parts = distillation_loss(student, without, without, labels, mask)
    assert parts["weighted_ce"].item() == 0.0 and math.isfinite(loss.item())


def test_training_step_reaches_the_gist_the_zero_keys_and_the_adapter(tokenizer) -> None:
    from ctxzip.compressors.incomes.data import build_edit_records
    from ctxzip.compressors.incomes.trainer import EditCollator

    clm = build(tokenizer)
    records = build_edit_records(6, seed=0)
    collator = EditCollator(tokenizer, [r["edit"] for r in records], pool_sizes=[5], locality_fraction=0.5, seed=1)
    batch = collator(records[:2])
    assert batch["context_ids"].shape[0] == 5  # the two edits and three distractors
    for row in range(2):  # the teacher reads the same prompt and reply after the edit in context
        length = int(batch["attention_mask"][row].sum())
        offset = int(batch["teacher_offsets"][row])
        assert torch.equal(batch["teacher_ids"][row, offset:offset + length], batch["input_ids"][row, :length])
    # --locality_teacher base: an unrelated query's teacher reads it without the edit (after the template prefix)
    unedited = EditCollator(tokenizer, [r["edit"] for r in records], pool_sizes=[5], locality_fraction=1.0,
                            locality_teacher="base")(records[:2])
    assert unedited["teacher_offsets"].tolist() == [len(clm.layout.prefix_ids)] * 2
    assert torch.equal(unedited["teacher_ids"][:, :len(clm.layout.prefix_ids)],
                       torch.tensor([clm.layout.prefix_ids] * 2))
    compressor = clm.compressor.train()
    batch.pop("objective")
    out = compressor(**batch)
    assert math.isfinite(out["loss"].item()) and out["metrics"]["pool_entries"] == 5
    out["loss"].backward()
    grads = {name: p.grad for name, p in compressor.named_parameters() if p.requires_grad}
    for prefix in ("gist_embedding", "zero_keys", "lora_B"):  # (lora_A's gradient is 0 while B is at its zero init)
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if prefix in n), prefix


def test_bad_input_is_refused_clearly(tokenizer) -> None:
    clm = build(tokenizer, max_pool_entries=3)
    with pytest.raises(EmptyInputError):
        clm.compress([EDITS[0], " "])
    with pytest.raises(ValueError, match="max_pool_entries=3"):
        clm.generate(QUESTION, memory=clm.compress(EDITS), max_new_tokens=2)
    other_layers = build(tokenizer, gist_layers=[0])
    with pytest.raises(ValueError, match="layers"):
        clm.generate(QUESTION, memory=other_layers.compress(EDITS[:2]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"different tensors \(only in one: \['key.0'"):
        clm.compress(EDITS[:1]).cat(other_layers.compress(EDITS[1:2]))
    rotated = build(tokenizer, gist_key_rope=True)
    with pytest.raises(ValueError, match="gist_key_rope=True"):
        clm.generate(QUESTION, memory=rotated.compress(EDITS[:2]), max_new_tokens=2)
    wider = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, head_dim=8)
    foreign = CompressedLM(InComeSCompressor(InComeSConfig(lora_r=2), wider).eval(), tokenizer)
    with pytest.raises(BaseModelMismatchError):
        clm.generate(QUESTION, memory=foreign.compress(EDITS[:2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="not a pool"):
        CompressedLM.from_base("full_context", base_model=TINY_MODEL).compress(EDITS[:2]).pooled()


def test_edit_yardstick_reports_every_method_at_every_pool_size(tokenizer) -> None:
    from ctxzip.compressors.incomes.data import build_edit_records
    from ctxzip.compressors.incomes.evaluation import (
        IN_CONTEXT,
        NO_EDIT,
        evaluate_edits,
        markdown_table,
        pools_for,
    )

    records = build_edit_records(8, seed=3, split="test", num_locality=1)
    summaries = evaluate_edits({"incomes": build(tokenizer)}, records, [1, 4], queries_per_size=2, max_new_tokens=3)
    assert [(s.method, s.pool_size) for s in summaries] == [
        (m, size) for size in (1, 4) for m in ("incomes", IN_CONTEXT, NO_EDIT)]
    no_edit = [s for s in summaries if s.method == NO_EDIT]
    assert all(s.locality == 1.0 and s.bytes_per_edit == 0 for s in no_edit)  # the reference is the plain base
    assert all(s.n == 2 and 0 <= s.efficacy <= 1 for s in summaries)
    assert summaries[0].bytes_per_edit > 0 and "in-context editing" in markdown_table(summaries)
    with pytest.raises(ValueError, match="need 16 records"):
        pools_for(records, 16, 2)


def test_python_m_eval_runs_the_edit_task(tmp_path, capsys) -> None:
    import json

    from ctxzip.eval.__main__ import main

    args = ["--compressor", "incomes", "--base-model", TINY_MODEL, "--tasks", "edits", "--pool-sizes", "1", "2",
            "--num-samples", "1", "--max-new-tokens", "2", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| incomes (untrained) | 2 |" in report and "| no editing | 2 |" in report
    assert len(json.loads((tmp_path / "results.json").read_text())) == 6
    with pytest.raises(SystemExit):
        main([*args[:4], "--tasks", "edits", "passkey"])
