"""Where materialised models live: $VLLM_SPECX_CACHE, else ~/.cache/vllm-specx."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("VLLM_SPECX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vllm-specx"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(name: str):
    """Serialise builds of one cached artefact across processes (pytest-xdist, spawned workers)."""
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def list_cached_models() -> list[str]:
    root = cache_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").exists())
