"""Mutation check: break each promise on purpose and see that the tests guarding it fail.

    python tests/mutants.py                 # every mutant; a markdown table; exit status 1 if any survives
    python tests/mutants.py --list          # the mutants and their guarding tests, without running anything
    python tests/mutants.py --only NAME ... # some of them (names as --list prints them)

Not part of the test run (pytest collects test_*.py only). Takes several minutes on 2 cores: run it under the shared
lock (`flock /tmp/minicurie-heavy.lock python tests/mutants.py`).

Each mutant is a few exact string replacements, each of which must match exactly once in its file: code moves, and a
mutant that silently failed to apply would read as "killed" while nothing was tested. The script stops with an
error naming the mutant when an anchor is missing or ambiguous. It works on a temporary copy of the repository (the
tracked files and the untracked ones git does not ignore, as they are in the working tree), never on the repository
itself; the test runs share the cache folder (models, tokenizer, corpus) through links, except its `kernels/`
folder, which is copied, so that C kernels built from mutated sources never land in the shared cache.

First the baseline: every guarding test runs on the unmutated copy and must pass, with at least one case of each
test actually run (not skipped), else "killed" would mean nothing. Then each mutant is applied, its guarding tests
run (`-x`: the first failure is enough), and it is undone. Killed = pytest reports failing tests (exit status 1); a
collection error or an empty selection is an error of the script, not a kill.

Adding a mutant: one `Mutant(...)` below; its name, what it breaks (one line), the edits, the guarding tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str                                  # the promise it breaks, in a few words
    edits: tuple[tuple[str, str, str], ...]      # (file, exact text, replacement)
    tests: tuple[str, ...]                       # pytest node ids (file::test, all its parametrisations)


def M(name: str, breaks: str, edits: list[tuple[str, str, str]], tests: list[str]) -> Mutant:
    return Mutant(name, breaks, tuple(edits), tuple(tests))


TRAIN = "tests/test_train.py::"
KLEJ = "tests/test_klej_pipeline.py::"
RESUME_TESTS = [TRAIN + "test_kill_9_and_resume_reproduces_losses_bitwise",
                TRAIN + "test_resume_refuses_other_settings",
                TRAIN + "test_float16_autocast_scales_the_loss_and_resumes_bitwise"]

MUTANTS = [
    # ------------------------------------------------------------------------------- the holes of issue 20
    M("resume-restores-nothing", "--resume loads no adapter, optimiser or RNG state and starts at step 0",
      [("train.py", "        training.load_checkpoint(run.checkpoint, model, optimizer, scheduler, ckpt=ckpt)\n",
        "        pass\n"),
       ("train.py", 'return ckpt["step"], ckpt["extra"].get("before")', 'return 0, ckpt["extra"].get("before")')],
      RESUME_TESTS),
    M("klej-saves-every-eval", "fine-tuning saves the weights of every dev evaluation as the best",
      [("klej/finetune.py", '            if _better(score, state["best"]):\n                save_best(head, cfg, '
                            'run_dir / BEST_DIR)\n',
        '            save_best(head, cfg, run_dir / BEST_DIR)\n            if _better(score, state["best"]):\n')],
      [KLEJ + "test_finetune_keeps_the_best_dev_weights_and_stops_early"]),
    M("klej-reload-without-best", "a reloaded run (evaluate, predict) keeps its fresh weights, not the best ones",
      [("klej/finetune.py", "    load_best(head, Path(run_dir) / BEST_DIR)\n    return head, tokenizer, task, cfg\n",
        "    return head, tokenizer, task, cfg\n")],
      [KLEJ + "test_command_line_finetune_evaluate_predict_results"]),
    M("bf16-rmsnorm-reference-drops-weight", "the RMSNorm reference forgets its weight in bf16 only",
      [("model/kernels/reference.py", "    return y.type_as(x) * weight\n",
        "    return y.type_as(x) * weight if x.dtype != torch.bfloat16 else y.type_as(x)\n")],
      ["tests/test_kernel_rms_norm.py::test_rms_norm_matches_float64"]),
    M("holdout-labels-misaligned", "the held-out split's labels no longer follow their rows (tasks without dev)",
      [("klej/tasks.py", "None if self.y is None else self.y[index])",
        "None if self.y is None else np.sort(self.y[index]))")],
      ["tests/test_klej_tasks.py::test_every_task_reads_its_fixture_files_like_csv_quote_none"]),
    M("holdout-ignores-seed", "the dev tenth of CBD, DYK and PSC is the same whatever the seed",
      [("klej/tasks.py", "stratified_holdout(train.y, 0.1, seed)", "stratified_holdout(train.y, 0.1, 0)")],
      ["tests/test_klej_tasks.py::test_tasks_without_dev_hold_out_a_stratified_seeded_tenth"]),
    M("bf16-load-skips-norms", "a bf16 load leaves the RMSNorm weights at their initial ones",
      [("model/loading.py", "        state[name] = t\n",
        "        state[name] = t if dtype == torch.float32 or 'norm' not in name else torch.ones_like(t)\n")],
      ["tests/test_load_checkpoints.py::test_bf16_load_and_meta_free"]),
    M("dropout-mask-no-high-bits", "the dropout mask ignores the index's high 32 bits (tensors of 2^32+ elements)",
      [("model/kernels/cpu/dropout.py", "h = _mix(_mix((i & _MASK32) ^ k0) ^ (i >> 32) ^ k1)",
        "h = _mix(_mix((i & _MASK32) ^ k0) ^ k1)")],
      ["tests/test_dropout.py::test_reference_mask_past_2_to_the_32"]),
    M("dropout-c-no-high-bits", "dropout.c ignores the index's high 32 bits",
      [("model/kernels/cpu/dropout.c", "mix(mix((uint32_t)i ^ k0) ^ (uint32_t)((uint64_t)i >> 32) ^ k1)",
        "mix(mix((uint32_t)i ^ k0) ^ k1)")],
      ["tests/test_dropout.py::test_kernel_past_2_to_the_32"]),
    M("attention-supports-nothing", "cpu/attention.supports refuses every input (the C attention never runs)",
      [("model/kernels/cpu/attention.py", "    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and",
        "    return False and (q.dtype == k.dtype == v.dtype == torch.bfloat16 and")],
      ["tests/test_cpu_kernels.py::test_attention_supports_refuses_odd_shapes_instead_of_failing"]),
    M("loss-wrong-in-c-and-reference", "the per-token loss is off by 1%, the same in the C step and its reference",
      [("model/kernels/cpu/cross_entropy.c", "float nll = lse - zt;", "float nll = 1.01f * (lse - zt);"),
       ("model/kernels/reference.py", "    loss = lse - z.gather(1, safe_targets)[:, 0]\n",
        "    loss = 1.01 * (lse - z.gather(1, safe_targets)[:, 0])\n")],
      ["tests/test_cpu_kernels.py::test_cross_entropy_chunk_with_a_minus_inf_logit"]),
    M("dropout-c-does-not-build", "dropout.c does not compile where there is a C compiler (tests must fail, not skip)",
      [("model/kernels/cpu/dropout.c", "static inline uint32_t mix(uint32_t x)\n{",
        "static inline uint32_t mix(uint32_t x)\n{ not C;")],
      ["tests/test_dropout.py::test_kernel_equals_reference_bit_for_bit"]),
    # ------------------------------------------------------------------------- the README's guarantees
    M("resume-without-rng", "exact resume: a checkpoint's RNG state is not restored (dropout masks differ)",
      [("training.py", '    set_rng_state(ckpt["rng"])\n    return ckpt\n', "    return ckpt\n")],
      [TRAIN + "test_kill_9_and_resume_reproduces_losses_bitwise",
       KLEJ + "test_resumed_run_equals_uninterrupted_run"]),
    M("resume-without-optimiser", "exact resume: the optimiser's moments are not restored",
      [("training.py", '    optimizer.load_state_dict(ckpt["optimizer"])\n', "")],
      [TRAIN + "test_kill_9_and_resume_reproduces_losses_bitwise"]),
    M("resume-metrics-duplicated", "exact resume: the metrics log keeps the records past the resumed step",
      [("training.py", 'if r.get("step", 0) <= resume_step:', "if True:")],
      [TRAIN + "test_metrics_log_resumed_at_a_step_drops_the_records_after_it"]),
    M("checkpoint-written-in-place", "atomic checkpoints: written straight to their name, not to a temp file + rename",
      [("training.py", "    tmp = path.with_name(f\".{path.name}.tmp{os.getpid()}\")\n    with open(tmp, \"wb\") as f:",
        "    tmp = path\n    with open(tmp, \"wb\") as f:")],
      [TRAIN + "test_checkpoint_writes_are_atomic"]),
    M("gqa-heads-repeated-not-interleaved", "GQA: query head h reads KV head h % Hkv instead of h // (H / Hkv)",
      [("model/kernels/reference.py", "k = k.float().repeat_interleave(group, dim=1)",
        "k = k.float().repeat(1, group, 1, 1)"),
       ("model/kernels/reference.py", "v = v.float().repeat_interleave(group, dim=1)",
        "v = v.float().repeat(1, group, 1, 1)")],
      ["tests/test_kernel_attention.py::test_reference_matches_float64"]),
    M("gqa-c-attention-heads", "GQA in the bf16 C attention: query heads grouped as h % Hkv",
      [("model/kernels/cpu/attention.py", "    out.copy_(x.view(b, h // g, g, t, d).transpose(2, 3))\n",
        "    out.copy_(x.view(b, g, h // g, t, d).transpose(1, 2).transpose(2, 3))\n")],
      ["tests/test_cpu_kernels.py::test_attention_matches_float64_and_sdpa"]),
    M("window-one-key-too-many", "sliding window: query i sees keys i - W <= j <= i (W + 1 keys)",
      [("model/kernels/reference.py", "keep &= j > i - sliding_window", "keep &= j >= i - sliding_window")],
      ["tests/test_kernel_attention.py::test_reference_matches_float64",
       "tests/test_load_checkpoints.py::test_sharded_hugging_face_checkpoint"]),
    M("lora-scale-alpha-over-sqrt-r", "LoRA scale alpha / sqrt(r) (rsLoRA's) where alpha / r is asked for",
      [("lora/layers.py", "alpha / math.sqrt(r) if rslora else alpha / r", "alpha / math.sqrt(r)")],
      ["tests/test_lora_peft.py::test_peft_adapter_and_merged_export_match_ours"]),
    M("nf4-double-quant-uncentred", "NF4 double quantisation: absmax values not centred on their mean",
      [("model/nf4.py", "    offset = absmax.mean()\n", "    offset = absmax.mean() * 0\n")],
      ["tests/test_nf4.py::test_codes_and_values_equal_bitsandbytes"]),
    M("perplexity-windows-rescore", "strided perplexity: each window scores all its targets, overlaps counted twice",
      [("eval_ppl.py", "        out.append((begin, end, done))\n", "        out.append((begin, end, begin + 1))\n")],
      ["tests/test_eval_ppl.py::test_perplexity_equals_naive_loop",
       "tests/test_eval_ppl.py::test_windows_cover_every_target_once_with_enough_context"]),
]


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def check_anchors(mutants: list[Mutant]) -> None:
    for m in mutants:
        for file, old, _ in m.edits:
            n = (ROOT / file).read_text(encoding="utf-8").count(old)
            if n != 1:
                sys.exit(f"mutant {m.name}: its text is found {n} times in {file} (must be exactly once); update "
                         f"the mutant in tests/mutants.py:\n{old}")


def shared_cache(tmp: Path) -> Path:
    """A cache folder whose entries link to the real one's, but for a copy of kernels/ (mutated C stays here)."""
    real = Path(os.environ.get("MINICURIE_CACHE") or Path.home() / ".cache" / "minicurie")
    cache = tmp / "cache"
    cache.mkdir()
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name == "kernels":
                shutil.copytree(entry, cache / "kernels", symlinks=True)
            else:
                (cache / entry.name).symlink_to(entry)
    return cache


def run_tests(copy: Path, cache: Path, tests: tuple[str, ...], report: Path | None = None,
              stop_first: bool = True) -> tuple[int, str, float]:
    env = {**os.environ, "MINICURIE_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []),
           *([f"--junitxml={report}"] if report else []), *tests]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def baseline(copy: Path, cache: Path, mutants: list[Mutant]) -> float:
    """Every guarding test passes on the unmutated copy, each with at least one case run."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    report = copy.parent / "baseline.xml"
    rc, output, seconds = run_tests(copy, cache, tests, report, stop_first=False)
    if rc != 0:
        sys.exit(f"baseline: the guarding tests fail on the unmutated copy (pytest exit {rc}):\n{output[-4000:]}")
    ran: dict[str, int] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("skipped") is None:
            node = case.get("classname").replace(".", "/") + ".py::" + case.get("name").split("[")[0]
            ran[node] = ran.get(node, 0) + 1
    unrun = [t for t in tests if not ran.get(t)]
    if unrun:
        sys.exit(f"baseline: these guarding tests ran no case (skipped or not found): {', '.join(unrun)}")
    print(f"baseline: {sum(ran.values())} test cases of {len(tests)} guarding tests pass on the unmutated copy "
          f"({seconds:.0f} s)", flush=True)
    return seconds


def mutate(copy: Path, m: Mutant) -> dict[str, str]:
    originals: dict[str, str] = {}
    for file, old, new in m.edits:
        path = copy / file
        text = path.read_text(encoding="utf-8")
        originals.setdefault(file, text)
        if text.count(old) != 1:
            sys.exit(f"mutant {m.name}: its text is not found exactly once in {file} of the copy")
        path.write_text(text.replace(old, new), encoding="utf-8")
    return originals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and their guarding tests")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
        mutants = [m for m in MUTANTS if m.name in args.only]
    check_anchors(mutants)
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.breaks}\n    {', '.join(sorted({f for f, _, _ in m.edits}))} -> "
                  f"{'; '.join(m.tests)}")
        return 0

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="minicurie-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        for f in source_files():
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)
        cache = shared_cache(Path(tmp))
        baseline(copy, cache, mutants)
        rows, survivors = [], []
        for m in mutants:
            originals = mutate(copy, m)
            try:
                rc, output, seconds = run_tests(copy, cache, m.tests)
            finally:
                for file, text in originals.items():
                    (copy / file).write_text(text, encoding="utf-8")
            if rc not in (0, 1):
                sys.exit(f"mutant {m.name}: pytest exit {rc} (not a test failure):\n{output[-4000:]}")
            killed = rc == 1
            if not killed:
                survivors.append(m.name)
            files = ", ".join(sorted({f for f, _, _ in m.edits}))
            tests = "<br>".join(t.replace("tests/", "") for t in m.tests)
            rows.append(f"| {m.name} | {files} | {tests} | {'yes' if killed else '**no**'} | {seconds:.0f} |")
            print(f"{m.name}: {'killed' if killed else 'SURVIVED'} ({seconds:.0f} s)", flush=True)
    print(f"\nmutants at {commit}{' + uncommitted changes' if dirty else ''}:\n")
    print("| mutant | file | guarding tests | killed | seconds |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} killed" + (f"; survived: {', '.join(survivors)}"
                                                                    if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
