"""Issue 7, acceptance 4: LAPT of SmolLM2-135M on an NF4 base vs a full-precision base, same everything else.

    python bench/nf4_lapt.py                  # the default CPU recipe of train.py, twice
    python bench/nf4_lapt.py --steps 20       # shorter

Runs train.py twice in child processes (same seed, data, LoRA, schedule), once with --quantize nf4, and compares the
held-out Polish perplexity after training. Target: NF4 within 3% of full precision.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, extra: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), "--overwrite", *extra], check=True,
                   cwd=ROOT)
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: train.py's preset)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-nf4")
    args, passthrough = p.parse_known_args()
    extra = passthrough + (["--steps", str(args.steps)] if args.steps else [])
    full, t_full = run(args.out / "full", extra)
    nf4, t_nf4 = run(args.out / "nf4", extra + ["--quantize", "nf4"])
    ratio = nf4["after"]["perplexity"] / full["after"]["perplexity"]
    print("\n| base | ppl before | ppl after | bits/byte after | wall time |")
    print("|---|---|---|---|---|")
    for name, r, t in (("full precision (fp32)", full, t_full), ("NF4", nf4, t_nf4)):
        print(f"| {name} | {r['before']['perplexity']:.3f} | {r['after']['perplexity']:.3f} | "
              f"{r['after']['bits_per_byte']:.4f} | {t:.0f} s |")
    verdict = "PASS" if ratio <= 1.03 else "FAIL"
    print(f"\nNF4 / full-precision perplexity after LAPT: {ratio:.4f} (target <= 1.03: {verdict})")


if __name__ == "__main__":
    main()
