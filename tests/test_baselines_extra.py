"""Q-Filters and EHPC (calibrated training-free baselines), and a saved gist folder through the eval CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GenerationConfig

from ctxzip.compressors import (
    BaseModelMismatchError,
    CompressedLM,
    CorruptArtifactError,
    compressor_class,
    load_base,
)
from ctxzip.compressors.attention import QueryCapture
from ctxzip.compressors.baselines import EHPC, FullContext, FullContextConfig, QFilters, calibration
from ctxzip.compressors.baselines.ehpc import build_probes, evaluator_heads, find_evaluator_heads
from ctxzip.compressors.baselines.qfilters import compute_qfilters
from ctxzip.compressors.baselines.selection import keep_template, pool, protect_window
from ctxzip.compressors.generation import generate_from_memory

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The pass key is 48213. Remember it. " + "Grass is green and the sky is blue. " * 12
NAMES = ("qfilters", "ehpc")


@pytest.fixture(scope="module")
def tiny_model():
    model, tokenizer = load_base("tiny-random-llama")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration")


def small(name, artifacts):
    """Quick calibration settings, artifacts in a temporary folder (never the user's cache)."""
    if name == "qfilters":
        return dict(calibration_tokens=256, calibration_seq_len=128, filters_path=str(artifacts / "qf.safetensors"))
    return dict(probe_samples=2, probe_tokens=128, heads_path=str(artifacts / "ehpc.safetensors"))


def build(name, model, tokenizer, artifacts, **config):
    cls = compressor_class(name)
    settings = small(name, artifacts)
    settings.update(config)
    return cls(cls.config_class(**settings), model).eval().use_tokenizer(tokenizer)


def context(tokenizer, text=TEXT):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return ids, torch.ones_like(ids)


def greedy(compressor, tokenizer, memory, steps=6):
    clm = CompressedLM(compressor, tokenizer)
    prompt = torch.tensor([clm.prompt_ids("What is the pass key?")])
    return generate_from_memory(compressor, memory, prompt, torch.ones_like(prompt), GenerationConfig(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=2))


# ----- the shared contract: ratio 1 is the full context, the budget is exact --------------------
@pytest.mark.parametrize("name", NAMES)
def test_ratio_one_reproduces_full_context(tiny_model, artifacts, name):
    model, tokenizer = tiny_model
    ids, mask = context(tokenizer)
    full = FullContext(FullContextConfig(), model).eval()
    reference = full.compress(ids, mask)
    compressor = build(name, model, tokenizer, artifacts, ratio=1.0)
    memory = compressor.compress(ids, mask)
    assert memory.slots == reference.slots and memory.position_offset == reference.position_offset
    assert set(memory.tensors) == set(reference.tensors)
    for key, tensor in reference.tensors.items():
        assert torch.equal(memory.tensors[key], tensor), key
    assert torch.equal(greedy(compressor, tokenizer, memory), greedy(full, tokenizer, reference))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [3.0, 16.0])
def test_budget_is_exact_and_memory_is_real(tiny_model, artifacts, name, ratio):
    model, tokenizer = tiny_model
    ids, mask = context(tokenizer)
    n = ids.shape[1]
    budget = math.ceil(n / ratio)
    compressor = build(name, model, tokenizer, artifacts, ratio=ratio)
    memory = compressor.compress(ids, mask)
    layers = model.config.num_hidden_layers
    assert memory.slots == budget and memory.source_tokens == [n]
    assert memory.tensors["key.0"].shape[2] == budget and "slot_mask" not in memory.tensors
    assert memory.nbytes == 2 * layers * budget * memory.tensors["key.0"][0, :, 0].numel() * 4
    assert memory.meta["real_slots"] == [budget]
    # KV selection continues at n; EHPC re-encodes the kept tokens and continues at the budget
    assert memory.position_offset == ([n] if name == "qfilters" else [budget])
    greedy(compressor, tokenizer, memory, steps=2)  # the decoder reads it


@pytest.mark.parametrize("name", NAMES)
def test_a_shared_prefill_gives_the_same_memories(tiny_model, artifacts, name):
    """What the eval runner does: score from ONE prefill made for every method (wider window)."""
    from ctxzip.compressors.baselines.selection import prefill_context

    model, tokenizer = tiny_model
    ids, mask = context(tokenizer)
    compressor = build(name, model, tokenizer, artifacts, ratio=4.0, window=6)
    shared = compressor.compress_from(prefill_context(model, ids, window=20, token_nll=True), [4.0])[0]
    alone = compressor.compress(ids, mask)
    assert shared.slots == alone.slots and shared.position_offset == alone.position_offset
    for key in alone.tensors:
        assert torch.allclose(shared.tensors[key], alone.tensors[key], atol=1e-5), key


@pytest.mark.parametrize("name", NAMES)
def test_shared_scoring_matches_separate_compression_and_batches(tiny_model, artifacts, name):
    model, tokenizer = tiny_model
    ids, mask = context(tokenizer)
    shared = build(name, model, tokenizer, artifacts).compress_ratios(ids, mask, [2.0, 5.0])
    alone = build(name, model, tokenizer, artifacts, ratio=5.0).compress(ids, mask)
    for key in alone.tensors:
        assert torch.allclose(shared[1].tensors[key], alone.tensors[key], atol=1e-6), key
    clm = CompressedLM(build(name, model, tokenizer, artifacts, ratio=4.0), tokenizer)
    batch = clm.compressor.compress(*clm.tokenize_context([TEXT, TEXT[:120]]))
    lengths = [len(clm.layout.context_ids(t)) for t in (TEXT, TEXT[:120])]  # template prefix + context
    assert batch.meta["real_slots"] == [math.ceil(n / 4) for n in lengths]
    assert batch.tensors["slot_mask"].sum(-1).tolist() == batch.meta["real_slots"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_config_is_refused(name):
    cls = compressor_class(name)
    with pytest.raises(ValueError, match="ratio"):
        cls.config_class(ratio=0.5)
    with pytest.raises(ValueError, match="unknown"):
        cls.config_class.from_dict({"ratio": 2.0, "no_such_key": 1})


# ----- Q-Filters -----------------------------------------------------------------------------
def test_qfilters_are_the_signed_principal_direction_of_the_queries(tiny_model):
    model, tokenizer = tiny_model
    ids = context(tokenizer)[0][0].tolist()
    filters = compute_qfilters(model, ids, seq_len=50)  # 3 chunks, the last one shorter
    layers, kv_heads, head_dim = 2, 2, 16
    assert filters.shape == (layers, kv_heads, head_dim)
    assert torch.allclose(filters.norm(dim=-1), torch.ones(layers, kv_heads), atol=1e-5)
    queries = {layer: [] for layer in range(layers)}
    for start in range(0, len(ids), 50):
        with QueryCapture(model, 10**6) as catcher:
            model(input_ids=torch.tensor([ids[start:start + 50]]))
        for layer in range(layers):
            queries[layer].append(catcher.queries[layer][0])
    for layer in range(layers):
        q = torch.cat(queries[layer], dim=1)  # [Hq, n, D]
        for head in range(kv_heads):
            group = q[2 * head:2 * head + 2].reshape(-1, head_dim).double()  # GQA 4:2 -> 2 query heads
            v = torch.linalg.svd(group, full_matrices=False).Vh[0].float()
            u = filters[layer, head]
            assert abs(float(u @ v)) == pytest.approx(1.0, abs=1e-4)  # same direction
            assert float((group.float() @ u).mean()) > 0  # sign: queries project positively


def test_qfilters_keep_the_top_projections_per_head(tiny_model, artifacts):
    model, tokenizer = tiny_model
    ids, mask = context(tokenizer)
    n, budget = ids.shape[1], math.ceil(ids.shape[1] / 4)
    compressor = build("qfilters", model, tokenizer, artifacts, ratio=4.0)
    memory = compressor.compress(ids, mask)
    full = FullContext(FullContextConfig(), model).eval().compress(ids, mask)
    for layer in range(2):
        key = full.tensors[f"key.{layer}"]
        projection = torch.einsum("bhnd,hd->bhn", key, compressor.filters[layer])
        kept = projection.topk(budget, dim=-1).indices.sort(-1).values  # [1, Hkv, budget]
        for part in ("key", "value"):
            expected = full.tensors[f"{part}.{layer}"].gather(2, kept[..., None].expand(-1, -1, -1, 16))
            assert torch.equal(memory.tensors[f"{part}.{layer}"], expected)
    # the optional recent window is always kept
    windowed = build("qfilters", model, tokenizer, artifacts, ratio=4.0, window=5).compress(ids, mask)
    assert torch.equal(windowed.tensors["key.1"][:, :, -5:], full.tensors["key.1"][:, :, n - 5:])


def test_qfilters_artifact_is_saved_reused_and_checked(tiny_model, tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny_model
    path = tmp_path / "filters.safetensors"
    first = build("qfilters", model, tokenizer, tmp_path, filters_path=str(path))
    filters = first.filters
    assert path.is_file() and first.filters_file == path
    calibration._MEMO.clear()  # force a read from disk, and no recomputation
    monkeypatch.setattr("ctxzip.compressors.baselines.qfilters.compute_qfilters", _boom)
    again = build("qfilters", model, tokenizer, tmp_path, filters_path=str(path))
    assert torch.equal(again.filters, filters)
    other, _ = tiny(hidden_size=32, head_dim=8)  # another shape: a clear error, not garbage
    with pytest.raises(BaseModelMismatchError, match="another shape.*head_dim"):
        QFilters(QFilters.config_class(filters_path=str(path)), other).use_tokenizer(tokenizer).prepare()


def test_default_artifact_location_is_keyed_by_model_and_settings(tiny_model, tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny_model
    monkeypatch.setattr(calibration, "ctxzip_home", lambda: tmp_path)
    compressor = build("qfilters", model, tokenizer, tmp_path, filters_path=None)
    compressor.prepare()
    assert compressor.filters_file.parent == tmp_path / "calibration" / "qfilters"
    assert compressor.filters_file.name.startswith("tiny-random-llama-") and compressor.filters_file.is_file()
    meta = json.loads(_header(compressor.filters_file))
    assert meta["base_signature"]["head_dim"] == 16 and meta["settings"]["tokens"] == 256
    other_settings = build("qfilters", model, tokenizer, tmp_path, filters_path=None, calibration_tokens=200)
    other_seed = build("qfilters", tiny(seed=1)[0], tokenizer, tmp_path, filters_path=None)
    names = {compressor.filters_file}
    for c in (other_settings, other_seed):
        c.prepare()
        names.add(c.filters_file)
    assert len(names) == 3  # same shape, other weights or settings: another artifact


# ----- EHPC ----------------------------------------------------------------------------------
def test_probe_places_the_needle_before_the_question(tiny_model):
    _, tokenizer = tiny_model
    probes = build_probes(tokenizer, samples=3, tokens=100, seed=0)
    assert len({tuple(p["ids"]) for p in probes}) == 3
    for probe in probes:
        assert len(probe["ids"]) == 100
        start, end = probe["needle"]
        assert "The pass key is" in tokenizer.decode(probe["ids"][start:end])
        assert tokenizer.decode(probe["ids"][-probe["question"]:]).strip().startswith("What is the pass key?")
    filler = [100 - p["question"] - (p["needle"][1] - p["needle"][0]) for p in probes]
    depths = [p["needle"][0] / f for p, f in zip(probes, filler)]
    assert depths == pytest.approx([1 / 6, 3 / 6, 5 / 6], abs=0.02)  # spread evenly


def test_head_scores_are_the_questions_attention_on_the_needle(tiny_model):
    model, tokenizer = tiny_model
    probes = build_probes(tokenizer, samples=2, tokens=80, seed=1)
    scores = find_evaluator_heads(model, probes)
    expected = torch.zeros(2, 4)
    with _eager(model):
        for probe in probes:
            attentions = model(input_ids=torch.tensor([probe["ids"]]), output_attentions=True).attentions
            start, end = probe["needle"]
            for layer in range(2):
                window = attentions[layer][0, :, -probe["question"]:]  # [Hq, w, n]
                expected[layer] += window[..., start:end].sum(-1).mean(-1) / len(probes)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_evaluator_heads_come_from_the_best_layer():
    scores = torch.tensor([[0.1, 0.9, 0.1, 0.1], [0.5, 0.4, 0.6, 0.0], [0.9, 0.8, 0.7, 0.6]])
    assert evaluator_heads(scores, 2, 1.0) == (2, [0, 1])
    assert evaluator_heads(scores, 2, 0.6) == (1, [0, 2])  # top layer not searched
    assert evaluator_heads(scores, 1, 0.3) == (0, [1])
    assert evaluator_heads(scores, 10, 0.5)[1] == [0, 1, 2, 3]  # capped by the heads per layer


def test_ehpc_scores_tokens_with_the_evaluator_heads_and_stops_early(tiny_model, artifacts):
    model, tokenizer = tiny_model
    compressor = build("ehpc", model, tokenizer, artifacts, ratio=4.0, window=6, kernel_size=3)
    ids = torch.tensor([compressor.layout.context_ids(TEXT)])  # what CompressedLM gives: template prefix + text
    mask, n = torch.ones_like(ids), ids.shape[1]
    compressor.prepare()
    compressor.layer, compressor.heads = 0, [1, 3]  # pin the evaluator: layer 0, two heads
    calls = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        scores = compressor.token_scores(ids)
    finally:
        hook.remove()
    assert not calls  # the scoring pass stopped after the evaluator layer
    with _eager(model):
        attn = model(input_ids=ids, output_attentions=True).attentions[0][:, [1, 3], -6:]
    expected = pool(attn.mean(dim=(1, 2))[:, None], 3, "max", window=6)  # the window is not pooled in
    expected = protect_window(expected, torch.ones(1, n), 6)[0, 0]
    assert torch.allclose(scores, expected, atol=1e-5)
    memory = compressor.compress(ids, mask)  # the kept tokens, re-encoded on their own
    # the template prefix first (it is re-read as the user turn's opening), then the best-scored tokens
    kept = ids[:, keep_template(expected, compressor.template_tokens).topk(math.ceil(n / 4)).indices.sort().values]
    assert torch.equal(kept[0, :compressor.template_tokens], ids[0, :compressor.template_tokens])
    assert torch.equal(kept[0, -6:], ids[0, -6:])  # the observation window is kept
    alone = FullContext(FullContextConfig(), model).eval().compress(kept, torch.ones_like(kept))
    for key, tensor in alone.tensors.items():
        assert torch.allclose(memory.tensors[key], tensor, atol=1e-6), key


def test_ehpc_with_a_question_scores_from_the_question(tiny_model, artifacts):
    model, tokenizer = tiny_model
    ids, mask = context(tokenizer)
    n = ids.shape[1]
    question = torch.tensor([tokenizer("What is the pass key?", add_special_tokens=False)["input_ids"]])
    compressor = build("ehpc", model, tokenizer, artifacts, ratio=5.0, kernel_size=1)
    layer, heads = compressor.evaluator
    scores = compressor.token_scores(ids, question)
    with _eager(model):
        attn = model(input_ids=torch.cat([ids, question], 1), output_attentions=True).attentions[layer]
    expected = attn[0, heads, -question.shape[1]:, :n].mean(dim=(0, 1))
    assert torch.allclose(scores, expected, atol=1e-5)
    clm = CompressedLM(compressor, tokenizer)
    memory = clm.compress(TEXT, query="What is the pass key?")
    assert memory.slots == math.ceil(len(clm.layout.context_ids(TEXT)) / 5)  # template prefix + context


def test_ehpc_heads_artifact_is_reused_and_checked(tiny_model, tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny_model
    path = tmp_path / "heads.safetensors"
    first = build("ehpc", model, tokenizer, tmp_path, heads_path=str(path))
    scores = first.prepare()
    assert path.is_file() and scores.shape == (2, 4)
    calibration._MEMO.clear()
    monkeypatch.setattr("ctxzip.compressors.baselines.ehpc.find_evaluator_heads", _boom)
    assert torch.equal(build("ehpc", model, tokenizer, tmp_path, heads_path=str(path)).prepare(), scores)
    other, _ = tiny(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    with pytest.raises(BaseModelMismatchError, match="num_attention_heads"):
        EHPC(EHPC.config_class(heads_path=str(path)), other).use_tokenizer(tokenizer).prepare()
    with pytest.raises(CorruptArtifactError, match="'ehpc' artifact, not 'qfilters'"):
        build("qfilters", model, tokenizer, tmp_path, filters_path=str(path)).prepare()


# ----- through the eval CLI --------------------------------------------------------------------
def test_eval_cli_runs_the_calibrated_baselines_and_a_saved_gist_folder(tiny, tmp_path, monkeypatch):
    from ctxzip.compressors import GistCompressor, GistConfig, save_compressor
    from ctxzip.eval.__main__ import main

    monkeypatch.setattr(calibration, "ctxzip_home", lambda: tmp_path / "home")
    model, tokenizer = tiny()
    gist = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=4), model).eval()
    folder = save_compressor(gist, tmp_path / "gist_tiny", tokenizer)
    out = tmp_path / "run"
    args = ["--compressor", "qfilters", "ehpc", str(folder), "--tasks", "passkey", "--ratios", "2", "4",
            "--num-samples", "1", "--context-length", "64", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0  # no --base-model: it is read from the saved gist folder
    results = json.loads((out / "metrics.json").read_text())["results"]
    methods = {(r["method"], r["ratio"]) for r in results}
    assert {("qfilters", 2.0), ("qfilters", 4.0), ("ehpc", 2.0), ("ehpc", 4.0), ("gist_tiny", 0.0)} <= methods
    for r in results:
        if r["method"] in NAMES:
            assert r["achieved_ratio"] == pytest.approx(r["ratio"], rel=0.05)
        if r["method"] == "gist_tiny":
            assert r["achieved_ratio"] == pytest.approx(4.0, rel=0.1)
    # one artifact per calibrated baseline, computed once for the whole run
    assert len(list((tmp_path / "home" / "calibration").rglob("*.safetensors"))) == 2
    assert "gist_tiny" in (out / "report.md").read_text()


# ----- helpers -------------------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise AssertionError("the artifact was recomputed instead of loaded")


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["ctxzip"]


class _eager:
    """Run the model with eager attention (so that it returns attention maps)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.before = self.model.config._attn_implementation
        self.model.config._attn_implementation = "eager"

    def __exit__(self, *exc):
        self.model.config._attn_implementation = self.before
