"""Memory: facts (ratio, bytes), transforms (cat / select / stack / to), persistence and its errors."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import ctxzip.compressors as compressors
from ctxzip.compressors import (
    BaseModelMismatchError,
    CorruptArtifactError,
    GistCompressor,
    GistConfig,
    Memory,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
SIGNATURE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": LAYERS}


def kv_memory(batch: int = 2, slots: int = 3, seed: int = 0, source: list[int] | None = None,
              dtype: torch.dtype = torch.float32, slot_mask: bool = False) -> Memory:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"{part}.{layer}": torch.randn(batch, KV_HEADS, slots, HEAD_DIM, generator=gen).to(dtype)
               for layer in range(LAYERS) for part in ("key", "value")}
    if slot_mask:
        mask = torch.ones(batch, slots, dtype=torch.int8)
        mask[0, 0] = 0
        tensors["slot_mask"] = mask
    source = source or [4 * slots - i for i in range(batch)]
    return Memory(kind="kv", tensors=tensors, source_tokens=source, slots=slots,
                  position_offset=[s + slots for s in source], compressor_type="test",
                  base_signature=dict(SIGNATURE), meta={"note": "unit test"})


def tensor_bytes(memory: Memory) -> int:
    return sum(t.numel() * t.element_size() for t in memory.tensors.values())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ----- facts --------------------------------------------------------------------------------
def test_ratio_is_context_tokens_per_slot() -> None:
    memory = kv_memory(batch=2, slots=4, source=[12, 8])
    assert memory.batch_size == 2 and memory.num_layers == LAYERS
    assert memory.ratio == pytest.approx(20 / 8)
    assert kv_memory(batch=1, slots=3, source=[13]).ratio == pytest.approx(13 / 3)


def test_ratio_follows_the_kind_rules() -> None:
    masked = kv_memory(batch=2, slots=3, source=[12, 8], slot_mask=True)  # row 0 holds 2 real slots
    assert masked.real_slots == [2.0, 3.0] and masked.ratio == pytest.approx(20 / 5)
    pyramid = kv_memory(batch=1, slots=4, source=[16])
    pyramid.meta["layer_slots"] = [[4, 2]]  # per layer: a padded layer counts its real slots only
    assert pyramid.real_slots == [3.0] and pyramid.ratio == pytest.approx(16 / 3)
    latent = Memory(kind="latent_kv", tensors={"positions": torch.zeros(1, 10, dtype=torch.int32)},
                    source_tokens=[10], slots=10, position_offset=[10], compressor_type="cskv",
                    meta={"full_kv_nbytes": 400})
    assert latent.ratio == pytest.approx(400 / 40)  # bytes of the plain K/V cache over bytes held
    with pytest.raises(ValueError, match="cannot be concatenated"):
        latent.cat(latent)


def test_expand_repeats_one_row_for_many_prompts() -> None:
    one = kv_memory(batch=1, slots=3, source=[9])
    three = one.expand(3)
    assert three.batch_size == 3 and three.tensors["key.0"].shape[0] == 3 and three.ratio == one.ratio
    assert torch.equal(three.tensors["key.1"][2], one.tensors["key.1"][0])
    assert kv_memory(batch=2).expand(2).batch_size == 2
    with pytest.raises(ValueError, match="2 rows but the prompts have 3"):
        kv_memory(batch=2).expand(3)


def test_nbytes_counts_the_real_tensor_bytes() -> None:
    memory = kv_memory(batch=2, slots=3)
    expected = 2 * LAYERS * 2 * KV_HEADS * 3 * HEAD_DIM * 4  # key+value, layers, fp32
    assert memory.nbytes == tensor_bytes(memory) == expected
    assert memory.to(dtype=torch.float16).nbytes == expected // 2
    masked = kv_memory(batch=2, slots=3, slot_mask=True)
    assert masked.nbytes == expected + 2 * 3  # int8 slot mask
    text = Memory(kind="text", tensors={}, source_tokens=[10], slots=2, position_offset=[0],
                  compressor_type="test", texts=["héllo"])
    assert text.nbytes == len("héllo".encode()) == 6


def test_nbytes_equals_the_payload_of_the_saved_file(tmp_path) -> None:
    memory = kv_memory(batch=2, slots=5, slot_mask=True)
    path = memory.save(tmp_path / "m.safetensors")
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert len(raw) - 8 - header_len == memory.nbytes


def test_gist_memory_nbytes_and_ratio_match_its_shape(tiny) -> None:
    model, _ = tiny()
    gist = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=64, lora_r=0), model).eval()
    with torch.no_grad():
        memory = gist.compress(torch.randint(10, 1000, (1, 13)))
    assert memory.slots == 4 and memory.ratio == pytest.approx(13 / 4)
    sig = memory.base_signature
    per_slot = 2 * sig["num_hidden_layers"] * sig["num_key_value_heads"] * sig["head_dim"] * 4
    assert memory.nbytes == per_slot * memory.slots == tensor_bytes(memory)


def test_unknown_kind_and_ragged_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown memory kind"):
        Memory(kind="nope", tensors={}, source_tokens=[1], slots=1, position_offset=[1], compressor_type="t")
    with pytest.raises(ValueError, match="one entry per row"):
        Memory(kind="kv", tensors={}, source_tokens=[1, 2], slots=1, position_offset=[1], compressor_type="t")


# ----- persistence ----------------------------------------------------------------------------
@pytest.mark.parametrize("slot_mask", [False, True])
def test_save_load_round_trip(tmp_path, slot_mask: bool) -> None:
    memory = kv_memory(batch=2, slots=3, slot_mask=slot_mask, dtype=torch.bfloat16)
    path = memory.save(tmp_path / "sub" / "memory.safetensors")
    loaded = Memory.load(path)
    assert_same_tensors(loaded.tensors, memory.tensors)
    for name in ("kind", "source_tokens", "slots", "position_offset", "compressor_type", "base_signature",
                 "texts", "meta"):
        assert getattr(loaded, name) == getattr(memory, name), name
    assert loaded.ratio == memory.ratio and loaded.nbytes == memory.nbytes


def test_text_memory_round_trip(tmp_path) -> None:
    memory = Memory(kind="text", tensors={}, source_tokens=[40, 30], slots=8, position_offset=[0, 0],
                    compressor_type="color", texts=["short one", "ünïcode two"])
    loaded = Memory.load(memory.save(tmp_path / "t.safetensors"))
    assert loaded.texts == memory.texts and loaded.kind == "text" and loaded.tensors == {}


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "memory.safetensors"
    kv_memory(seed=1).save(path)
    assert os.listdir(tmp_path) == ["memory.safetensors"]  # no temporary file left beside it
    kv_memory(seed=2).save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["memory.safetensors"]
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):  # write half a file, then die
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(compressors.memory, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        kv_memory(seed=3).save(path)
    assert os.listdir(tmp_path) == ["memory.safetensors"]
    assert path.read_bytes() == before  # the old memory is intact
    assert_same_tensors(Memory.load(path).tensors, kv_memory(seed=2).tensors)


def _write_corrupt(kind: str, path, good: bytes) -> None:
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated_header":
        path.write_bytes(good[:20])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no_metadata":
        save_file({"key.0": torch.zeros(1, 2, 3, 4)}, str(path))
    elif kind == "other_metadata":
        save_file({"key.0": torch.zeros(1, 2, 3, 4)}, str(path), metadata={"format": "pt"})
    elif kind == "bad_json_header":
        save_file({"key.0": torch.zeros(1)}, str(path), metadata={"ctxzip": "{not json"})
    elif kind == "incomplete_header":
        save_file({"key.0": torch.zeros(1)}, str(path),
                  metadata={"ctxzip": json.dumps({"format": "ctxzip.memory/1", "kind": "kv"})})
    elif kind == "wrong_format":
        header = json.loads(good[8 : 8 + struct.unpack("<Q", good[:8])[0]])["__metadata__"]["ctxzip"]
        info = json.loads(header)
        info["format"] = "ctxzip.memory/999"
        save_file({"key.0": torch.zeros(1)}, str(path), metadata={"ctxzip": json.dumps(info)})


@pytest.mark.parametrize("kind", ["truncated", "truncated_header", "random", "empty", "no_metadata",
                                  "other_metadata", "bad_json_header", "incomplete_header", "wrong_format"])
def test_loading_a_corrupt_file_raises_corrupt_artifact_error(tmp_path, kind: str) -> None:
    good = kv_memory().save(tmp_path / "good.safetensors").read_bytes()
    path = tmp_path / "bad.safetensors"
    _write_corrupt(kind, path, good)
    with pytest.raises(CorruptArtifactError):
        Memory.load(path)


def test_loading_a_missing_file_raises_corrupt_artifact_error(tmp_path) -> None:
    with pytest.raises(CorruptArtifactError, match="no memory file"):
        Memory.load(tmp_path / "absent.safetensors")


# ----- transforms -------------------------------------------------------------------------------
def test_cat_appends_along_the_slot_axis() -> None:
    a, b = kv_memory(batch=2, slots=3, seed=0), kv_memory(batch=2, slots=2, seed=1, source=[5, 6])
    joined = a.cat(b)
    assert joined.slots == 5
    assert joined.source_tokens == [a.source_tokens[0] + 5, a.source_tokens[1] + 6]
    assert joined.position_offset == b.position_offset  # the decoder continues after the last segment
    for name, tensor in joined.tensors.items():
        assert tensor.shape == (2, KV_HEADS, 5, HEAD_DIM)
        assert torch.equal(tensor[:, :, :3], a.tensors[name]) and torch.equal(tensor[:, :, 3:], b.tensors[name])
    assert a.slots == 3 and a.tensors["key.0"].shape[2] == 3  # inputs are not modified


def test_cat_of_masked_and_unmasked_memories_keeps_a_slot_mask() -> None:
    a, b = kv_memory(batch=2, slots=3, slot_mask=True), kv_memory(batch=2, slots=2, seed=1)
    for joined, expected in [(a.cat(b), [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),
                             (b.cat(a), [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])]:
        assert joined.tensors["slot_mask"].tolist() == expected
        assert joined.tensors["key.1"].shape[2] == 5


def test_cat_refuses_incompatible_memories() -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        kv_memory(batch=2).cat(kv_memory(batch=1))
    embeds = Memory(kind="embeds", tensors={"embeds": torch.zeros(2, 3, 64)}, source_tokens=[1, 1], slots=3,
                    position_offset=[3, 3], compressor_type="t")
    with pytest.raises(ValueError, match="cannot combine"):
        kv_memory(batch=2).cat(embeds)
    other = Memory(kind="embeds", tensors={"vectors": torch.zeros(2, 3, 64)}, source_tokens=[1, 1], slots=3,
                   position_offset=[3, 3], compressor_type="t")
    with pytest.raises(ValueError, match=r"different tensors \(only in one: \['embeds', 'vectors'\]\)"):
        embeds.cat(other)
    wider = Memory(kind="embeds", tensors={"embeds": torch.zeros(2, 3, 64)}, source_tokens=[1, 1], slots=3,
                   position_offset=[3, 3], compressor_type="t", base_signature={"hidden_size": 64})
    with pytest.raises(BaseModelMismatchError):
        wider.cat(wider._replace(base_signature={"hidden_size": 32}))


def test_embeds_memories_cat_on_dim_1() -> None:
    a = Memory(kind="embeds", tensors={"embeds": torch.zeros(1, 3, 8)}, source_tokens=[6], slots=3,
               position_offset=[3], compressor_type="t")
    b = Memory(kind="embeds", tensors={"embeds": torch.ones(1, 2, 8)}, source_tokens=[4], slots=2,
               position_offset=[5], compressor_type="t")
    joined = a.cat(b)
    assert joined.tensors["embeds"].shape == (1, 5, 8) and joined.tensors["embeds"][0, 3:].eq(1).all()
    assert joined.source_tokens == [10] and joined.ratio == 2.0


def test_select_and_stack_are_inverse() -> None:
    memory = kv_memory(batch=3, slots=4, source=[16, 9, 12])
    rows = [memory.select(i) for i in range(3)]
    assert [r.batch_size for r in rows] == [1, 1, 1]
    assert rows[1].source_tokens == [9] and rows[1].position_offset == [13]
    assert torch.equal(rows[2].tensors["value.1"][0], memory.tensors["value.1"][2])
    stacked = Memory.stack(rows)
    assert_same_tensors(stacked.tensors, memory.tensors)
    assert stacked.source_tokens == memory.source_tokens and stacked.position_offset == memory.position_offset
    # A masked row and an unmasked one stack into a masked batch.
    mixed = Memory.stack([kv_memory(batch=1, slots=3, slot_mask=True), kv_memory(batch=1, slots=3, seed=4)])
    assert mixed.tensors["slot_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_stack_refuses_different_slot_counts() -> None:
    with pytest.raises(ValueError, match="slot counts"):
        Memory.stack([kv_memory(batch=1, slots=3), kv_memory(batch=1, slots=4)])


def test_to_changes_device_and_float_dtype_only() -> None:
    memory = kv_memory(batch=2, slots=3, slot_mask=True)
    half = memory.to("cpu", dtype=torch.float16)
    assert half.tensors["key.0"].dtype == torch.float16 and half.tensors["slot_mask"].dtype == torch.int8
    assert torch.allclose(half.tensors["key.0"].float(), memory.tensors["key.0"], atol=1e-2)
    assert memory.tensors["key.0"].dtype == torch.float32  # a new Memory, the old one untouched
    moved = memory.to(torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in moved.tensors.values())
    assert_same_tensors(moved.tensors, memory.tensors)
    assert moved.source_tokens == memory.source_tokens and moved.base_signature == memory.base_signature


def test_detach_drops_the_graph() -> None:
    memory = kv_memory()
    memory.tensors["key.0"].requires_grad_(True)
    assert not memory.detach().tensors["key.0"].requires_grad


# ----- base model checks -----------------------------------------------------------------------
def test_memory_from_another_base_shape_is_refused(tiny, tmp_path) -> None:
    model, _ = tiny()
    small, _ = tiny(hidden_size=32, head_dim=8)
    config = GistConfig(tokens_per_gist=4, segment_length=32, lora_r=0)
    gist = GistCompressor(config, model).eval()
    other = GistCompressor(config, small).eval()
    prompt = torch.randint(10, 1000, (1, 3))
    with torch.no_grad():
        memory = gist.compress(torch.randint(10, 1000, (1, 9)))
        gist.decoder_forward(memory, prompt, torch.ones_like(prompt))  # its own base reads it
        with pytest.raises(BaseModelMismatchError, match="another base model"):
            other.decoder_forward(memory, prompt, torch.ones_like(prompt))
        loaded = Memory.load(memory.save(tmp_path / "m.safetensors"))  # the signature survives a file
        with pytest.raises(BaseModelMismatchError):
            other.decoder_forward(loaded, prompt, torch.ones_like(prompt))
    with pytest.raises(BaseModelMismatchError):
        memory.check_base(other.base_signature)
    memory.check_base(gist.base_signature)
