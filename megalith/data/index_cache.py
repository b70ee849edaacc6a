"""Cached sample indices on disk: build once, load memory-mapped on every later run and rank.

Megatron's layout: a dataset describes itself as JSON; the MD5 of that description names the
files `<hash>-<Class>-<split>-<name>.npy` plus `<hash>-<Class>-<split>-description.json` in
the cache directory. Every file is written under a temporary name and renamed into place, so
ranks building or reading at the same time never see half a file (a rank that finds a file
missing builds the same arrays itself, deterministically, and renames them over identical
ones). A cache directory that cannot be created or written is not an error: the arrays are
built in memory and a warning says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


def describe(fields: dict) -> str:
    """The description text (JSON, keys in the given order, as Megatron's)."""
    return json.dumps(fields, indent=4)


def cache_paths(cache_dir: str, description: str, class_name: str, split: str | None,
                names: list[str]) -> dict[str, str]:
    """Paths of the cached arrays (by name) and of the description (key "description")."""
    digest = hashlib.md5(description.encode("utf-8")).hexdigest()
    base = f"{digest}-{class_name}" + (f"-{split}" if split else "")
    paths = {name: os.path.join(cache_dir, f"{base}-{name}.npy") for name in names}
    paths["description"] = os.path.join(cache_dir, f"{base}-description.json")
    return paths


def _atomic_write(path: str, write: Callable[[object], None]) -> None:
    """Write through a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(paths: dict[str, str], description: str, names: list[str]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when any file is missing, foreign or unreadable."""
    if not all(os.path.isfile(path) for path in paths.values()):
        return None
    try:
        with open(paths["description"], encoding="utf-8") as handle:
            if handle.read() != description:
                return None
        return {name: np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names}
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable cached index %s (%s); rebuilding it", paths["description"], error)
        return None


def load_or_build(cache_dir: str | None, fields: dict, class_name: str, split: str | None,
                  names: list[str], build: Callable[[], dict[str, np.ndarray]],
                  validate: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True,
                  ) -> tuple[dict[str, np.ndarray], bool]:
    """(arrays by name, built_now). Loads `cache_dir`'s files for `fields` or builds and saves them.

    `validate` rejects loaded arrays of the wrong shape (then they are rebuilt and overwritten).
    Without `cache_dir`, or when it is not writable, the arrays live in memory only.
    """
    description = describe(fields)
    if cache_dir is None:
        return build(), True
    paths = cache_paths(cache_dir, description, class_name, split, names)
    loaded = _load(paths, description, names)
    if loaded is not None and validate(loaded):
        return loaded, False
    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for name in names:
            _atomic_write(paths[name], lambda handle, a=arrays[name]: np.save(handle, a, allow_pickle=False))
        _atomic_write(paths["description"], lambda handle: handle.write(description.encode("utf-8")))
    except OSError as error:
        logger.warning("cannot write the index cache in %s (%s); keeping the %s indices in memory "
                       "(set --data-cache-path to a writable directory to reuse them)", cache_dir, error, class_name)
    return arrays, True
