"""CompressedLM (compress once, answer many), artifact folders, PEFT interop, load errors, Hub push / pull."""

import inspect
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import yaml
from fake_hub import ENDPOINT, FakeHfApi, FakeHub
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors.torch import load_file

from ctxzip.compressors import (
    BaseModelMismatchError,
    CompressedLM,
    CorruptArtifactError,
    EmptyInputError,
    GistCompressor,
    GistConfig,
    Memory,
    UnknownCompressorError,
    load_compressor,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ARTIFACT_FILES = {"compressor_config.json", "compressor.safetensors", "adapter_config.json",
                  "adapter_model.safetensors", "README.md"}
CONTEXT = "The passkey is 58213. Remember it. The grass is green and the sky is blue, again and again."
PROMPTS = ["What is the passkey?", "Say something about the sky, please, in a few words.", "Hi"]


def randomize(gist: GistCompressor, seed: int = 0) -> GistCompressor:
    """Random gists and a non-zero LoRA B, so that a load that drops either cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gist.named_parameters():
            if name.startswith("gist_embeddings") or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return gist


def make_clm(tiny, **config) -> CompressedLM:
    model, tokenizer = tiny()
    settings = dict(tokens_per_gist=4, segment_length=32, lora_r=4, lora_in_decoder=True)
    settings.update(config)
    return CompressedLM(randomize(GistCompressor(GistConfig(**settings), model).eval()), tokenizer)


def prompt_logits(clm: CompressedLM, memory: Memory, prompt: str = PROMPTS[0]) -> torch.Tensor:
    ids = torch.tensor([clm.prompt_ids(prompt)])
    with torch.no_grad(), clm.compressor.reading(memory):
        return clm.compressor.decoder_forward(memory, ids, torch.ones_like(ids)).logits


def lora_state(model) -> dict[str, torch.Tensor]:
    """LoRA tensors by a name that does not depend on how the model was wrapped."""
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            out[name[name.index("layers."):]] = param.detach()
    return out


@pytest.fixture
def clm(tiny) -> CompressedLM:
    return make_clm(tiny)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> tuple[Path, CompressedLM]:
    """One saved folder per module, and the CompressedLM that wrote it (never modify either)."""
    clm = make_clm(tiny)
    folder = tmp_path_factory.mktemp("saved") / "gist-tiny"
    clm.save_pretrained(folder)
    return folder, clm


@pytest.fixture
def broken(saved, tmp_path) -> Path:
    """A private copy of the saved folder, for tests that damage it."""
    return Path(shutil.copytree(saved[0], tmp_path / "copy"))


# ----- CompressedLM -----------------------------------------------------------------------------
def test_compress_strings_and_batches(clm: CompressedLM) -> None:
    memory = clm.compress(CONTEXT)
    n_tokens = len(clm.layout.context_ids(CONTEXT))  # the chat template's prefix and the context
    assert memory.batch_size == 1 and memory.source_tokens == [n_tokens]
    assert memory.slots == -(-n_tokens // 4) and not memory.tensors["key.0"].requires_grad
    batch = clm.compress([CONTEXT, "A much shorter context."])
    assert batch.batch_size == 2 and batch.source_tokens[0] == n_tokens
    assert torch.allclose(prompt_logits(clm, batch.select(0)), prompt_logits(clm, memory), atol=1e-4)
    for empty in ("", "   ", [CONTEXT, ""], []):
        with pytest.raises(EmptyInputError):
            clm.compress(empty)


def test_generate_with_strings_chat_messages_and_batches(clm: CompressedLM) -> None:
    memory = clm.compress(CONTEXT)
    answer = clm.generate(PROMPTS[0], memory=memory, max_new_tokens=5)
    assert isinstance(answer, str) and answer
    chat = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": answer},
            {"role": "user", "content": PROMPTS[1]}]
    chat_answer = clm.generate(chat, memory=memory, max_new_tokens=5)  # a follow-up turn after the memory
    assert isinstance(chat_answer, str)
    with pytest.raises(ValueError, match="system message"):  # it would come before the context
        clm.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], memory=memory)
    assert isinstance(clm.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   max_new_tokens=3), str)  # without a memory it is a plain chat
    # A one-user-turn chat is the same prompt as the plain string.
    assert clm.generate([{"role": "user", "content": PROMPTS[0]}], memory=memory, max_new_tokens=5) == answer
    both = clm.generate([PROMPTS[0], chat], memory=memory, max_new_tokens=5)
    assert both == [answer, chat_answer]
    with pytest.raises(EmptyInputError):
        clm.generate("  ", memory=memory)
    with pytest.raises(ValueError, match="not_an_argument"):  # transformers' generate names what it cannot use
        clm.generate(PROMPTS[0], memory=memory, not_an_argument=2)


def test_answer_many_equals_single_greedy_generate_calls(clm: CompressedLM) -> None:
    memory = clm.compress(CONTEXT)
    prompts = [*PROMPTS, [{"role": "user", "content": "Another one?"}]]
    many = clm.answer_many(memory, prompts, batch_size=3, max_new_tokens=6)  # batches of 3 and 1, padded
    singles = [clm.generate(p, memory=memory, max_new_tokens=6) for p in prompts]
    assert many == singles and len(set(many)) > 1
    with pytest.raises(ValueError, match="single-row"):
        clm.answer_many(clm.compress([CONTEXT, CONTEXT]), prompts)


def test_sampling_is_reproducible_with_a_seed(clm: CompressedLM) -> None:
    memory = clm.compress(CONTEXT)
    settings = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=6)
    torch.manual_seed(7)
    first = clm.generate(PROMPTS[0], memory=memory, **settings)
    torch.manual_seed(7)
    assert clm.generate(PROMPTS[0], memory=memory, **settings) == first


def test_generate_without_memory_is_plain_generation(tiny) -> None:
    clm = make_clm(tiny, lora_in_decoder=False)
    ids = torch.tensor([clm.prompt_ids(PROMPTS[1])])
    with torch.no_grad(), clm.compressor.model.disable_adapter():
        ref = clm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 eos_token_id=clm.stop_token_ids(), pad_token_id=clm.tokenizer.pad_token_id)
    expected = clm.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert clm.generate(PROMPTS[1], max_new_tokens=5) == expected


# ----- artifacts ----------------------------------------------------------------------------------
def test_saved_folder_holds_exactly_the_artifact_files(saved) -> None:
    folder, clm = saved
    assert {p.name for p in folder.iterdir()} == ARTIFACT_FILES  # no staging or temporary leftovers
    meta = json.loads((folder / "compressor_config.json").read_text())
    assert meta["compressor_type"] == "gist" and meta["memory_kind"] == "kv" and meta["has_adapter"]
    assert meta["config"] == clm.compressor.compressor_config.to_dict()
    assert meta["base_model"] == "tiny-random-llama"
    assert meta["base_signature"] == clm.compressor.base_signature and meta["tokenizer_hash"]
    assert set(load_file(folder / "compressor.safetensors")) == {"gist_embeddings.weight"}
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-random-llama" and adapter["r"] == 4
    assert all("lora_" in k for k in load_file(folder / "adapter_model.safetensors"))


def test_model_card_has_yaml_metadata(saved) -> None:
    card = (saved[0] / "README.md").read_text()
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "ctxzip" and metadata["base_model"] == "tiny-random-llama"
    assert {"ctxzip", "context-compression", "gist"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "text-generation"
    assert "license" not in metadata  # not known for this base
    assert "model-index" not in metadata  # no evaluation table
    assert "CompressedLM.from_pretrained" in body and "PeftModel.from_pretrained" in body
    assert "device_map" in body and "revision" in body  # the loading arguments
    loaded = ModelCard.load(saved[0] / "README.md")  # huggingface_hub parses it
    assert loaded.data.base_model == "tiny-random-llama" and loaded.data.library_name == "ctxzip"
    assert loaded.data.eval_results is None


TABLE = [
    {"method": "trained", "scoring": "generate", "accuracy": 0.5, "answer_logprob": -1.25, "n": 4,
     "token_accuracy": float("nan")},
    {"method": "untrained", "scoring": "generate", "accuracy": 0.25, "answer_logprob": -2.5, "n": 4,
     "token_accuracy": float("nan")},
    {"method": "full_context", "scoring": "generate", "accuracy": 0.75, "answer_logprob": -0.5, "n": 4,
     "token_accuracy": float("nan")},
]


def test_model_card_has_the_evaluation_table_and_its_model_index(tiny, tmp_path, monkeypatch) -> None:
    """The whole table and the method's note are in the text; the trained row's floats (not NaN) are the
    model-index metrics, its strings and integers their setting; ModelCard.load reads them back."""
    note = "An interpretation: no public code; the segment layout is ours."
    monkeypatch.setattr(GistCompressor, "card_note", note)
    clm = make_clm(tiny)
    clm.eval_results = TABLE
    path = clm.save_pretrained(tmp_path / "card") / "README.md"
    card = path.read_text()
    assert "## Evaluation" in card and f"## Method\n\n{note}" in card
    for row in ("| trained | generate | 0.500 | -1.250 | 4 | - |", "| untrained | generate | 0.250 |",
                "| full_context | generate | 0.750 |"):
        assert row in card, row
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "tiny-random-llama" and loaded.data.model_name == "gist-tiny-random-llama"
    results = loaded.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("accuracy", 0.5), ("answer_logprob", -1.25)]
    assert {(r.task_type, r.dataset_type, r.metric_config) for r in results} == {
        ("text-generation", "ctxzip-held-out", "scoring=generate, n=4")}
    index = yaml.safe_load(card[4:].split("\n---\n", 1)[0])["model-index"]
    assert index[0]["name"] == "gist-tiny-random-llama" and len(index[0]["results"][0]["metrics"]) == 2
    # A table without a row of the compressor's own (e.g. references only) gives no model-index.
    clm.eval_results = TABLE[1:]
    assert ModelCard.load(clm.save_pretrained(tmp_path / "refs") / "README.md").data.eval_results is None


def test_model_card_index_of_other_tables() -> None:
    """The labels the recipes write: "InComeS (trained)" beside its untrained rows (a pool size per row), CoLoR's
    "trained" corpus per reader; a table whose label is not first, or a NaN, adds nothing."""
    from ctxzip.compressors.model_card import eval_results

    edits = [{"label": "InComeS (trained)", "pool_size": 4, "n": 8, "efficacy": 0.5, "fits": True},
             {"label": "InComeS (untrained)", "pool_size": 4, "n": 8, "efficacy": 0.1, "fits": True}]
    [edit] = eval_results(edits)
    assert (edit.metric_type, edit.metric_value, edit.metric_config) == ("efficacy", 0.5,
                                                                         "pool_size=4, n=8, fits=True")
    color = [{"corpus": "uncompressed", "reader": "lm", "recall@1": 1.0},
             {"corpus": "trained", "reader": "lm", "recall@1": 0.75},
             {"corpus": "trained", "reader": "bm25", "recall@1": 0.5}]
    assert [(r.metric_name, r.metric_value) for r in eval_results(color)] == [
        ("recall@1 (reader=lm)", 0.75), ("recall@1 (reader=bm25)", 0.5)]
    assert eval_results([{"accuracy": 0.5, "method": "trained"}]) == []
    assert eval_results([{"method": "trained", "accuracy": float("nan")}]) == []
    assert eval_results(None) == []


def test_model_card_base_model_is_a_hub_id_or_left_out(tmp_path) -> None:
    from ctxzip.compressors.model_card import base_hub_id, card_data

    meta = {"compressor_type": "gist", "memory_kind": "kv", "config": {}}
    assert base_hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded alias
    assert card_data({**meta, "base_model": "smollm2-135m-instruct"}).license == "apache-2.0"
    assert base_hub_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    for local in (str(tmp_path), "./models/base", "/abs/path/base"):
        assert base_hub_id(local) is None, local
        data = card_data({**meta, "base_model": local})
        assert data.base_model is None and "base_model" not in data.to_dict()


def test_save_load_round_trip_gives_identical_logits_and_generations(saved) -> None:
    folder, clm = saved
    loaded = CompressedLM.from_pretrained(folder)
    assert isinstance(loaded.compressor, GistCompressor)
    assert loaded.compressor.compressor_config == clm.compressor.compressor_config
    assert not loaded.compressor.training
    assert torch.equal(loaded.compressor.gist_embeddings.weight, clm.compressor.gist_embeddings.weight)
    ours, theirs = lora_state(clm.compressor.model), lora_state(loaded.compressor.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    memory, loaded_memory = clm.compress(CONTEXT), loaded.compress(CONTEXT)
    for name, tensor in memory.tensors.items():
        assert torch.equal(tensor, loaded_memory.tensors[name]), name
    assert torch.equal(prompt_logits(clm, memory), prompt_logits(loaded, loaded_memory))
    assert loaded.answer_many(loaded_memory, PROMPTS, max_new_tokens=5) == \
        clm.answer_many(memory, PROMPTS, max_new_tokens=5)
    # A memory saved by one process is read by the other.
    path = memory.save(folder.parent / "memory.safetensors")
    assert torch.equal(prompt_logits(loaded, Memory.load(path)), prompt_logits(clm, memory))


def test_load_compressor_onto_a_given_model(saved, tiny) -> None:
    folder, clm = saved
    model, tokenizer = tiny()
    compressor, tok = load_compressor(folder, model=model, tokenizer=tokenizer)
    memory = clm.compress(CONTEXT)
    assert tok is tokenizer
    assert torch.equal(prompt_logits(CompressedLM(compressor, tokenizer), memory), prompt_logits(clm, memory))


def test_adapter_loads_with_plain_peft(saved, tiny) -> None:
    folder, clm = saved
    base, _ = tiny()
    peft_model = peft.PeftModel.from_pretrained(base, folder)
    ours, theirs = lora_state(clm.compressor.model), lora_state(peft_model)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert any(t.any() for k, t in theirs.items() if "lora_B" in k)


def test_embedded_base_is_named_by_its_public_id_and_loads_offline(tmp_path) -> None:
    """The artifact of an embedded-model compressor names the base HuggingFaceTB/SmolLM2-135M-Instruct (card,
    compressor_config, adapter_config: what AutoPeftModelForCausalLM resolves), and ctxzip loads that id from the
    embedded copy without the Hub (the tests run with HF_HUB_OFFLINE=1, see tests/conftest.py)."""
    from ctxzip.compressors import load_base
    from ctxzip.compressors.models import EMBEDDED_HUB_ID, EMBEDDED_MODEL, local_model_name, public_model_id

    assert public_model_id(EMBEDDED_MODEL) == EMBEDDED_HUB_ID and public_model_id("a/b") == "a/b"
    assert local_model_name(EMBEDDED_HUB_ID) == EMBEDDED_MODEL == local_model_name(EMBEDDED_HUB_ID.lower())
    assert local_model_name("tiny-random-llama") == "tiny-random-llama"
    model, tokenizer = load_base(EMBEDDED_MODEL)
    gist = randomize(GistCompressor(GistConfig(tokens_per_gist=4, segment_length=16, lora_r=2), model).eval())
    folder = CompressedLM(gist, tokenizer).save_pretrained(tmp_path / "embedded")
    meta = json.loads((folder / "compressor_config.json").read_text())
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert meta["base_model"] == adapter["base_model_name_or_path"] == EMBEDDED_HUB_ID
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == EMBEDDED_HUB_ID and card.data.license == "apache-2.0"
    assert "pypi.org" not in (folder / "README.md").read_text()
    by_id, by_id_tokenizer = load_base(adapter["base_model_name_or_path"])  # the public id, offline
    assert by_id_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(by_id.get_input_embeddings().weight, model.get_input_embeddings().weight)
    loaded = CompressedLM.from_pretrained(folder)  # reads the public id from compressor_config.json
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"][:16]])
    with torch.no_grad():
        assert torch.equal(loaded.compressor.gist_embeddings.weight, gist.gist_embeddings.weight)
        assert torch.equal(loaded.compressor.compress(ids).tensors["key.0"], gist.compress(ids).tensors["key.0"])
    assert lora_state(peft.PeftModel.from_pretrained(by_id, folder)).keys() == lora_state(gist.model).keys()


def test_untrained_gist_without_lora_saves_no_adapter(tiny, tmp_path) -> None:
    clm = make_clm(tiny, lora_r=0)
    folder = clm.save_pretrained(tmp_path / "no-lora")
    assert {p.name for p in folder.iterdir()} == {"compressor_config.json", "compressor.safetensors", "README.md"}
    loaded = CompressedLM.from_pretrained(folder)
    memory = clm.compress(CONTEXT)
    assert torch.equal(prompt_logits(loaded, loaded.compress(CONTEXT)), prompt_logits(clm, memory))


# ----- load errors -----------------------------------------------------------------------------------
def test_base_model_of_another_shape_is_refused(saved, tiny) -> None:
    other, _ = tiny(hidden_size=32, head_dim=8)
    with pytest.raises(BaseModelMismatchError, match="hidden_size"):
        load_compressor(saved[0], model=other)
    deeper, _ = tiny(num_hidden_layers=3)
    with pytest.raises(BaseModelMismatchError, match="num_hidden_layers"):
        load_compressor(saved[0], model=deeper)


def test_another_tokenizer_is_refused(saved, tiny, monkeypatch) -> None:
    model, tokenizer = tiny()
    monkeypatch.setattr(tokenizer, "chat_template", "{{ messages }}")
    with pytest.raises(BaseModelMismatchError, match="tokenizer"):
        load_compressor(saved[0], model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "wrong_tensors"])
def test_missing_or_corrupt_weights_raise_corrupt_artifact_error(broken: Path, tiny, damage: str) -> None:
    path = broken / "compressor.safetensors"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 300)
    else:
        from safetensors.torch import save_file

        save_file({"something_else": torch.zeros(3)}, str(path))
    with pytest.raises(CorruptArtifactError):
        load_compressor(broken, model=tiny()[0])


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_adapter_raises_corrupt_artifact_error(broken: Path, tiny, damage: str) -> None:
    path = broken / "adapter_model.safetensors"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CorruptArtifactError):
        load_compressor(broken, model=tiny()[0])


@pytest.mark.parametrize("content", [None, "", "{not json", "[1, 2]", "42", '"gist"', '{"compressor_type": "gist"}',
                                     "no_config_dict"])
def test_missing_or_invalid_config_raises_corrupt_artifact_error(broken: Path, content: str | None) -> None:
    path = broken / "compressor_config.json"
    if content is None:
        path.unlink()
    elif content == "no_config_dict":
        meta = json.loads(path.read_text())
        meta["config"] = [1, 2]
        path.write_text(json.dumps(meta))
    else:
        path.write_text(content)
    with pytest.raises(CorruptArtifactError):
        load_compressor(broken)


def test_unknown_compressor_type_raises(broken: Path) -> None:
    path = broken / "compressor_config.json"
    meta = json.loads(path.read_text())
    meta["compressor_type"] = "no_such_method"
    path.write_text(json.dumps(meta))
    with pytest.raises(UnknownCompressorError, match="no_such_method") as excinfo:
        load_compressor(broken)
    assert "gist" in str(excinfo.value)  # the message lists what is registered


def test_unknown_config_key_raises_value_error_naming_it(broken: Path) -> None:
    path = broken / "compressor_config.json"
    meta = json.loads(path.read_text())
    meta["config"]["tokens_per_gits"] = 8
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokens_per_gits"):
        load_compressor(broken)


def test_from_base_builds_a_fresh_compressor() -> None:
    clm = CompressedLM.from_base("gist", base_model="tiny-random-llama", tokens_per_gist=8, lora_r=0)
    assert clm.compressor.compressor_config.tokens_per_gist == 8
    assert clm.compress(CONTEXT).slots == -(-clm.compress(CONTEXT).source_tokens[0] // 8)
    with pytest.raises(UnknownCompressorError):
        CompressedLM.from_base("no_such_method", base_model="tiny-random-llama")
    with pytest.raises(ValueError, match="tokens_per_gits"):
        CompressedLM.from_base("gist", base_model="tiny-random-llama", tokens_per_gits=8)


# ----- Hub (against tests/fake_hub.py: huggingface_hub's public calls, faked in-process) -------------------
def test_push_to_hub_then_from_pretrained_round_trips(fake_hub: FakeHub, saved) -> None:
    folder, clm = saved
    repo_id = "test-user/gist-tiny"
    url = clm.push_to_hub(repo_id, private=True, token="hf_pusher", commit_message="Add the gist compressor")
    oid = fake_hub.commits[repo_id][-1]
    assert url == f"{ENDPOINT}/{repo_id}/commit/{oid}"  # the CommitInfo's commit_url
    assert fake_hub.called("HfApi") == [{"endpoint": None, "token": "hf_pusher"}]
    assert fake_hub.called("create_repo") == [{"repo_id": repo_id, "token": None, "private": True, "exist_ok": True}]
    [upload] = fake_hub.called("upload_folder")
    assert upload["repo_id"] == repo_id and upload["commit_message"] == "Add the gist compressor"
    assert fake_hub.private[repo_id] is True
    # The pushed bytes are exactly what save_pretrained writes.
    assert fake_hub.files(repo_id) == {name: (folder / name).read_bytes() for name in ARTIFACT_FILES}

    pulled = CompressedLM.from_pretrained(repo_id)
    assert fake_hub.called("snapshot_download") == [{"repo_id": repo_id, "revision": None, "cache_dir": None,
                                                     "token": None, "local_files_only": False}]
    memory = clm.compress(CONTEXT)
    pulled_memory = pulled.compress(CONTEXT)
    assert torch.equal(prompt_logits(pulled, pulled_memory), prompt_logits(clm, memory))
    assert pulled.generate(PROMPTS[0], memory=pulled_memory, max_new_tokens=5) == \
        clm.generate(PROMPTS[0], memory=memory, max_new_tokens=5)


def test_push_again_reuses_the_repo_and_a_revision_loads_that_commit(fake_hub: FakeHub, saved, tiny) -> None:
    folder, clm = saved
    repo_id = "test-user/gist-twice"
    clm.push_to_hub(repo_id)
    first = fake_hub.commits[repo_id][-1]
    other = make_clm(tiny)
    randomize(other.compressor, seed=1)
    other.push_to_hub(repo_id)  # exist_ok: the second push is a new commit of the same repo
    assert [c["private"] for c in fake_hub.called("create_repo")] == [None, None]
    assert fake_hub.called("HfApi") == [{"endpoint": None, "token": None}] * 2
    assert fake_hub.commits[repo_id][-1] != first
    memory = clm.compress(CONTEXT)
    pinned = CompressedLM.from_pretrained(repo_id, revision=first)
    assert [c["revision"] for c in fake_hub.called("snapshot_download")] == [first]
    assert torch.equal(prompt_logits(pinned, pinned.compress(CONTEXT)), prompt_logits(clm, memory))
    newest = CompressedLM.from_pretrained(repo_id)
    assert not torch.equal(newest.compressor.gist_embeddings.weight, clm.compressor.gist_embeddings.weight)
    assert torch.equal(newest.compressor.gist_embeddings.weight, other.compressor.gist_embeddings.weight)


def test_push_uploads_only_artifact_files(fake_hub: FakeHub, tmp_path, saved) -> None:
    """An output_dir holds checkpoints (a PEFT one too, whose adapter files look like a named adapter's) and
    logs: only the artifact goes up, with the named adapters its compressor_config.json lists."""
    from ctxzip.compressors.hub import push_folder

    folder = Path(shutil.copytree(saved[0], tmp_path / "output_dir"))
    checkpoint = folder / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "trainable.safetensors").write_bytes(b"x")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copyfile(folder / name, checkpoint / name)
        (folder / "second").mkdir(exist_ok=True)
        shutil.copyfile(folder / name, folder / "second" / name)
    (folder / "trainer_log.txt").write_text("log")
    meta = json.loads((folder / "compressor_config.json").read_text())
    meta["adapters"] = ["default", "second"]
    (folder / "compressor_config.json").write_text(json.dumps(meta))
    url = push_folder(folder, "test-user/gist-tiny-output-dir", commit_message="from an output_dir")
    [upload] = fake_hub.called("upload_folder")
    assert upload["folder_path"] == str(folder) and upload["commit_message"] == "from an output_dir"
    expected = ARTIFACT_FILES | {"second/adapter_model.safetensors", "second/adapter_config.json"}
    assert fake_hub.files("test-user/gist-tiny-output-dir") == {n: (folder / n).read_bytes() for n in expected}
    assert url.endswith(fake_hub.commits["test-user/gist-tiny-output-dir"][-1])

    (tmp_path / "not-an-artifact").mkdir()
    (tmp_path / "not-an-artifact" / "README.md").write_text("hello")
    with pytest.raises(CorruptArtifactError, match="compressor_config.json"):
        push_folder(tmp_path / "not-an-artifact", "test-user/nothing")
    assert "test-user/nothing" not in fake_hub.commits  # refused before the repo is created


def test_unknown_repo_or_revision_is_a_clear_error(fake_hub: FakeHub, saved) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from ctxzip.compressors import CtxzipError

    with pytest.raises(CtxzipError, match="neither a local folder nor a Hub repo") as excinfo:
        CompressedLM.from_pretrained("test-user/never-pushed")
    assert isinstance(excinfo.value.__cause__, RepositoryNotFoundError)
    saved[1].push_to_hub("test-user/gist-tiny")
    with pytest.raises(CtxzipError, match="'test-user/gist-tiny' has no revision 'v9'") as excinfo:
        CompressedLM.from_pretrained("test-user/gist-tiny", revision="v9")
    assert isinstance(excinfo.value.__cause__, RevisionNotFoundError)
    assert [c["revision"] for c in fake_hub.called("snapshot_download")] == [None, "v9"]


def test_push_to_a_branch_creates_it_and_leaves_main(fake_hub: FakeHub, saved, tiny) -> None:
    """``revision`` is the branch the one commit goes to: created from main when it does not exist (then reused);
    main keeps what it had, and ``from_pretrained(revision=branch)`` loads the branch."""
    folder, clm = saved
    repo_id = "test-user/gist-branches"
    clm.push_to_hub(repo_id)
    main = fake_hub.commits[repo_id][-1]
    other = make_clm(tiny)
    randomize(other.compressor, seed=2)
    url = other.push_to_hub(repo_id, revision="dev", commit_message="a candidate", token="hf_pusher")
    dev = fake_hub.branches[repo_id]["dev"]
    assert url.endswith(dev) and fake_hub.branches[repo_id]["main"] == main
    assert fake_hub.called("create_branch") == [{"repo_id": repo_id, "branch": "dev", "revision": None,
                                                 "token": None, "exist_ok": True}]
    last = fake_hub.called("upload_folder")[-1]
    assert (last["revision"], last["commit_message"]) == ("dev", "a candidate")
    assert fake_hub.called("HfApi")[-1]["token"] == "hf_pusher"
    assert fake_hub.files(repo_id, "main") == {name: (folder / name).read_bytes() for name in ARTIFACT_FILES}
    other.push_to_hub(repo_id, revision="dev")  # the branch exists: a second commit on it
    assert fake_hub.branches[repo_id]["dev"] != dev and fake_hub.branches[repo_id]["main"] == main
    pulled = CompressedLM.from_pretrained(repo_id, revision="dev")
    assert torch.equal(pulled.compressor.gist_embeddings.weight, other.compressor.gist_embeddings.weight)
    assert torch.equal(CompressedLM.from_pretrained(repo_id).compressor.gist_embeddings.weight,
                       clm.compressor.gist_embeddings.weight)
    with pytest.raises(ValueError, match="needs a branch name"):
        clm.push_to_hub(repo_id, revision=main)  # a commit hash is no branch
    assert len(fake_hub.called("upload_folder")) == 3


def test_push_to_a_name_without_namespace_lands_in_the_users(fake_hub: FakeHub, saved) -> None:
    url = saved[1].push_to_hub("gist-bare")
    assert "test-user/gist-bare" in fake_hub.commits and "/test-user/gist-bare/commit/" in url
    assert fake_hub.called("upload_folder")[0]["repo_id"] == "test-user/gist-bare"  # the id create_repo returned


def test_loading_arguments_reach_snapshot_download(fake_hub: FakeHub, saved, tmp_path) -> None:
    """revision, token, cache_dir and local_files_only go to snapshot_download; local_files_only serves only what
    an earlier download put in that cache, and a snapshot that is not there is a clear error."""
    from ctxzip.compressors import CtxzipError

    folder, clm = saved
    repo_id = "test-user/gist-load-args"
    clm.push_to_hub(repo_id)
    oid = fake_hub.commits[repo_id][-1]
    cache = tmp_path / "hub-cache"
    with pytest.raises(CtxzipError, match="not in the local cache"):
        CompressedLM.from_pretrained(repo_id, cache_dir=cache, local_files_only=True)
    loaded = CompressedLM.from_pretrained(repo_id, revision=oid, token="hf_reader", cache_dir=cache)
    again = CompressedLM.from_pretrained(repo_id, revision=oid, token="hf_reader", cache_dir=cache,
                                         local_files_only=True)
    assert fake_hub.called("snapshot_download") == [
        {"repo_id": repo_id, "revision": None, "cache_dir": cache, "token": None, "local_files_only": True},
        {"repo_id": repo_id, "revision": oid, "cache_dir": cache, "token": "hf_reader", "local_files_only": False},
        {"repo_id": repo_id, "revision": oid, "cache_dir": cache, "token": "hf_reader", "local_files_only": True}]
    for clm_loaded in (loaded, again):
        assert torch.equal(clm_loaded.compressor.gist_embeddings.weight, clm.compressor.gist_embeddings.weight)
    compressor, _ = load_compressor(repo_id, revision=oid, token="hf_other", cache_dir=cache)  # the function too
    assert fake_hub.called("snapshot_download")[-1]["token"] == "hf_other"
    assert torch.equal(compressor.gist_embeddings.weight, clm.compressor.gist_embeddings.weight)


def test_device_map_dtype_and_hub_arguments_reach_the_base_model(fake_hub: FakeHub, saved, tiny, tmp_path,
                                                                 monkeypatch) -> None:
    """A base model from a folder loads through transformers' from_pretrained with device_map, dtype, token,
    cache_dir and local_files_only (the tokenizer with the Hub ones); the compressor's tensors follow the base's
    dtype, and it generates. A device_map with a given model, or beside device=, is refused."""
    import ctxzip.compressors.models as models

    folder, clm = saved
    model, tokenizer = tiny()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    calls: dict[str, list[dict]] = {"model": [], "tokenizer": []}
    for key, auto in (("model", models.AutoModelForCausalLM), ("tokenizer", models.AutoTokenizer)):
        original = auto.from_pretrained

        def spy(path, *args, _original=original, _key=key, **kwargs):
            calls[_key].append({"path": str(path), **kwargs})
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    repo_id = "test-user/gist-device-map"
    clm.push_to_hub(repo_id)
    cache = tmp_path / "cache"
    loaded = CompressedLM.from_pretrained(repo_id, base_model=str(base), device_map="cpu", dtype="bfloat16",
                                          token="hf_reader", cache_dir=cache)
    [model_call] = [c for c in calls["model"] if c["path"] == str(base)]
    assert model_call["device_map"] == "cpu" and model_call["dtype"] == torch.bfloat16
    assert model_call["token"] == "hf_reader" and model_call["cache_dir"] == cache
    assert "local_files_only" not in model_call  # only what is set
    assert [c for c in calls["tokenizer"] if c["path"] == str(base)][-1]["token"] == "hf_reader"
    assert loaded.device == torch.device("cpu") and loaded.model.dtype == torch.bfloat16
    assert loaded.compressor.gist_embeddings.weight.dtype == torch.bfloat16
    assert isinstance(loaded.generate(PROMPTS[0], memory=loaded.compress(CONTEXT), max_new_tokens=3), str)
    CompressedLM.from_pretrained(folder, base_model=str(base), local_files_only=True)
    assert calls["model"][-1]["local_files_only"] is True and calls["tokenizer"][-1]["local_files_only"] is True
    with pytest.raises(ValueError, match="device_map"):
        load_compressor(folder, model=tiny()[0], device_map="cpu")
    with pytest.raises(ValueError, match="not both"):
        CompressedLM.from_pretrained(folder, device="cpu", device_map="cpu")


def test_the_fake_hub_has_the_signatures_of_huggingface_hub() -> None:
    """Every argument the fake takes, the installed huggingface_hub takes too, in the same position or as a
    keyword as there, with the same default; and the fake takes every argument huggingface_hub requires. So a call
    that the fake accepts is one huggingface_hub accepts: the fake cannot drift from the public API."""
    def parameters(function) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(function).parameters.items() if n != "self"}

    for fake, real in [(FakeHub.HfApi, HfApi.__init__), (FakeHfApi.create_repo, HfApi.create_repo),
                       (FakeHfApi.create_branch, HfApi.create_branch), (FakeHfApi.upload_folder, HfApi.upload_folder),
                       (FakeHub.snapshot_download, snapshot_download)]:
        ours, theirs = parameters(fake), parameters(real)
        assert set(ours) <= set(theirs), f"{fake.__qualname__}: {sorted(set(ours) - set(theirs))} not in huggingface_hub"
        for name, parameter in ours.items():
            assert (parameter.kind, parameter.default) == (theirs[name].kind, theirs[name].default), \
                f"{fake.__qualname__}({name}) differs from huggingface_hub's {theirs[name]}"
        positional = [n for n, p in theirs.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert [n for n, p in ours.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == \
            positional[:len([p for p in ours.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD])]
        assert {n for n, p in theirs.items() if p.default is inspect.Parameter.empty} <= set(ours), fake.__qualname__


@pytest.mark.parametrize("context", ["The pass key is 48213. Remember it.", "Grass is green\nand the sky is blue"])
def test_the_conversation_is_what_the_chat_template_tokenizes(tiny, context: str) -> None:
    """Ratio 1's reference is the tokenizer's own chat template over the user turn context + separator + prompt.
    (The context is tokenized on its own, since a memory is made before any prompt exists: where its last
    characters would merge with the separator into one token, e.g. trailing whitespace, the two differ there.)"""
    from ctxzip.compressors.conversation import SEPARATOR, ConversationLayout

    _, tokenizer = tiny()
    layout = ConversationLayout(tokenizer)
    question = "What is the pass key?"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": context + SEPARATOR + question}],
                                             add_generation_prompt=True, tokenize=False)
    assert layout.conversation_ids(question, context) == layout.encode(rendered)
