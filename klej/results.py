"""The results table: every finished task under a runs folder, as text for the terminal and as JSON.

Each finished fine-tuning run leaves `<runs>/<task>/result.json` (klej/finetune.py). The table lists them in the
benchmark's order, the dev score in percent (KLEJ reports every metric x 100), and the mean over the tasks shown;
the KLEJ average proper needs all nine, so the table says how many tasks it averaged.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import training
from klej.finetune import RESULT_FILE
from klej.tasks import TASKS

RESULTS_JSON = "results.json"


def collect(runs_dir: Path) -> dict[str, dict]:
    """task name -> its result.json, registry tasks first (in KLEJ's order), then any other task folders."""
    runs_dir = Path(runs_dir)
    found = {p.parent.name: p for p in sorted(runs_dir.glob(f"*/{RESULT_FILE}"))}
    order = [t for t in TASKS if t in found] + [t for t in found if t not in TASKS]
    results = {}
    for name in order:
        try:
            results[name] = json.loads(found[name].read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{found[name]}: not valid JSON ({e})") from None
    return results


def format_table(results: dict[str, dict]) -> str:
    head = f"{'task':<16} {'metric':<10} {'dev x100':>9} {'best step':>10} {'steps':>7} {'early stop':>10} {'time':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<16} {r['metric']:<10} {100 * r['dev']:>9.2f} {r['best_step']:>10} {r['steps']:>7} "
                     f"{'yes' if r['stopped_early'] else 'no':>10} {r['seconds']:>7.0f}s")
    scores = [r["dev"] for r in results.values() if not math.isnan(r["dev"])]
    if scores:
        lines.append("-" * len(head))
        lines.append(f"{'mean':<16} {'':<10} {100 * sum(scores) / len(scores):>9.2f}   over {len(scores)} task(s)")
    return "\n".join(lines)


def write_results(runs_dir: Path) -> tuple[str, Path]:
    """-> (the table as text, the JSON file written beside the runs)."""
    results = collect(runs_dir)
    if not results:
        raise FileNotFoundError(f"{runs_dir}: no finished task (no */{RESULT_FILE}); run `python -m klej finetune`")
    path = Path(runs_dir) / RESULTS_JSON
    training.atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return format_table(results), path
