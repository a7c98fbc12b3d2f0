"""Issue 19: everything GPU-side that minicurie promises, measured by one command in under 8 minutes on one H200.

    python bench/gpu_check.py [--out DIR] [--budget-s N]     on one CUDA GPU (docs/benchmarks.md, "GPU check")
    python bench/gpu_check.py --dry-run [--out DIR]          anywhere: every stage on the CPU at tiny shapes (Triton
                                                             through its interpreter, no bitsandbytes), < 3 minutes

Stages, in this order, each in a child process of its own with its own time limit; a stage that fails or runs out of
time is recorded as such and the next one still runs:

  1 env          GPU, driver, library versions; measured copy bandwidth and bf16 matmul TFLOP/s (the ceilings)
  2 correctness  the kernel tests (tests/test_kernel_*.py, test_kernels_model.py, test_nf4.py) with Triton compiled
                 (TRITON_INTERPRET=0 set explicitly; the dry run uses the interpreter on two of the files)
  3 kernels      bench/triton_kernels.py: each kernel vs PyTorch eager and torch.compile, forward and backward;
                 sliding-window flash attention (W 4096) vs causal SDPA at 4k, 16k and 32k tokens, GQA 32:8
  4 qlora        the paper's job: a Mistral-7B-shaped model (random bf16 weights written once to local disk and read
                 by both sides), NF4 base, Curie's adapters (r 32, alpha 64, dropout 0.05, eight targets), bf16
                 autocast, gradient checkpointing, sequence 256, micro-batch 8: optimizer-step tokens/s and peak GPU
                 memory, ours vs transformers + peft + bitsandbytes 4-bit, same micro-batches, steps alternated
  5 decode       greedy tokens/s of the same model in bf16, ours vs transformers

Everything goes to --out (default $OUT when set, else runs/gpu_check): report.md, report.json and one log per stage,
7 files in all. Both reports are rewritten after every stage, so a run killed half-way still leaves one.

Peak memory in stage 4: both sides live in one process so that their steps can alternate; each side's peak is
torch.cuda.max_memory_allocated() over its own steps minus the bytes the other side holds at that time (weights,
adapters, optimizer state: exactly what its own building and steps added to memory_allocated(), nothing else runs
in between). The caching allocator counts allocated bytes per tensor, so the subtraction is exact.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name, title, time box on a GPU (s), time box in the dry run (s). The GPU boxes add up to the default budget.
STAGES = [
    ("env", "Environment", 25, 20),
    ("correctness", "Correctness on hardware: the kernel tests, compiled", 105, 40),
    ("kernels", "Kernel speed: ours vs PyTorch eager and torch.compile", 110, 40),
    ("qlora", "The paper's job: QLoRA LAPT step of a Mistral-7B-shaped model", 170, 45),
    ("decode", "Greedy decoding of the Mistral-7B-shaped model in bf16", 60, 35),
]
GPU_BUDGET_S = sum(s[2] for s in STAGES)       # 470 s: 7 min 50 s
DRY_BUDGET_S = sum(s[3] for s in STAGES)
LOG_LIMIT = 15 * 2**20                         # bytes kept of each stage's log (the tail)

# Targets (issue 19, acceptance 3).
QLORA_SPEED_TARGET, QLORA_MEMORY_TARGET = 2.0, 0.7
BANDWIDTH_TARGET = 0.80
SWA_TARGET = 3.0
CURIE_TOKENS, PAPER_A6000_HOURS = 276_000_000, 106



# ================================================================================================ the parent

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for report.md, report.json and the logs (default $OUT, else runs/gpu_check)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes (checks the script)")
    p.add_argument("--budget-s", type=float, help=f"seconds for all stages together (default {GPU_BUDGET_S}, dry "
                                                  f"run {DRY_BUDGET_S}); each stage's box scales with it")
    p.add_argument("--stages", help="comma-separated subset of " + ",".join(s[0] for s in STAGES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_child_stage(a.child, Path(a.work), a.deadline, a.dry_run)

    chosen = [s for s in STAGES if not a.stages or s[0] in a.stages.split(",")]
    unknown = set(a.stages.split(",")) - {s[0] for s in STAGES} if a.stages else set()
    if unknown:
        p.error(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; known: {', '.join(s[0] for s in STAGES)}")
    # Each stage's box is its share of the budget: the default budget is the sum of the chosen stages' boxes.
    default_budget = sum(s[3] if a.dry_run else s[2] for s in chosen)
    budget = a.budget_s or default_budget
    if budget <= 0:
        p.error(f"--budget-s must be positive, got {budget}")
    out = Path(a.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)

    report = {"meta": {"dry_run": a.dry_run, "budget_s": budget, "started": _utc_now(), "commit": _git_commit(),
                       "command": " ".join([Path(sys.executable).name, *sys.argv])},
              "stages": {name: {"title": title, "status": "pending"} for name, title, _, _ in chosen}}
    write_reports(out, report)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    start = time.monotonic()
    try:
        boxes = [(s[3] if a.dry_run else s[2]) * budget / default_budget for s in chosen]
        for i, (name, title, _, _) in enumerate(chosen, 1):
            # A stage may use its own box plus whatever the stages before it left unused, never the later ones'.
            left = budget - (time.monotonic() - start)
            limit = left - sum(boxes[i:])
            log = out / f"{i}-{name}.log"
            if limit < 5:
                report["stages"][name] = {"title": title, "status": "skipped",
                                          "notes": [f"not run: {max(limit, 0):.0f} s were left for it ({left:.0f} s "
                                                    f"of the budget, the rest kept for the stages after it)"]}
            else:
                print(f"[gpu_check] stage {i}/{len(chosen)} {name}: up to {limit:.0f} s, log {log}", flush=True)
                report["stages"][name] = run_stage(name, title, work, log, limit, a.dry_run)
                print(f"[gpu_check] stage {name}: {report['stages'][name]['status']} in "
                      f"{report['stages'][name]['seconds']:.0f} s", flush=True)
            report["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
            write_reports(out, report)
    finally:
        _remove_checkpoint(work)
        shutil.rmtree(work, ignore_errors=True)
    report["meta"]["finished"] = _utc_now()
    write_reports(out, report)
    print((out / "report.md").read_text())
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


def run_stage(name: str, title: str, work: Path, log: Path, limit: float, dry_run: bool) -> dict:
    """Run one stage's child with a hard time limit; its result is whatever it last saved, plus how it ended."""
    result_path = work / f"{name}.json"
    deadline = time.time() + limit - 3            # the child aims to finish 3 s before it would be killed
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work),
           "--deadline", f"{deadline:.3f}"] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        # One thread: the dry run's ops are tiny, and on a shared machine each OpenMP barrier waits for a core that
        # another process holds (20x slower steps were seen with two threads under load).
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    with open(log, "wb") as f:
        # A session of its own, so that a timeout kills the stage's whole process group (pytest workers, compilers).
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timed out"
        # Whatever of the stage is still running (the child at its limit, or a worker it left behind) would hold
        # GPU memory into the next stage: end its whole process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = time.monotonic() - t0
    _trim_log(log)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {}
    result.update(title=title, status=status, seconds=round(seconds, 1), exit_code=code)
    notes = result.setdefault("notes", [])
    if status == "timed out":
        notes.append(f"killed at its time limit ({limit:.0f} s); what it had measured by then is shown")
    elif status == "failed":
        notes.append(f"the stage's process exited with code {code}; the end of its log:\n\n" +
                     _indent(_tail(log, 25)))
    if result.get("error"):
        notes.append("error: " + result["error"])
    return result


def _trim_log(log: Path) -> None:
    """Keep at most LOG_LIMIT bytes of a log, its end (where the summary and the errors are)."""
    if log.stat().st_size > LOG_LIMIT:
        with open(log, "rb") as f:
            f.seek(-LOG_LIMIT, os.SEEK_END)
            tail = f.read()
        log.write_bytes(b"[... the beginning was cut to keep the log under 16 MB ...]\n" + tail)


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _remove_checkpoint(work: Path) -> None:
    """The random 7B checkpoint may live outside the work folder (/dev/shm): remove it wherever it is."""
    pointer = work / "checkpoint_path"
    if pointer.exists():
        shutil.rmtree(pointer.read_text().strip(), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the reports

def write_reports(out: Path, report: dict) -> None:
    _atomic_write(out / "report.json", json.dumps(report, indent=1))
    _atomic_write(out / "report.md", render_markdown(report))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_markdown(report: dict) -> str:
    meta, stages = report["meta"], report["stages"]
    env = stages.get("env", {}).get("values", {})
    where = "dry run on the CPU (tiny shapes, Triton's interpreter: checks the script, not speed)" \
        if meta["dry_run"] else env.get("gpu", "GPU")
    lines = [f"# GPU check: {where}", "",
             f"Started {meta['started']}, commit {meta['commit']}, budget {meta['budget_s']:.0f} s"
             + (f", {meta['elapsed_s']:.0f} s used" if "elapsed_s" in meta else "")
             + (f", finished {meta['finished']}" if "finished" in meta else " (still running or killed)") + ".",
             f"Command: `{meta['command']}`.", ""]
    targets = [t for s in stages.values() for t in s.get("targets", [])]
    if targets:
        lines += ["## Targets", "", _md_table(["target", "measured", "verdict"],
                                              [[t["target"], t["measured"], t["verdict"]] for t in targets]), ""]
    for i, (name, s) in enumerate(stages.items(), 1):
        took = f", {s['seconds']:.0f} s" if "seconds" in s else ""
        lines += [f"## {i}. {s['title']}", "", f"Stage `{name}`: **{s['status']}**{took}.", ""]
        for note in s.get("notes", []):
            lines += [note, ""]
        for table in s.get("tables", []):
            if table.get("title"):
                lines += [f"{table['title']}:", ""]
            lines += [_md_table(table["headers"], table["rows"]), ""]
    return "\n".join(lines)


def _md_table(headers: list, rows: list) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


# ================================================================================================ the children

class Recorder:
    """A stage's result, saved (atomically) after every measurement, so a stage killed at its limit keeps them."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"notes": [], "tables": [], "targets": [], "values": {}}

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.data["notes"].append(text)
        self.save()

    def table(self, title: str, headers: list[str]) -> list:
        """A new table; append rows to the returned list, then call save()."""
        rows: list = []
        self.data["tables"].append({"title": title, "headers": headers, "rows": rows})
        return rows

    def target(self, target: str, measured: str, verdict: str) -> None:
        self.data["targets"].append({"target": target, "measured": measured, "verdict": verdict})
        self.save()

    def save(self) -> None:
        _atomic_write(self.path, json.dumps(self.data, indent=1, default=str))


def run_child_stage(name: str, work: Path, deadline_epoch: float, dry_run: bool) -> int:
    # Triton's interpreter is chosen when the kernels are decorated, at import: set it before anything imports
    # triton. Explicitly 0 on a GPU (tests/conftest.py defaulted it to 1 once), 1 in the dry run.
    os.environ["TRITON_INTERPRET"] = "1" if dry_run else "0"
    sys.path.insert(0, str(ROOT))
    rec = Recorder(work / f"{name}.json")
    rec.save()
    deadline = time.monotonic() + (deadline_epoch - time.time())
    stage = {"env": stage_env, "correctness": stage_correctness, "kernels": stage_kernels, "qlora": stage_qlora,
             "decode": stage_decode}[name]
    try:
        stage(rec, work, deadline, dry_run)
    except BaseException as e:    # recorded for the report, then re-raised so the exit code says it failed
        rec.data["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec.save()
        raise
    return 0


def _sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _device(dry_run: bool) -> str:
    import torch
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch: run with --dry-run to check the script on the CPU")
    return "cuda"


def _time_s(fn, device, warmup: int, reps: int) -> float:
    """Mean seconds of fn() over reps calls after warmup calls, synchronised at both ends."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _versions() -> dict[str, str]:
    """Installed versions, read from the packages' metadata (importing transformers or peft costs seconds)."""
    from importlib import metadata
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "safetensors", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ---------------------------------------------------------------------------------------------- 1 env

def stage_env(rec: Recorder, work: Path, deadline: float, dry_run: bool) -> None:
    import torch
    device = _device(dry_run)
    values = rec.data["values"]
    values.update(_versions())
    values["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    values["cpu_count"] = os.cpu_count()
    rows = rec.table("", ["what", "value"])
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        values.update(gpu=torch.cuda.get_device_name(0),
                      capability=".".join(map(str, torch.cuda.get_device_capability())),
                      sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                      cuda=torch.version.cuda)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                                  "clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            smi = f"nvidia-smi failed: {e}"
        values["nvidia_smi"] = smi
        print(smi, flush=True)
    else:
        values["gpu"] = "none (dry run on the CPU)"
    for key in ("gpu", "capability", "sm_count", "memory_gib", "cuda", "nvidia_smi", "python", "torch", "triton",
                "transformers", "peft", "bitsandbytes", "safetensors", "numpy", "TRITON_INTERPRET", "cpu_count"):
        if key in values:
            rows.append([key, values[key]])
    rec.save()

    # The ceilings the other stages are judged against: a large copy (reads and writes every byte once) and a large
    # square matmul (2 n^3 flops), as bench/triton_kernels.py measures them.
    n = 2**22 if dry_run else 2**28                     # float32 elements: 1 GiB on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * n * 4 / _time_s(lambda: dst.copy_(src), device, 3, 10) / 1e9
    del src, dst
    size = 256 if dry_run else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    tflops = 2 * size**3 / _time_s(lambda: a @ b, device, 3, 10) / 1e12
    values.update(copy_gbps=float(f"{copy_gbps:.4g}"), matmul_bf16_tflops=float(f"{tflops:.4g}"))  # 4 digits
    rows.append([f"copy bandwidth ({n * 4 / 2**20:.0f} MiB float32, read + write counted)", f"{copy_gbps:.0f} GB/s"])
    rows.append([f"bf16 matmul {size}^3 (random data)", f"{tflops:.4g} TFLOP/s"])
    rec.save()


# ---------------------------------------------------------------------------------------------- 2 correctness

KERNEL_TEST_FILES_DRY = ["tests/test_kernel_rms_norm.py"]


def kernel_test_files() -> list[str]:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
    return files + [f for f in ("tests/test_kernels_model.py", "tests/test_nf4.py") if (ROOT / f).exists()]


def stage_correctness(rec: Recorder, work: Path, deadline: float, dry_run: bool) -> None:
    import importlib.util
    files = KERNEL_TEST_FILES_DRY if dry_run else kernel_test_files()
    junit = work / "junit.xml"
    interpret = os.environ["TRITON_INTERPRET"]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs", f"--junitxml={junit}", *files]
    workers = 0
    if not dry_run and importlib.util.find_spec("xdist") is not None:
        # Compiling ~100 kernel variants dominates: pytest-xdist spreads them over processes (one GPU, shared).
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        cmd += ["-n", str(workers)]
    mode = ("Triton compiled (TRITON_INTERPRET=0)" if interpret == "0"
            else "Triton's interpreter (TRITON_INTERPRET=1), the dry run: bf16 cases are skipped there")
    rec.data["values"].update(mode=mode, files=files, workers=workers)
    rec.note(f"Mode: {mode}; {len(files)} files" + (f", {workers} pytest-xdist workers" if workers else "") +
             (" (dry run: a subset of the kernel tests)" if dry_run else "") + f". Command: `{' '.join(cmd[1:])}`.")
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)         # its own group: a timeout ends the xdist workers too
    timed_out = False
    assert proc.stdout is not None
    import threading

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic() - 2))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    outcomes = _junit_outcomes(junit) if junit.exists() and not timed_out else _verbose_outcomes(lines)
    summarise_tests(rec, outcomes, dry_run)
    if timed_out:
        rec.note("pytest was stopped at the stage's time limit: the counts are those of the tests finished by then")
    if timed_out or proc.returncode not in (0, 1):
        raise RuntimeError(f"pytest {'timed out' if timed_out else f'exited with code {proc.returncode}'}")


def _junit_outcomes(junit: Path) -> list[tuple[str, str, str, str]]:
    """(file, test name, outcome, message) of each test case in pytest's JUnit XML."""
    import xml.etree.ElementTree as ET
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        # classname "tests.test_nf4" or "tests.test_nf4.TestClass": the module path ends at the test_ part
        parts = case.get("classname", "").split(".")
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
        file = case.get("file") or "/".join(parts[:module + 1]) + ".py"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip()
                break
        out.append((file, case.get("name", ""), outcome, message))
    return out


def _verbose_outcomes(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """The same from pytest -v's progress lines (what is left when it was stopped before writing its XML)."""
    import re
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "skipped",
             "XPASS": "passed"}
    out = []
    # "tests/f.py::name[a, b] PASSED  [ 5%]" (parameters may hold spaces); with xdist "[gw0] [ 5%] PASSED tests/..."
    plain = re.compile(r"^(tests/\S+?\.py)::(.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
    xdist = re.compile(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+?\.py)::(.+?)\s*$")
    for line in lines:
        if m := plain.match(line):
            out.append((m[1], m[2], words[m[3]], ""))
        elif (m := xdist.search(line)) and line.startswith("["):
            out.append((m[2], m[3], words[m[1]], ""))
    return out


def summarise_tests(rec: Recorder, outcomes: list[tuple[str, str, str, str]], dry_run: bool) -> None:
    per_file: dict[str, dict[str, int]] = {}
    for file, _, outcome, _ in outcomes:
        counts = per_file.setdefault(file, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
        counts[outcome] += 1
    rows = rec.table("Per file", ["file", "passed", "failed", "errors", "skipped"])
    for file, c in sorted(per_file.items()):
        rows.append([file, c["passed"], c["failed"], c["error"], c["skipped"]])
    total = {k: sum(c[k] for c in per_file.values()) for k in ("passed", "failed", "error", "skipped")}
    rows.append(["**all**", total["passed"], total["failed"], total["error"], total["skipped"]])
    bf16 = [o for o in outcomes if "bfloat16" in o[1]]
    total["bf16_passed"] = sum(o[2] == "passed" for o in bf16)
    total["bf16_cases"] = len(bf16)
    rec.data["values"].update(total)
    skips: dict[str, int] = {}
    for _, _, outcome, message in outcomes:
        if outcome == "skipped":
            skips[message] = skips.get(message, 0) + 1
    if skips:
        rec.table("Skip reasons", ["reason", "tests"]).extend([[m or "(none given)", n] for m, n in skips.items()])
    failures = [o for o in outcomes if o[2] in ("failed", "error")]
    if failures:
        rec.table("Failures (first 20)", ["file", "test", "message"]).extend(
            [[f, name, (msg.splitlines() or [""])[0][:200].replace("|", "/")] for f, name, _, msg in failures[:20]])
    rec.note(f"bf16 cases: {total['bf16_passed']} passed of {total['bf16_cases']}.")
    ok = total["passed"] > 0 and not failures
    rec.target("kernel tests pass with Triton compiled, bf16 included",
               f"{total['passed']} passed, {total['failed'] + total['error']} failed, {total['skipped']} skipped "
               f"({total['bf16_passed']} bf16 passed)",
               "n/a (dry run)" if dry_run else ("pass" if ok and total["bf16_passed"] > 0 else "MISS"))


# ---------------------------------------------------------------------------------------------- 3 kernels

def stage_kernels(rec: Recorder, work: Path, deadline: float, dry_run: bool) -> None:
    from bench import triton_kernels as tk
    _device(dry_run)
    setting = tk.SMOKE if dry_run else tk.CUDA
    rec.note(f"Shapes: {setting.tokens} tokens x dim {setting.dim} (hidden {setting.hidden_dim}), "
             f"{setting.n_heads}/{setting.n_kv_heads} heads x {setting.head_dim}, vocab {setting.vocab_size}; "
             f"attention at {', '.join(map(str, setting.attention_lengths))} tokens, window {setting.sliding_window}; "
             f"{setting.dtype}; {setting.reps} timed repetitions after 2 warm-ups (mean).")
    rows = rec.table("Measurements", ["kernel", "shape", "implementation", "pass", "ms", "achieved", "% of peak",
                                      "peak memory"])
    measured: list = []

    def on_row(r) -> None:
        measured.append(r)
        rows.append([r.kernel, r.shape, r.implementation, r.direction, "" if r.ms is None else f"{r.ms:.3f}",
                     r.achieved, r.percent_of_peak, r.peak_memory])
        rec.save()

    # Stop starting new measurements 15 s before the stage's limit: the verdicts below need a moment.
    try:
        tk.run(setting, on_row=on_row, deadline=deadline - 15)
    finally:
        kernel_verdicts(rec, measured, setting, dry_run)


def kernel_verdicts(rec: Recorder, measured: list, setting, dry_run: bool) -> None:
    """Ratios ours / eager / compile per kernel and direction, and the issue's two kernel targets."""
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in measured:
        if r.ms is not None:
            groups.setdefault((r.kernel, r.shape, r.direction), {})[r.implementation] = r.ms
    ratio_rows = rec.table("Speed-up of ours (time of the other / time of ours)",
                           ["kernel", "shape", "pass", "ours ms", "vs eager", "vs torch.compile"])
    for (kernel, shape, direction), ms in groups.items():
        ours = next((v for k, v in ms.items() if "ours" in k and "CPU path" not in k), None)
        if ours is None:
            continue
        eager = next((v for k, v in ms.items() if "eager" in k or k.startswith("SDPA")), None)
        compiled = next((v for k, v in ms.items() if "compile" in k), None)
        ratio_rows.append([kernel, shape, direction, f"{ours:.3f}", f"{eager / ours:.2f}x" if eager else "",
                           f"{compiled / ours:.2f}x" if compiled else ""])
    rec.save()
    for r in measured:
        if r.implementation == "triton (ours)" and r.kernel in ("RMSNorm", "RoPE (q)", "SwiGLU"):
            share = float(r.percent_of_peak.rstrip("%")) / 100
            rec.target(f"{r.kernel} {r.direction}: >= {BANDWIDTH_TARGET:.0%} of copy bandwidth",
                       f"{r.achieved} = {share:.0%}",
                       "n/a (dry run)" if dry_run else "pass" if share >= BANDWIDTH_TARGET else "MISS")
    longest = max(setting.attention_lengths)
    for direction in ("fwd + bwd", "fwd"):
        ms = groups.get(("attention", f"T={longest}, W={setting.sliding_window}, {setting.n_heads}/"
                                      f"{setting.n_kv_heads} heads x {setting.head_dim}", direction), {})
        ours, sdpa = ms.get("triton flash (ours), windowed"), ms.get("SDPA is_causal (no window)")
        if ours and sdpa:
            rec.target(f"flash attention W={setting.sliding_window} {direction} at {longest} tokens: >= {SWA_TARGET}x "
                       f"causal SDPA", f"{sdpa / ours:.2f}x ({ours:.2f} ms vs {sdpa:.2f} ms)",
                       "n/a (dry run)" if dry_run else "pass" if sdpa / ours >= SWA_TARGET else "MISS")
        elif direction == "fwd + bwd":
            rec.target(f"flash attention W={setting.sliding_window} at {longest} tokens: >= {SWA_TARGET}x causal SDPA",
                       "not measured (stage cut short)", "n/a (dry run)" if dry_run else "not measured")


# ---------------------------------------------------------------------------------------------- the model

def model_args(dry_run: bool):
    """Mistral-7B v0.1's shape; the dry run: the same architecture (GQA 4:1, window 4096), 2 narrow layers and a
    small vocabulary."""
    from model.args import ModelArgs
    if dry_run:
        return ModelArgs(dim=256, n_layers=2, head_dim=32, hidden_dim=896, n_heads=8, n_kv_heads=2, norm_eps=1e-5,
                         vocab_size=4096, sliding_window=4096, rope_theta=10000.0)
    return ModelArgs.from_name("mistral-7b-v0.1")


def ensure_checkpoint(work: Path, args, device: str, rec: Recorder) -> Path:
    """A Hugging Face-layout checkpoint of random bf16 weights (N(0, 0.02^2), norms 1), written once per run and read
    by both sides of stages 4 and 5. In RAM (/dev/shm) when it has room, else in the work folder."""
    import torch
    pointer = work / "checkpoint_path"
    if pointer.exists() and (Path(pointer.read_text().strip()) / "complete").exists():
        return Path(pointer.read_text().strip())
    nbytes = args.num_params() * 2
    shm = Path("/dev/shm")
    try:
        roomy = shm.is_dir() and shutil.disk_usage(shm).free > nbytes * 1.2 + 4 * 2**30
    except OSError:
        roomy = False
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_ckpt_", dir=shm if roomy else work))
    pointer.write_text(str(folder))
    t0 = time.perf_counter()
    try:
        from safetensors.torch import save_file
    except ImportError:
        from model.safetensors import save_file
    g = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)   # noqa: E731
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    weight_map: dict[str, str] = {}
    groups = [list(range(i, min(i + 4, args.n_layers))) for i in range(0, args.n_layers, 4)]
    files = [f"model-{i + 1:05d}-of-{len(groups) + 1:05d}.safetensors" for i in range(len(groups) + 1)]
    for filename, layers in zip(files, groups + [None]):
        if layers is None:
            tensors = {"model.embed_tokens.weight": rand(args.vocab_size, args.dim),
                       "model.norm.weight": ones(args.dim), "lm_head.weight": rand(args.vocab_size, args.dim)}
        else:
            tensors = {}
            for i in layers:
                pre = f"model.layers.{i}."
                tensors.update({
                    pre + "self_attn.q_proj.weight": rand(q, args.dim),
                    pre + "self_attn.k_proj.weight": rand(kv, args.dim),
                    pre + "self_attn.v_proj.weight": rand(kv, args.dim),
                    pre + "self_attn.o_proj.weight": rand(args.dim, q),
                    pre + "mlp.gate_proj.weight": rand(args.hidden_dim, args.dim),
                    pre + "mlp.up_proj.weight": rand(args.hidden_dim, args.dim),
                    pre + "mlp.down_proj.weight": rand(args.dim, args.hidden_dim),
                    pre + "input_layernorm.weight": ones(args.dim),
                    pre + "post_attention_layernorm.weight": ones(args.dim)})
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": nbytes}, "weight_map": weight_map}))
    config = args.to_hf_config()
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "complete").write_text("")
    rec.note(f"Random bf16 checkpoint ({args.num_params() / 1e6:,.0f}M parameters, {nbytes / 1e9:.1f} GB) written to "
             f"{'/dev/shm' if roomy else 'local disk'} in {time.perf_counter() - t0:.0f} s; both sides read it.")
    return folder


def _allocated(device: str) -> int:
    import torch
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


# ---------------------------------------------------------------------------------------------- 4 qlora

def compute_dtype(dry_run: bool):
    """bf16 on the GPU, as in the paper; float32 in the dry run (bf16 products without AVX-512 BF16 crawl on some
    CPUs, and the dry run checks the code path, not the speed)."""
    import torch
    return torch.float32 if dry_run else torch.bfloat16


def build_ours_qlora(ckpt: Path, device: str, dtype):
    """Curie's recipe as train.py --preset curie builds it: NF4 base read tensor by tensor, bf16 elsewhere, LoRA on
    all seven projections and the head, adapters in float32, activations recomputed in the backward."""
    import torch

    import lora
    from model import load
    model, _ = load(ckpt, device=device, dtype=dtype, quantize="nf4", require_tokenizer=False)
    lora.inject_lora(model, lora.LoRAConfig.curie())
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing = True
    model.train()
    return model, lambda inputs, targets: model(inputs, targets=targets)


def build_theirs_qlora(ckpt: Path, device: str, dtype, quantize: bool):
    """transformers + peft (+ bitsandbytes 4-bit NF4, double quantisation, bf16 compute) with the same adapters;
    bf16 non-quantised weights as ours (prepare_model_for_kbit_training would make them float32), gradient
    checkpointing without re-entrance, the loss as transformers' own labels= path computes it (float32 logits)."""
    import torch
    import transformers
    kwargs: dict = {"dtype": dtype}
    if quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    base = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)
    base.config.use_cache = False
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from bench.common import peft_curie
    return peft_curie(base)


def stage_qlora(rec: Recorder, work: Path, deadline: float, dry_run: bool) -> None:
    import contextlib

    import torch
    device = _device(dry_run)
    args = model_args(dry_run)
    micro_batch, seq_len = (2, 32) if dry_run else (8, 256)
    timed_steps = 1 if dry_run else 3
    values = rec.data["values"]
    values.update(micro_batch=micro_batch, seq_len=seq_len, layers=args.n_layers, dim=args.dim)
    quantize_theirs = True
    if device != "cuda":
        quantize_theirs, why = False, "bitsandbytes' 4-bit layers are used on CUDA only here"
    else:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:    # noqa: BLE001 - a missing CUDA library shows as any kind of error
            quantize_theirs = False
            why = f"bitsandbytes is not importable ({type(e).__name__}: {str(e)[:160]})"
    if not quantize_theirs:
        rec.note(f"transformers + peft side: {why}, so it runs a {str(compute_dtype(dry_run))[6:]} base without "
                 "4-bit quantisation"
                 + (" (a check of its code path only; no ratio is judged)" if dry_run else
                    "; the ratios below are then NOT the target's comparison"))
    rec.note(f"One step: forward and loss under {'bf16 autocast' if not dry_run else 'float32'}, backward, AdamW on "
             f"the adapters, on the same {micro_batch} x {seq_len} random tokens for both sides (one optimizer step "
             f"per micro-batch: the paper's accumulation of 4 would spread AdamW's share, already small, further).")
    ckpt = ensure_checkpoint(work, args, device, rec)
    batch = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1),
                          generator=torch.Generator().manual_seed(0)).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    dtype = compute_dtype(dry_run)
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())
    values["dtype"] = str(dtype).removeprefix("torch.")

    sides: dict[str, dict] = {}
    held: dict[str, int] = {}            # bytes each side holds between its steps (see the module's docstring)

    def build(side: str) -> None:
        before = _allocated(device)
        t0 = time.perf_counter()
        try:
            model, loss_fn = (build_ours_qlora(ckpt, device, dtype) if side == "ours"
                              else build_theirs_qlora(ckpt, device, dtype, quantize_theirs))
        except Exception as e:    # noqa: BLE001 - the other side still runs; the error is in the report
            rec.note(f"{side}: building the model failed: {type(e).__name__}: {str(e)[:500]}")
            import traceback
            traceback.print_exc()
            return
        _sync(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2.5e-5)
        sides[side] = {"model": model, "loss": loss_fn, "optimizer": optimizer, "load_s": time.perf_counter() - t0,
                       "trainable": sum(p.numel() for p in trainable), "seconds": [], "peak": 0, "losses": []}
        held[side] = _allocated(device) - before
        sides[side]["weights"] = held[side]

    def step(side: str) -> float:
        s = sides[side]
        before = _allocated(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = s["loss"](inputs, targets)
        loss.backward()
        s["optimizer"].step()
        s["optimizer"].zero_grad(set_to_none=True)
        s["losses"].append(loss.item())            # .item() waits for the step to finish
        seconds = time.perf_counter() - t0
        del loss
        if device == "cuda":
            others = sum(v for k, v in held.items() if k != side)
            s["peak"] = max(s["peak"], torch.cuda.max_memory_allocated() - others)
        held[side] += _allocated(device) - before  # AdamW's state appears at the first step
        s["held"] = held[side]
        return seconds

    for side in ("ours", "theirs"):
        build(side)
    if not sides:
        raise RuntimeError("neither side could be built")
    # Warm-up: the first step compiles Triton kernels (ours) and warms cuBLAS and the allocator (both).
    first: dict[str, float] = {}
    for side in list(sides):
        try:
            first[side] = step(side)
        except Exception as e:    # noqa: BLE001
            rec.note(f"{side}: the first step failed: {type(e).__name__}: {str(e)[:500]}")
            import gc
            import traceback
            traceback.print_exc()
            del sides[side]
            gc.collect()
            # Whatever is still allocated beyond the other sides' holdings is the failed side's, for good.
            held[side] = _allocated(device) - sum(v for k, v in held.items() if k != side)
    try:
        for r in range(timed_steps):
            slowest = max((max(s["seconds"], default=first[k]) for k, s in sides.items()), default=0)
            if r and time.monotonic() + 2.5 * slowest * len(sides) > deadline:
                rec.note(f"timed steps stopped after {r} per side (stage time limit)")
                break
            for side in sides:                            # alternated: ours, theirs, ours, theirs, ...
                sides[side]["seconds"].append(step(side))
            save_qlora(rec, sides, first, micro_batch, seq_len, device, dry_run, quantize_theirs, final=False)
    finally:    # the ratios of the steps taken, even if a later one failed
        save_qlora(rec, sides, first, micro_batch, seq_len, device, dry_run, quantize_theirs, final=True)


def save_qlora(rec: Recorder, sides: dict, first: dict, micro_batch: int, seq_len: int, device: str, dry_run: bool,
               quantize_theirs: bool, final: bool) -> None:
    tokens = micro_batch * seq_len
    rate = {k: tokens / statistics.median(s["seconds"]) for k, s in sides.items() if s["seconds"]}
    names = {"ours": "ours (NF4, model/nf4.py + Triton kernels)",
             "theirs": "transformers + peft + bitsandbytes 4-bit" if quantize_theirs
             else "transformers + peft (no 4-bit base)"}
    rec.data["tables"] = [t for t in rec.data["tables"] if t["title"] != "Steps"]
    rows = rec.table("Steps", ["side", "trainable parameters", "load s", "GiB held between steps (weights, "
                               "adapters, AdamW)",
                               "first step s", "timed steps s", "tokens/s (median)", "peak GiB (steps)",
                               "loss, first step"])
    for k, s in sides.items():
        rows.append([names[k], f"{s['trainable']:,}", f"{s['load_s']:.1f}",
                     _gib(s.get("held", s["weights"])) if device == "cuda" else "n/a on CPU",
                     f"{first.get(k, float('nan')):.2f}",
                     " / ".join(f"{x:.3f}" for x in s["seconds"]),
                     f"{rate[k]:.0f}" if k in rate else "", _gib(s["peak"]) if device == "cuda" else "n/a on CPU",
                     f"{s['losses'][0]:.4f}" if s["losses"] else ""])
        rec.data["values"][k] = {"tokens_per_s": rate.get(k), "peak_bytes": s["peak"] if device == "cuda" else None,
                                 "step_seconds": s["seconds"], "load_s": s["load_s"], "losses": s["losses"]}
    rec.save()
    if not final:
        return
    judged = not dry_run and quantize_theirs
    if "ours" in rate:
        hours = CURIE_TOKENS / rate["ours"] / 3600
        rec.data["values"]["curie_hours_ours"] = hours
        text = (f"Curie's {CURIE_TOKENS / 1e6:.0f}M LAPT tokens at this rate: {hours:.1f} "
                f"{'H200' if device == 'cuda' else 'CPU (tiny model, meaningless)'}-hours ours")
        if "theirs" in rate:
            text += f", {CURIE_TOKENS / rate['theirs'] / 3600:.1f} theirs"
        rec.note(text + f"; the paper: ~{PAPER_A6000_HOURS} A6000-hours (its own stack, transformers + peft + "
                        f"bitsandbytes, micro-batch and accumulation of its recipe).")
    if "ours" in rate and "theirs" in rate:
        speed = rate["ours"] / rate["theirs"]
        rec.target(f"QLoRA step tokens/s, ours / transformers+peft+bitsandbytes: >= {QLORA_SPEED_TARGET}x",
                   f"{speed:.2f}x ({rate['ours']:.0f} vs {rate['theirs']:.0f} tokens/s)",
                   ("pass" if speed >= QLORA_SPEED_TARGET else "MISS") if judged else "n/a (not the target's setup)")
        if device == "cuda":
            mem = sides["ours"]["peak"] / sides["theirs"]["peak"]
            rec.target(f"QLoRA step peak GPU memory, ours / theirs: <= {QLORA_MEMORY_TARGET}x",
                       f"{mem:.2f}x ({_gib(sides['ours']['peak'])} vs {_gib(sides['theirs']['peak'])} GiB)",
                       ("pass" if mem <= QLORA_MEMORY_TARGET else "MISS") if judged else "n/a (not the target's setup)")
        else:
            rec.target(f"QLoRA step peak GPU memory, ours / theirs: <= {QLORA_MEMORY_TARGET}x", "n/a on CPU",
                       "n/a (dry run)")
    else:
        rec.target(f"QLoRA step tokens/s, ours / transformers+peft+bitsandbytes: >= {QLORA_SPEED_TARGET}x",
                   f"not measured (sides measured: {', '.join(rate) or 'none'})", "not measured")


# ---------------------------------------------------------------------------------------------- 5 decode

def stage_decode(rec: Recorder, work: Path, deadline: float, dry_run: bool) -> None:
    import torch
    import transformers

    from model import load
    from model.generate import generate
    device = _device(dry_run)
    args = model_args(dry_run)
    prompt_len, new_tokens, runs = (16, 8, 1) if dry_run else (128, 128, 2)
    ckpt = ensure_checkpoint(work, args, device, rec)
    prompt = torch.randint(3, args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    dtype = compute_dtype(dry_run)
    rec.data["values"]["dtype"] = str(dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    ours, _ = load(ckpt, device=device, dtype=dtype, require_tokenizer=False)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(ckpt), dtype=dtype, **({"device_map": {"": 0}} if device == "cuda" else {})).eval()
    load_theirs = time.perf_counter() - t0
    ids = torch.tensor([prompt], device=device)
    outputs: dict[str, list[int]] = {}

    def run_ours(n: int = new_tokens) -> None:
        outputs["ours"] = list(generate(ours, prompt, max_new_tokens=n))

    def run_theirs(n: int = new_tokens) -> None:
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        outputs["theirs"] = out[0, prompt_len:].tolist()

    fns = {"ours": run_ours, "theirs": run_theirs}
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    rows = rec.table("", ["side", "load s", "runs s", "new tokens/s (median, prefill included)"])
    rec.note(f"{rec.data['values']['dtype']} weights on both sides, loaded in {load_ours:.1f} s (ours) and "
             f"{load_theirs:.1f} s (transformers); a prompt of {prompt_len} random token ids, {new_tokens} new tokens, "
             f"greedy, runs alternated after a short warm-up of each.")

    def report() -> None:
        rate = {k: new_tokens / statistics.median(v) for k, v in seconds.items() if v}
        rows[:] = [[name, f"{load:.1f}", " / ".join(f"{x:.3f}" for x in seconds[k]),
                    f"{rate[k]:.1f}" if k in rate else ""]
                   for k, name, load in (("ours", "ours (model.generate, rolling KV cache)", load_ours),
                                         ("theirs", "transformers generate(do_sample=False)", load_theirs))]
        rec.data["values"].update(tokens_per_s=rate, prompt_tokens=prompt_len, new_tokens=new_tokens)
        rec.save()

    for fn in fns.values():                          # warm-up: kernels compiled, prefill and decode steps run
        fn(min(8, new_tokens))
    for r in range(runs):
        if r and time.monotonic() + 2.5 * sum(max(v) for v in seconds.values()) > deadline:
            rec.note(f"timed runs stopped after {r} per side (stage time limit)")
            break
        for k, fn in fns.items():                    # alternated
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds[k].append(time.perf_counter() - t0)
        report()
    rate = rec.data["values"]["tokens_per_s"]
    agree = next((i for i, (a, b) in enumerate(zip(outputs["ours"], outputs["theirs"])) if a != b),
                 min(len(outputs["ours"]), len(outputs["theirs"])))
    rec.data["values"]["agreeing_prefix"] = agree
    rec.note(f"Ours / transformers: {rate['ours'] / rate['theirs']:.2f}x. The two greedy sequences agree on their "
             f"first {agree} of {new_tokens} tokens (random weights: a near-tie can flip a token, and everything "
             f"after it). No target is set for decoding.")


if __name__ == "__main__":
    sys.exit(main())
