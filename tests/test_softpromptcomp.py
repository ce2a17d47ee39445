"""SoftPromptComp (our interpretation) on the tiny model: a zero gate hides its source completely, summaries
are written once and reused (in the process and on disk, their writing time still charged), a context within
the budget is its own summary, the ratio counts summary tokens and soft vectors, exports reload, bad input is
refused clearly."""

from __future__ import annotations

import pytest
import torch

import ctxzip.compressors.softpromptcomp as spc
from ctxzip.compressors import (
    BaseModelMismatchError,
    CompressedLM,
    SoftPromptCompCompressor,
    SoftPromptCompConfig,
    load_base,
)
from ctxzip.compressors.hub import load_compressor
from ctxzip.compressors.models import TINY_MODEL, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 4
SMALL = dict(num_soft=4, summary_tokens=8, summary_disk_cache=False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(TINY_MODEL)[1]


@pytest.fixture(autouse=True)
def empty_cache():
    spc._SUMMARIES.clear()
    yield
    spc._SUMMARIES.clear()


def build(tokenizer, **config) -> CompressedLM:
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).eval()
    return CompressedLM(SoftPromptCompCompressor(SoftPromptCompConfig(**{**SMALL, **config}), model).eval(), tokenizer)


def read(clm: CompressedLM, memory, prompt: str = "What is the pass key?") -> torch.Tensor:
    ids = torch.tensor([clm.prompt_ids(prompt)])
    with torch.no_grad(), clm.compressor.reading(memory):
        return clm.compressor.decoder_forward(memory, ids, torch.ones_like(ids)).logits


@pytest.mark.parametrize("hidden", ["summary", "soft"])
@pytest.mark.parametrize("weighting", ["per_source", "per_vector"])
def test_a_gate_at_zero_hides_its_source_completely(tokenizer, weighting, hidden) -> None:
    both = build(tokenizer, weighting=weighting)
    shown = "soft" if hidden == "summary" else "summary"
    alone = build(tokenizer, sources=shown, weighting="none")  # the other source, unweighted
    alone.compressor.load_state_dict({k: v for k, v in both.compressor.own_state_dict().items()
                                      if not k.startswith("gates.")}, strict=False)
    summary_gates, soft_gates = ([0], [1]) if weighting == "per_source" else (
        slice(0, SMALL["summary_tokens"]), slice(SMALL["summary_tokens"], SMALL["summary_tokens"] + SMALL["num_soft"]))
    with torch.no_grad():
        gates = both.compressor.gates.gates
        gates[summary_gates if hidden == "summary" else soft_gates] = 0.0
    hidden_memory, reference = both.compress(CONTEXT), alone.compress(CONTEXT)
    assert hidden_memory.texts and int(hidden_memory.slot_mask().sum()) == reference.slots  # its slots are masked
    torch.testing.assert_close(read(both, hidden_memory), read(alone, reference))
    # and an open gate does change what is read
    with torch.no_grad():
        gates.fill_(1.0)
    assert not torch.allclose(read(both, both.compress(CONTEXT)), read(alone, reference))


def test_summaries_are_written_once_then_reused_and_their_time_is_still_charged(tokenizer, monkeypatch,
                                                                               tmp_path) -> None:
    monkeypatch.setenv("CTXZIP_HOME", str(tmp_path))
    writes: list[int] = []
    original = SoftPromptCompCompressor._write

    def counting(self, contexts):
        writes.append(len(contexts))
        return original(self, contexts)

    monkeypatch.setattr(SoftPromptCompCompressor, "_write", counting)
    clm = build(tokenizer, summary_disk_cache=True, summary_batch=2)
    contexts = [CONTEXT, CONTEXT.replace("48213", "11111"), CONTEXT.replace("48213", "22222")]
    first = clm.compress(contexts)
    assert writes == [2, 1]  # batched by summary_batch
    assert first.meta["cached_compute_s"] == 0.0 and first.meta["summary_s"] > 0
    again = build(tokenizer, summary_disk_cache=True, sources="summary").compress(contexts[0])
    assert writes == [2, 1] and again.texts == first.texts[:1]  # the process cache, for another compressor too
    spc._SUMMARIES.clear()
    from_disk = build(tokenizer, summary_disk_cache=True).compress(contexts[1])
    assert writes == [2, 1] and from_disk.texts == first.texts[1:2]
    assert from_disk.meta["cached_compute_s"] > 0  # what writing it cost, charged to this memory
    assert len(list((tmp_path / "summaries").rglob("*.json"))) == 3
    repeated = CONTEXT.replace("48213", "33333")
    twice = clm.compress([repeated, contexts[0], repeated])
    assert writes == [2, 1, 1] and twice.texts[0] == twice.texts[2]  # a context repeated in one call: written once


def test_a_context_within_the_budget_is_its_own_summary(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(SoftPromptCompCompressor, "_write", lambda self, contexts: pytest.fail("summarised"))
    clm = build(tokenizer, summary_tokens=64, sources="summary", weighting="none")
    short = "Alice keeps a red kite."
    memory = clm.compress(short)
    context = clm.layout.encode(short)
    assert memory.slots == len(context) and memory.texts == [tokenizer.decode(context, skip_special_tokens=True)]
    torch.testing.assert_close(memory.tensors["embeds"][0], clm.model.get_input_embeddings()(torch.tensor(context)))


def test_ratio_counts_the_summary_tokens_and_soft_vectors(tokenizer) -> None:
    clm = build(tokenizer)
    memory = clm.compress(CONTEXT)
    prefix, context = len(clm.layout.prefix_ids), len(clm.layout.encode(CONTEXT))
    summary = len(clm.layout.encode(memory.texts[0])[:SMALL["summary_tokens"]])
    assert memory.slots == summary + SMALL["num_soft"]
    assert memory.ratio == pytest.approx((prefix + context) / (prefix + summary + SMALL["num_soft"]))
    assert memory.meta["metrics"] == {"gate_summary": 1.0, "gate_soft": 1.0}


def test_an_export_reloads_and_generates_identically_and_refuses_another_width(tokenizer, tmp_path) -> None:
    clm = build(tokenizer, weighting="per_vector", lora_r=2)
    with torch.no_grad():
        for name, parameter in clm.compressor.named_parameters():
            if "lora_B" in name or name.startswith("gates."):
                parameter.normal_(std=0.5)
    expected = clm.generate("What is the pass key?", memory=clm.compress(CONTEXT), max_new_tokens=6)
    folder = clm.save_pretrained(tmp_path / "spc")
    assert "Our interpretation" in (folder / "README.md").read_text()
    compressor, _ = load_compressor(folder, model=tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2),
                                    tokenizer=tokenizer)
    again = CompressedLM(compressor, tokenizer)
    assert again.generate("What is the pass key?", memory=again.compress(CONTEXT), max_new_tokens=6) == expected
    with pytest.raises(BaseModelMismatchError, match="hidden_size"):
        load_compressor(folder, model=tiny_llama(vocab_size=len(tokenizer), hidden_size=96), tokenizer=tokenizer)


def test_bad_settings_are_refused_clearly(tokenizer) -> None:
    with pytest.raises(ValueError, match="sources"):
        SoftPromptCompConfig(sources="everything")
    with pytest.raises(ValueError, match="summary_tokens"):
        SoftPromptCompConfig(summary_tokens=0)
    model = tiny_llama(vocab_size=len(tokenizer))
    model.model.layers[0].mlp.up_proj.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3"):
        SoftPromptCompCompressor(SoftPromptCompConfig(**SMALL), model)
    SoftPromptCompCompressor(SoftPromptCompConfig(**{**SMALL, "sources": "soft"}), model)  # no summariser: fine
