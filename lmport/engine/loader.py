"""Resolve a model name to a local HF-format directory and load it: config, tokenizer, native model, weights.

No network access, ever: hub ids are only looked up in the local HF cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from lmport import kernels
from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams, ModelNotFound, UnsupportedModel
from lmport.engine.bundled_minilm import NAMES as MINILM_NAMES
from lmport.engine.bundled_minilm import minilm_dir
from lmport.engine.gguf_convert import BUNDLED_NAMES, bundled_gguf, convert_gguf
from lmport.engine.gguf_weights import checked_gguf_source, load_gguf_linears
from lmport.engine.models import get_model_class
from lmport.engine.models.layers import pack_cpu_linears
from lmport.engine.parallel import TensorParallelGroup, check_tensor_parallel, shard_model
from lmport.engine.prequantized import (CheckpointQuantization, attach_prequantized, check_prequantized_target,
                                        checkpoint_quantization, dequantizing)
from lmport.engine.quantization import check_quantizable, quantize_linears

logger = logging.getLogger("lmport")

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    model_path: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: list[int]  # generation_config's, then the tokenizer's
    vocab_size: int  # width of the logits (the config's vocab_size)
    tp: TensorParallelGroup | None = None  # the ranks sharing this model when it is a tensor-parallel shard

    @property
    def is_encoder(self) -> bool:
        """An embedding-only encoder (BertModel), served without the KV cache by EncoderEngine."""
        return getattr(self.model, "is_encoder", False)


# --- resolution ---

# Models shipped by installed packages: the SmolLM2 GGUF (converted once), all-MiniLM-L6-v2 (extracted once).
_BUNDLED = {**{name: lambda: convert_gguf(bundled_gguf()) for name in BUNDLED_NAMES},
            **{name: minilm_dir for name in MINILM_NAMES}}


def resolve_model(model: str, revision: str | None = None, field: str = "model") -> Path:
    """Map `model` to a local HF-format directory: a bundled model (SmolLM2, all-MiniLM-L6-v2), a local HF directory,
    a local .gguf file (converted once), or a hub id present in the local HF cache. Raises ModelNotFound, or
    InvalidParams (naming `field`) for a file that is not .gguf and for a revision given with a local model."""
    bundled = _BUNDLED.get(model.lower())
    if bundled is not None:
        if revision is not None:
            raise InvalidParams("revision", f"the bundled model {model!r} has no revisions; drop revision")
        return bundled()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InvalidParams(field, f"{path} is a file but not a .gguf file; {field} takes a model directory "
                                       "(config.json, tokenizer files, *.safetensors), a .gguf file or a hub id")
        _reject_local_revision(revision, path, "a local .gguf file")
        return convert_gguf(path)
    if path.is_dir():
        _reject_local_revision(revision, path, "a local directory")
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a directory but has no config.json; a model directory needs "
                                "config.json, tokenizer files and *.safetensors weights")
        return path
    if path.exists() or path.suffix == ".gguf" or not _HUB_ID.fullmatch(model) or model.startswith("."):
        raise ModelNotFound(f"{model!r} is neither a model directory nor a .gguf file (no such path: {path})")
    return _from_hf_cache(model, revision)


def _reject_local_revision(revision: str | None, path: Path, what: str) -> None:
    if revision is not None:
        raise InvalidParams("revision", f"only applies to hub ids looked up in the local HF cache; {path} is {what}: "
                                        "drop revision")


def hf_hub_cache() -> Path:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/...)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


# What lmport reads from a hub repo; .bin / .pt / .gguf / ONNX / other frameworks' weights are never fetched.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt",
             "chat_template.jinja", "*.safetensors", "model.safetensors.index.json", "sentence_bert_config.json",
             "modules.json", "1_Pooling/config.json"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hf_cache(repo_id: str, revision: str | None) -> Path:
    """The local HF cache's snapshot of repo_id at revision, downloaded first when the cache lacks it (unless
    HF_HUB_OFFLINE). HF_ENDPOINT and HF_TOKEN are read at call time; huggingface_hub's progress bars go to stderr
    (the worker's stdout is its protocol pipe)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hf_hub_cache()
    looked = cache / f"models--{repo_id.replace('/', '--')}"
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                          allow_patterns=HUB_FILES))
    except HFValidationError as exc:
        raise ModelNotFound(f"model {repo_id!r} is neither a local path nor a valid hub id ({exc})") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        if hub_offline():
            raise ModelNotFound(
                f"model {repo_id!r} (revision {revision or 'main'}) is neither a local path nor in the local HF "
                f"cache: looked in {looked} (cache {cache}: set HF_HUB_CACHE or HF_HOME to use another), and "
                f"HF_HUB_OFFLINE is set, so it is not downloaded. Unset HF_HUB_OFFLINE, run `hf download {repo_id}` "
                f"where there is network (then copy the cache here), or pass a local model directory or .gguf "
                f"file as model ('smollm2' is the bundled default).") from None
        snapshot = _download(repo_id, revision, cache)
    if not (snapshot / "config.json").is_file():
        raise ModelNotFound(f"the cached snapshot {snapshot} of {repo_id!r} has no config.json")
    return snapshot


def _download(repo_id: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    logger.warning("downloading %s (revision %s) from %s into %s", repo_id, revision or "main",
                   endpoint or "https://huggingface.co", cache)
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES,
                                      endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None))
    except RevisionNotFoundError:
        raise InvalidParams("revision", f"{revision!r} is not a branch, tag or commit of {repo_id!r}") from None
    except GatedRepoError:
        raise ModelNotFound(f"model {repo_id!r} is gated: accept its terms on the hub and set HF_TOKEN to a token "
                            "that has access") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"model {repo_id!r} is not on the hub (or is private: set HF_TOKEN), nor a local path "
                            "or a bundled model ('smollm2')") from None
    except (HfHubHTTPError, OSError) as exc:  # network down, server error, disk full
        raise ModelNotFound(f"could not download {repo_id!r} from {endpoint or 'https://huggingface.co'}: "
                            f"{type(exc).__name__}: {exc}. Set HF_HUB_OFFLINE=1 to use only the local cache") from None


# --- options ---

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParams("device", f"{device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if (resolved.index or 0) >= torch.cuda.device_count():
            raise InvalidParams("device", f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return resolved


def resolve_dtype(dtype: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """Explicit dtypes are honoured. "auto" takes the config's dtype (float32 when it names none), except that
    float32 becomes bfloat16 on CUDA (float16 without bf16 support), as vLLM does, and float16 becomes bfloat16
    on CPU, where float16 matmuls have no fast kernels."""
    if dtype != "auto":
        return _DTYPES[dtype]
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(declared, str):
        declared = _DTYPES.get(declared, torch.float32)
    if device.type == "cuda" and declared == torch.float32:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and declared == torch.float16:
        return torch.bfloat16
    return declared


def resolve_max_model_len(requested: int | None, limit: int, default: int | None = None) -> int:
    if requested is None:
        return min(limit, default or limit)
    if requested > limit:
        raise InvalidParams("max_model_len", f"{requested} exceeds the model's limit of {limit} tokens "
                                             f"(max_position_embeddings / RoPE scaling / sliding window); "
                                             f"use a value <= {limit} or leave it unset")
    return requested


def sentence_transformers_max_len(model_path: Path) -> int | None:
    """The max_seq_length a sentence-transformers model was trained with (sentence_bert_config.json), which is
    shorter than its position table (all-MiniLM-L6-v2: 256 of 512): the default max_model_len for such a model."""
    st_config = model_path / "sentence_bert_config.json"
    if not st_config.is_file():
        return None
    return json.loads(st_config.read_text()).get("max_seq_length")


def eos_token_ids(model_path: Path, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    declared = hf_config.eos_token_id
    if (model_path / "generation_config.json").is_file():
        declared = GenerationConfig.from_pretrained(model_path).eos_token_id
    ids = declared if isinstance(declared, list) else [declared]
    return list(dict.fromkeys(i for i in [*ids, tokenizer.eos_token_id] if i is not None))


# --- weights ---

def safetensors_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_path / s for s in shards]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"{model_path} has no *.safetensors weights (lmport loads safetensors only; convert "
                            "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))")
    return files


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from memory-mapped safetensors files; each tensor is read when the model copies it."""
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(config: EngineConfig, tp: TensorParallelGroup | None = None) -> LoadedModel:
    """Load config's model. With tensor_parallel_size > 1 every rank keeps its shard (lmport.engine.parallel): rank 0
    (tp None) checks that the model splits, then starts the other ranks, which load theirs alongside (tp given)."""
    start = time.perf_counter()
    model_path = resolve_model(config.model, config.revision)
    try:
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
    except (ValueError, KeyError) as exc:  # e.g. a model_type this transformers does not know
        raise UnsupportedModel(f"cannot read {model_path / 'config.json'}: {exc}") from exc
    prequantized = checkpoint_quantization(hf_config, config.quantization, model_path)
    model_cls = get_model_class(hf_config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    if prequantized is not None:
        check_prequantized_target(prequantized, device, config.tensor_parallel_size)
    # a vision-language checkpoint (Gemma 3) serves text through its language model: from here on the model and
    # the engine see its text config (text-only configs return themselves)
    hf_config = hf_config.get_text_config()
    max_model_len = resolve_max_model_len(config.max_model_len, model_cls.max_context_len(hf_config),
                                          sentence_transformers_max_len(model_path))
    tokenizer_path = resolve_model(config.tokenizer, field="tokenizer") if config.tokenizer else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=config.trust_remote_code)

    started = None
    if config.tensor_parallel_size > 1 and tp is None:
        from lmport.engine.tp_worker import launch  # it imports this module

        check_tensor_parallel(model_cls, hf_config, config.tensor_parallel_size, device)
        tp = started = launch(config)
    try:
        return _build(config, model_cls, hf_config, model_path, tokenizer, dtype, device, max_model_len, tp, start,
                      prequantized)
    except BaseException:
        if started is not None:
            started.close()
        raise


def _build(config: EngineConfig, model_cls: type[nn.Module], hf_config: PretrainedConfig, model_path: Path,
           tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, device: torch.device, max_model_len: int,
           tp: TensorParallelGroup | None, start: float, prequantized: CheckpointQuantization | None) -> LoadedModel:
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(hf_config, max_model_len)
    files = safetensors_files(model_path)
    io_start = time.perf_counter()
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # of an AWQ / GPTQ checkpoint
    weights = iter_weights(files)
    with torch.no_grad():
        model.load_weights(weights if prequantized is None else dequantizing(weights, prequantized, codes))
        if tp is not None:  # before quantizing or packing, which then work on the shard
            shard_model(model, tp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    io_seconds = time.perf_counter() - io_start
    num_bytes = sum(f.stat().st_size for f in files)
    num_params = sum(p.numel() for p in model.parameters())
    with kernels.use_backend(config.kernel_backend):  # which kernels' layouts int8 / int4 weights take
        if prequantized is not None:
            attach_prequantized(model, codes, prequantized.group_size, dtype)
            pack_cpu_linears(model)  # what stays unquantized (lm_head, usually)
        elif config.quantization == "gguf":
            load_gguf_linears(model, checked_gguf_source(model_path, device, tp is not None), dtype)
        elif config.quantization is not None:
            check_quantizable(model, config.quantization, config.quantization_group_size, device)
            quantize_linears(model, config.quantization, config.quantization_group_size)
        elif os.environ.get("LMPORT_PACK_WEIGHTS", "1") != "0":  # "0": keep plain bf16 weights (A/B measurements)
            pack_cpu_linears(model)
    logger.info("loaded %s (%s, %.1fM params) from %s: dtype=%s device=%s max_model_len=%d; weights %.0f MB in "
                "%.2f s; total %.2f s", hf_config.architectures[0] if hf_config.architectures else model_cls.__name__,
                hf_config.model_type, num_params / 1e6, model_path, str(dtype).removeprefix("torch."), device,
                max_model_len, num_bytes / 1e6, io_seconds, time.perf_counter() - start)
    return LoadedModel(model=model, hf_config=hf_config, tokenizer=tokenizer, model_path=str(model_path),
                       dtype=dtype, device=device, max_model_len=max_model_len,
                       eos_token_ids=eos_token_ids(model_path, hf_config, tokenizer),
                       vocab_size=hf_config.vocab_size, tp=tp)
