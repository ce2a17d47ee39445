"""The Compressor contract, checked for every registered compressor on the tiny model.

Each compressor: its memory survives a save/load round trip; a batch of contexts gives each row what the
context alone gives; ``CompressedLM`` generates with and without a memory (without one it is plain chat
generation, whatever the compressor); one memory row answers many prompts as each would be answered
alone; declared capabilities do what they declare, and the kinds of method that are types (``PrefillSelection``)
keep their promises; ``prepare()`` does its work once; and, where the method has a ratio 1, the memory
through ``CompressedLM`` generates exactly what plain ``model.generate`` generates for the conversation.
"""

from __future__ import annotations

import pytest
import torch

from ctxzip.compressors import COMPRESSORS, CompressedLM, Memory, compressor_class, load_base
from ctxzip.compressors.baselines.selection import PrefillSelection, prefill_context
from ctxzip.compressors.conversation import ConversationLayout
from ctxzip.compressors.models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXTS = ["The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 6,
            "Alice keeps a red kite in the garden shed. " * 3]
PROMPTS = ["What is the pass key?", "Which colour is the grass? Answer in one word."]
NEW_TOKENS = 5


def settings(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Small, fast settings of each compressor on the tiny model (calibration artifacts in a temp dir)."""
    folder = tmp_path_factory.getbasetemp()
    return {
        "gist": dict(tokens_per_gist=4, segment_length=32, lora_r=2),
        "rcc": dict(window=16, rate=4, lora_r=2, decoder_lora_r=2),
        # gates open: with the paper's zero gates a fresh LCIRC is the base model and its memory changes nothing
        "lcirc": dict(num_latents=4, segment_length=16, perceiver_layers=1, gate_init=0.5),
        "qd_lcirc": dict(num_latents=4, segment_length=16, perceiver_layers=1, gate_init=0.5),
        "softpromptcomp": dict(num_soft=4, summary_tokens=8, lora_r=2, summary_disk_cache=False),
        "incomes": dict(lora_r=2),
        "color": dict(max_new_tokens=6, lora_r=2),
        "cskv": dict(density=0.5, window=4),
        "qfilters": dict(ratio=2.0, calibration_tokens=256, calibration_seq_len=128,
                         filters_path=str(folder / "qf.safetensors")),
        "ehpc": dict(ratio=2.0, probe_samples=2, probe_tokens=128, heads_path=str(folder / "ehpc.safetensors")),
        "full_context": {},
    }.get(name, dict(ratio=2.0, **({"window": 4} if name in ("snapkv", "chunkkv", "pyramidkv") else {})))


RATIO_ONE = {"full_context": {}, "truncation": {"ratio": 1.0}, "snapkv": {"ratio": 1.0, "window": 4},
             "streaming_llm": {"ratio": 1.0}, "chunkkv": {"ratio": 1.0, "window": 4},
             "pyramidkv": {"ratio": 1.0, "window": 4}, "selective_context": {"ratio": 1.0},
             "qfilters": {"ratio": 1.0}, "ehpc": {"ratio": 1.0}}  # (their calibration settings: settings())


def sensitive_tiny(tokenizer):
    """The tiny Llama with a larger init: its greedy tokens depend on the context (with the default init
    it repeats the last prompt token whatever it read, and parity would hold vacuously)."""
    return tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).eval()


@pytest.fixture(scope="module")
def base():
    from ctxzip.compressors import TINY_MODEL

    _, tokenizer = load_base(TINY_MODEL)
    return sensitive_tiny(tokenizer), tokenizer


def build(name: str, config: dict, base) -> CompressedLM:
    model, tokenizer = base
    cls = compressor_class(name)
    compressor = cls(cls.config_class.from_dict(config), model).eval()
    clm = CompressedLM(compressor, tokenizer)
    compressor.prepare()  # every compressor has it (a no-op but for the calibrated baselines), as the eval runner calls it
    return clm


@pytest.fixture
def clm(request, base, tmp_path_factory):
    model, tokenizer = base
    fresh = sensitive_tiny(tokenizer) if request.param in ("gist", "color", "cskv", "rcc", "lcirc", "qd_lcirc", "softpromptcomp",
                                                          "incomes") else model
    # learned methods wrap or hook their own copy of the base; the training-free ones share one
    return build(request.param, settings(request.param, tmp_path_factory), (fresh, tokenizer))


def plain_generate(model, ids: list[int], tokens: int = NEW_TOKENS) -> list[int]:
    """Plain transformers greedy generation of exactly ``tokens`` new tokens."""
    tensor = torch.tensor([ids])
    out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=2)
    return out[0, tensor.shape[1]:].tolist()


def gen(clm: CompressedLM, prompts: list, memory: Memory | None = None, tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Exactly ``tokens`` greedy new token ids per prompt through CompressedLM."""
    return clm.generate_ids(prompts, memory, max_new_tokens=tokens, min_new_tokens=tokens)


ALL = sorted(COMPRESSORS)


def test_every_registered_compressor_is_covered() -> None:
    assert set(ALL) >= {"gist", "color", "cskv", "rcc", "lcirc", "qd_lcirc", "softpromptcomp", "incomes", "full_context",
                        "truncation", "snapkv"}


@pytest.mark.parametrize("clm", ALL, indirect=True)
def test_generation_without_a_memory_is_plain_chat_generation(clm: CompressedLM) -> None:
    assert isinstance(clm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS), str)
    with clm.compressor.plain_base():
        expected = [plain_generate(clm.model, clm.layout.plain_prompt_ids(p)) for p in PROMPTS]
    assert gen(clm, PROMPTS) == expected


def memory_rows(clm: CompressedLM, contexts: list[str]) -> Memory:
    """One memory row per context: ``CompressedLM.compress``, except for a method whose memory kind is ``pool`` (its
    contexts are the items of one pool), where that unites them and the compressor itself gives the rows."""
    if clm.compressor.memory_kind != "pool":
        return clm.compress(contexts)
    ids, mask = clm.tokenize_context(contexts)
    with torch.no_grad(), clm.compressor.encoding():
        rows = clm.compressor.compress(ids, mask).detach()
    pool = clm.compress(contexts)
    assert pool.batch_size == 1 and pool.slots == rows.batch_size * rows.slots  # one pool of every item
    return rows


@pytest.mark.parametrize("clm", ALL, indirect=True)
def test_memory_round_trip_batch_rows_and_many_prompts(clm: CompressedLM, tmp_path) -> None:
    batch = memory_rows(clm, CONTEXTS)
    assert batch.batch_size == 2 and batch.kind == clm.compressor.memory_kind
    assert batch.ratio > 0 and batch.nbytes > 0 and len(batch.real_slots) == 2
    single = clm.compress(CONTEXTS[0])
    alone = [gen(clm, [p], single)[0] for p in PROMPTS]
    assert alone != [gen(clm, [p])[0] for p in PROMPTS]  # the memory changes what is generated
    # a batch row reads as the context alone
    assert gen(clm, PROMPTS[:1], batch.select(0)) == alone[:1]
    # save / load round trip
    loaded = Memory.load(single.save(tmp_path / "memory.safetensors"))
    assert loaded.kind == single.kind and loaded.ratio == pytest.approx(single.ratio)
    assert [gen(clm, [p], loaded)[0] for p in PROMPTS] == alone
    # one memory row, many prompts (batched, padded), each answered as alone; and a batch of rows
    assert gen(clm, PROMPTS, single) == alone
    assert clm.answer_many(single, PROMPTS, max_new_tokens=NEW_TOKENS) == \
        [clm.generate(p, memory=single, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    rows = gen(clm, PROMPTS, batch)
    assert rows == [alone[0], gen(clm, PROMPTS[1:], batch.select(1))[0]]


@pytest.mark.parametrize("clm", ALL, indirect=True)
def test_decoder_reports_what_it_read_and_declared_capabilities_hold(clm: CompressedLM) -> None:
    compressor = clm.compressor
    memory = clm.compress(CONTEXTS[0])
    prompt = torch.tensor([clm.prompt_ids(PROMPTS[0])])
    with torch.no_grad(), compressor.reading(memory):
        step = compressor.decoder_forward(memory, prompt, torch.ones_like(prompt),
                                          prompt_lengths=torch.tensor([prompt.shape[1]]))
    assert step.logits.shape[:2] == prompt.shape
    assert len(step.memory_tokens) == 1 and step.memory_tokens[0] > 0
    ids, mask = clm.tokenize_context(CONTEXTS[0])
    if isinstance(compressor, PrefillSelection):  # the type's promises: several ratios from one pass, a shared prefill
        ratio = getattr(compressor.compressor_config, "ratio", 1.0)  # the full context has none: it is 1
        again, other = compressor.compress_ratios(ids, mask, [ratio, 2 * ratio])
        assert again.slots == memory.slots and again.ratio == pytest.approx(memory.ratio)
        for name, tensor in memory.tensors.items():
            torch.testing.assert_close(again.tensors[name], tensor)
        window, nll = compressor.prefill_needs()
        prefill = prefill_context(compressor.base_lm, ids, window, nll)
        shared, shared_other = compressor.compress_from(prefill, [ratio, 2 * ratio])
        for name, tensor in memory.tensors.items():
            torch.testing.assert_close(shared.tensors[name], tensor)
        assert shared_other.slots == other.slots
        assert isinstance(compressor.prefill_is_own_cost, bool)
    with_query = clm.compress(CONTEXTS[0], query=PROMPTS[0])
    same = with_query.slots == memory.slots and all(torch.equal(with_query.tensors[k], v) for k, v in memory.tensors.items())
    assert same != compressor.uses_query  # a query changes the memory exactly when the method declares it reads one
    assert compressor.uses_query or not compressor.memory_per_query  # a memory per question reads the question
    if compressor.compresses_passages:  # a corpus, passage by passage: one row of the method's kind
        corpus = compressor.compress_passages(CONTEXTS, "\n".join)
        assert corpus.batch_size == 1 and corpus.kind == compressor.memory_kind
        assert corpus.source_tokens == [len(clm.layout.encode("\n".join(CONTEXTS)))]
    else:
        with pytest.raises(NotImplementedError):
            compressor.compress_passages(CONTEXTS, "\n".join)
    if not compressor.compresses_template:
        assert memory.source_tokens[0] == len(clm.layout.encode(CONTEXTS[0]))
    else:
        assert memory.source_tokens[0] == len(clm.layout.context_ids(CONTEXTS[0]))


#: The methods whose memories come from one full prefill of the context (the eval runner shares it among them).
FROM_PREFILL = {"full_context", "snapkv", "streaming_llm", "chunkkv", "pyramidkv", "qfilters", "selective_context", "ehpc"}
#: Flags the contract no longer has: a kind of memory (``pool``) or of method (``PrefillSelection``) says them, and
#: ``prepare()`` is always called. A class still declaring one would be silently ignored.
RETIRED_FLAGS = ("pools_contexts", "needs_preparation", "multi_ratio", "shares_prefill")


@pytest.mark.parametrize("name", ALL)
def test_kinds_of_memory_and_method_are_types_not_flags(name: str) -> None:
    cls = compressor_class(name)
    assert not [flag for flag in RETIRED_FLAGS if hasattr(cls, flag)]
    assert issubclass(cls, PrefillSelection) == (name in FROM_PREFILL)
    if not issubclass(cls, PrefillSelection):  # what only the type provides
        assert not any(hasattr(cls, a) for a in ("prefill_needs", "compress_from", "compress_ratios", "prefill_is_own_cost"))


@pytest.mark.parametrize("clm", ALL, indirect=True)
def test_prepare_does_its_work_once(clm: CompressedLM, monkeypatch) -> None:
    """``prepare()`` is idempotent: a second call neither reads nor computes a calibration artifact again, and the
    memory is the one made after the first call."""
    before = clm.compress(CONTEXTS[0])

    def again(*args, **kwargs):
        raise AssertionError("prepare() did its work a second time")

    for module in ("qfilters", "ehpc"):
        monkeypatch.setattr(f"ctxzip.compressors.baselines.{module}.load_or_compute", again)
    clm.compressor.prepare()
    after = clm.compress(CONTEXTS[0])
    assert after.slots == before.slots and all(torch.equal(after.tensors[k], v) for k, v in before.tensors.items())


@pytest.mark.parametrize("name", sorted(RATIO_ONE))
def test_ratio_one_generates_exactly_what_plain_generation_does(name: str, base, tmp_path_factory) -> None:
    calibrated = name in ("qfilters", "ehpc")
    clm = build(name, {**(settings(name, tmp_path_factory) if calibrated else {}), **RATIO_ONE[name]}, base)
    memory = clm.compress(CONTEXTS[0])
    assert memory.ratio == pytest.approx(1.0)
    layout = ConversationLayout(clm.tokenizer)
    expected = [plain_generate(clm.model, layout.conversation_ids(p, CONTEXTS[0]), 8) for p in PROMPTS]
    assert [gen(clm, [p], memory, 8)[0] for p in PROMPTS] == expected  # single
    assert gen(clm, PROMPTS, memory, 8) == expected  # batched, padded


def test_generation_arguments_reach_transformers_generate(base) -> None:
    """GenerationConfig, repetition_penalty, sampling, stop_strings and a streamer through CompressedLM with the
    full-context memory give what plain generate gives on the same conversation with the same arguments."""
    from transformers import GenerationConfig, TextStreamer

    model, tokenizer = base
    clm = build("full_context", {}, base)
    memory = clm.compress(CONTEXTS[0])
    ids = torch.tensor([clm.layout.conversation_ids(PROMPTS[0], CONTEXTS[0])])

    def plain(**kwargs) -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=2, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    def ours(**kwargs) -> list[int]:
        return clm.generate_ids([PROMPTS[0]], memory, **kwargs)[0]

    config = GenerationConfig(max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert ours(generation_config=config) == plain(generation_config=config)
    penalised = dict(max_new_tokens=8, min_new_tokens=8, repetition_penalty=3.0)
    assert ours(**penalised) == plain(**penalised)
    greedy = plain(max_new_tokens=8, min_new_tokens=8)
    banned = dict(max_new_tokens=8, min_new_tokens=8, bad_words_ids=[[greedy[0]]])  # a field that must change it
    assert ours(**banned) == plain(**banned) != greedy
    torch.manual_seed(0)
    sampled = ours(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=6, min_new_tokens=6)
    torch.manual_seed(0)
    assert sampled == plain(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=6, min_new_tokens=6)
    full = tokenizer.decode(plain(max_new_tokens=12, min_new_tokens=12))
    stop = full.strip()[3:6]  # a string the greedy reply passes through
    assert stop in tokenizer.decode(ours(max_new_tokens=12, stop_strings=[stop]))
    assert len(ours(max_new_tokens=12, stop_strings=[stop])) < 12  # it stopped there

    class Collect(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True)
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text

    streamer = Collect()
    reply = clm.generate(PROMPTS[0], memory=memory, max_new_tokens=6, min_new_tokens=6, streamer=streamer)
    assert streamer.text.strip() == reply


def test_cskv_at_full_rank_with_a_window_over_the_context_is_plain_generation(base) -> None:
    _, tokenizer = base
    fresh = sensitive_tiny(tokenizer)
    clm = build("cskv", dict(density=1.0, window=4096), (fresh, tokenizer))
    memory = clm.compress(CONTEXTS[0])
    expected = [plain_generate(fresh, clm.layout.conversation_ids(p, CONTEXTS[0]), 8) for p in PROMPTS]
    assert gen(clm, PROMPTS, memory, 8) == expected


@pytest.mark.parametrize("name", ["gist", "color"])
def test_clm_model_is_the_decoder_and_the_encoders_adapter_is_on_only_while_compressing(
        name: str, base, tmp_path_factory) -> None:
    _, tokenizer = base
    reference = sensitive_tiny(tokenizer)
    clm = build(name, settings(name, tmp_path_factory), (sensitive_tiny(tokenizer), tokenizer))
    with torch.no_grad():
        for parameter_name, parameter in clm.compressor.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.5)  # the encoder's adapter now changes what the model computes
    ids = torch.tensor([clm.layout.plain_prompt_ids(PROMPTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(clm.model(ids).logits, reference(ids).logits)  # clm.model: the plain decoder
    memory = clm.compress(CONTEXTS[0])
    untouched = build(name, settings(name, tmp_path_factory), (sensitive_tiny(tokenizer), tokenizer))
    without = untouched.compress(CONTEXTS[0])  # a zero LoRA B: the encoder is the base model
    assert memory.slots != without.slots or any(not torch.equal(memory.tensors[k], without.tensors[k])
                                                for k in memory.tensors)
    with torch.no_grad():
        torch.testing.assert_close(clm.model(ids).logits, reference(ids).logits)  # and still after compressing


@pytest.mark.parametrize("name", ["truncation", "selective_context", "ehpc"])
def test_methods_that_re_encode_their_kept_tokens_keep_the_template_prefix(name: str, base, tmp_path_factory) -> None:
    """The kept tokens are re-read as the user turn's content: the turn's opening must survive any ratio. The
    memory's first slots then hold exactly the KV of the template prefix read alone (causal attention)."""
    from ctxzip.compressors.baselines.full_context import prefill_kv

    clm = build(name, {**settings(name, tmp_path_factory), "ratio": 3.0}, base)
    memory = clm.compress(CONTEXTS[0] * 3)
    prefix = torch.tensor([clm.layout.prefix_ids])
    assert 0 < prefix.shape[1] < memory.slots
    alone = prefill_kv(clm.compressor, prefix, torch.ones_like(prefix))
    for layer in (0, clm.model.config.num_hidden_layers - 1):
        torch.testing.assert_close(memory.tensors[f"key.{layer}"][:, :, :prefix.shape[1]], alone[f"key.{layer}"])
