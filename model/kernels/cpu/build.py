"""Build a small C kernel at first use and load it through ctypes: how our CPU kernels reach C without a build step.

A kernel is one .c file beside its Python module (plain C, no Python or torch headers). It is compiled with the
system's C compiler (`$CC`, default `cc`) into the cache folder (`<cache>/kernels/<stem>-<key>.so`), where the key
hashes the source (and the headers beside it), the compiler's version, the flags and the CPU's instruction sets, so
that an edited kernel, a new compiler or another CPU sharing the cache gets its own library. Flags are tried in
order: the CPU's own instruction sets (-march=native) with OpenMP, then without it (a compiler with no OpenMP
runtime), then plain C with and without OpenMP. Building is atomic (temp file + rename), and a cached library that
does not load (truncated, say) is built again.

`CKernel(...).library()` gives the loaded library, or None where it cannot be built: the caller then takes its
PyTorch path, and the reason is said once, as a warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from model.kernels._switch import current_mode
from model.kernels.cpu.matmul import eager_only

BUILD_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-fopenmp"], ["-O3"])


def cpu_signature() -> str:
    """The CPU's instruction sets, as -march=native sees them: a library built for another CPU is not reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


def compile_library(source: Path, flags: list[str], target: Path) -> str | None:
    """Compile `source` with `flags` into `target` (atomically: temp file + rename). -> None, or the error."""
    cc = shlex.split(os.environ.get("CC") or "cc")   # e.g. CC="ccache gcc"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{source.stem}-building-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([*cc, *flags, "-shared", "-fPIC", str(source), "-o", tmp, "-lm"],
                             capture_output=True, text=True, timeout=120)
        if run.returncode:
            return f"{' '.join(cc)} {' '.join(flags)}: {run.stderr.strip()[-300:]}"
        os.chmod(tmp, 0o755 & ~_umask())   # mkstemp made it private; a shared cache folder needs it readable
        os.replace(tmp, target)            # another process sees no library or a whole one
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cc)} {' '.join(flags)}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def compiler_version() -> str:
    cc = os.environ.get("CC") or "cc"
    try:
        run = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True, timeout=30)
        return cc + " " + (run.stdout.splitlines() or [""])[0]
    except (OSError, subprocess.TimeoutExpired):
        return cc


def build(source: Path, opener: Callable[[Path], ctypes.CDLL], flag_sets=BUILD_FLAGS) -> ctypes.CDLL:
    """Compile `source` into the cache folder (once per source, compiler, flags and CPU) and open it with `opener`
    (which declares the functions' argument types). (Another CPU's library would load and then crash: the CPU's
    flags in the cache key keep machines that share a cache folder apart.)"""
    from model.sources import cache_dir
    # The headers beside the source count too: an edited cpu_vec.h must rebuild the kernels that include it.
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    compiler = compiler_version()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(text + " ".join([compiler, *flags, cpu_signature()]).encode())
        target = cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"
        for attempt in ("cached", "rebuilt"):
            if attempt == "rebuilt" or not target.exists():
                error = compile_library(source, flags, target)
                if error:
                    errors.append(error)
                    break
            try:
                return opener(target)
            except OSError as e:
                if attempt == "rebuilt":
                    errors.append(f"{target}: {e}")
    raise RuntimeError("; ".join(errors))


class CKernel:
    """One C kernel, built and loaded on first use (thread-safe), or None for good if it cannot be."""

    def __init__(self, source: Path, opener: Callable[[Path], ctypes.CDLL], what: str, unavailable: str = ""):
        """`unavailable`: the warning where it cannot be built (default "<what>: C kernel unavailable, using
        PyTorch instead"), followed by the reason."""
        self.source, self.opener = source, opener
        self.unavailable = unavailable or f"{what}: C kernel unavailable, using PyTorch instead"
        self.lib: ctypes.CDLL | None = None
        self.tried = False
        self._lock = threading.Lock()

    def library(self) -> ctypes.CDLL | None:
        if self.tried:   # every call asks: no lock once it is settled
            return self.lib
        with self._lock:
            if not self.tried:
                try:
                    self.lib = build(self.source, self.opener)
                except Exception as e:   # no compiler, read-only cache, ...: the caller's PyTorch path runs
                    warnings.warn(f"{self.unavailable} ({e})")
                self.tried = True
        return self.lib


def plain_cpu_tensors(*tensors: torch.Tensor) -> bool:
    """May a C function read these tensors' memory? Plain tensors (or Parameters) on the CPU, in eager mode (no
    torch.func transform, forward-mode AD or torch.compile trace, whose tensors are wrappers or fakes), and the
    kernel switch not set to "reference" (MINICURIE_KERNELS), which turns every C path off."""
    return (all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in tensors)
            and current_mode() != "reference" and eager_only())
