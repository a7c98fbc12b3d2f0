"""Cached experiment runs. Each finished unit of work (one evaluated LAPT checkpoint, one fine-tuning) is stored as
<root>/cache/<kind>-<key>.json, where key is a digest of the settings that decide its numbers (model, data digests,
recipe, step, seed, evaluation windows). The commit is recorded in the result but is not part of the key: a rerun
after a change that does not touch those settings reuses the finished runs; delete the folder to start afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from training import atomic_write_text


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Cache:
    def __init__(self, root: Path, log=print):
        self.root, self.log = Path(root), log
        self.hits = self.misses = 0

    def path(self, kind: str, settings: dict) -> Path:
        return self.root / "cache" / f"{kind}-{digest(settings)}.json"

    def run(self, kind: str, settings: dict, work: Callable[[], dict]) -> dict:
        """work()'s result for these settings: from the cache when a run with them finished before."""
        path = self.path(kind, settings)
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())
        self.misses += 1
        started = time.perf_counter()
        result = work()
        result = {**result, "kind": kind, "settings": settings, "commit": commit(),
                  "wall_seconds": round(time.perf_counter() - started, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        return result


def commit() -> str:
    """The checked-out commit, with '+changes' when the working tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), torch {torch.__version__}, "
            f"Python {platform.python_version()}")
