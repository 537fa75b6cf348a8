"""Labelled runs kept outside the repository (``--label NAME``) and found again by
``--compare NAME_OR_PATH``, beside committed result files and directories.

The cache is ``$ATTNKIT_BENCH_CACHE`` if set, else ``~/.cache/attnkit/bench``; a label is a
directory there holding a run's files in the usual layout (``bench.json``, ``decode.json``
...), so a label and a results directory are read the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_ENV = "ATTNKIT_BENCH_CACHE"
#: A label: one or more path-safe names joined by "/" (A/B runs go under LABEL/NAME=VALUE).
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*(/[A-Za-z0-9][A-Za-z0-9._=,+-]*)*")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnkit" / "bench")


def check_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise ValueError(f"label {label!r}: use letters, digits and . _ = , + - (and / "
                         "between parts), starting with a letter or digit")
    return label


def label_dir(label: str) -> Path:
    return cache_dir() / check_label(label)


def labels() -> list[str]:
    """Labels in the cache (directories holding a result), sorted."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("*.json"))


def resolve(ref: str, stem: str) -> Path:
    """The result file ``ref`` names for a run whose files are ``STEM.json``: a file, a
    directory holding ``STEM.json`` (a results directory), or a label in the cache."""
    path = Path(ref).expanduser()
    candidates = [path, path / f"{stem}.json"]
    if _LABEL.fullmatch(ref):
        candidates.append(cache_dir() / ref / f"{stem}.json")
    for c in candidates:
        if c.is_file():
            return c
    known = labels()
    raise ValueError(f"--compare {ref}: no {stem}.json there, and no such label in "
                     f"{cache_dir()} (labels: {', '.join(dict.fromkeys(known)) or 'none'})")
