"""`python -m klej demo`: the whole KLEJ pipeline, offline, on a CPU, in minutes, on a task built from real Polish.

KLEJ's files cannot be fetched here, so the demo makes a task in KLEJ's own format from text every machine can
get: LibreOffice's Polish help (Debian's libreoffice-help-pl, MPL-2.0). Each paragraph is labelled by the module it
documents (Writer, the word processor; Math, the formula editor; Chart, the chart editor), and the classifier must
tell them apart from the paragraph alone:

    "Ustaw tryb śledzenia konspektu Nawigatora. Ta funkcja dotyczy tylko wpisów..."   -> Writer
    "Wstawia relację mniejsze lub równe z dwoma symbolami zastępczymi..."           -> Math
    "Krzywa regresji jest wyświetlana w tym samym kolorze co odpowiadające..."      -> Chart

Then, exactly as `python -m klej finetune / evaluate / predict` would: fine-tune SmolLM2-135M with the task LoRA and
a head on the last token, reload the saved run from disk, score dev, predict the test features into
test_pred_libreoffice-help.tsv, and score those predictions against the held-back test labels, beside the
majority-class baseline (a third, as the classes are balanced).

Two departures from the KLEJ recipe keep it within 15 minutes on two cores, and both are visible in DEMO_CONFIG:
inputs are cut to 48 tokens (about the first 80 characters, usually the paragraph's first sentence), and the
learning rate is 1e-3 rather than 1e-4, since the demo takes ~70 optimiser steps where a KLEJ task takes
thousands. Paragraphs are split by help page (70% of the pages train, 15% dev, 15% test), so no page gives text to
two splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import training
from klej import finetune as ft
from klej.metrics import accuracy
from klej.submit import prediction_file, write_predictions
from klej.tasks import Task, load_task, read_split

PACKAGE = "libreoffice-help-pl"
MODULES = {"swriter": "Writer", "smath": "Math", "schart": "Chart"}    # help folder -> label
TASK = Task("libreoffice-help", ("sentence",), "target", "accuracy", epochs=3, labels=tuple(MODULES.values()))
DEMO_CONFIG = ft.FinetuneConfig(lr=1e-3, batch_size=8, max_len=48, epochs=3, evals_per_epoch=2)
EXAMPLES = {"train": 60, "dev": 15, "test": 30}                         # per class
PARAGRAPH_CHARS = (80, 400)                                             # shorter: headings; longer: rare tables


def _split_of(page: str) -> str:
    """A help page's split, from a hash of its path: 15% of the pages test, 15% dev, the rest train."""
    bucket = int.from_bytes(hashlib.sha256(page.encode()).digest()[:4], "big") % 20
    return "test" if bucket < 3 else "dev" if bucket < 6 else "train"


def download_help(folder: Path, log=print) -> Path:
    """`apt-get download` + `dpkg -x` the Polish LibreOffice help into folder -> the unpacked root."""
    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if run("apt-get", "download", PACKAGE).returncode != 0:
        log("apt-get download failed; running apt-get update first")
        run("apt-get", "update")
        result = run("apt-get", "download", PACKAGE)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {PACKAGE} failed in {folder}:\n{result.stderr.strip()[-2000:]}")
    deb = sorted(folder.glob(f"{PACKAGE}_*.deb"))[-1]
    result = run("dpkg", "-x", deb.name, "root")
    if result.returncode != 0:
        raise RuntimeError(f"dpkg -x {deb} failed:\n{result.stderr.strip()[-2000:]}")
    return folder / "root"


def help_paragraphs(root: Path) -> dict[str, list[tuple[str, str]]]:
    """module -> [(page, paragraph)]: Polish paragraphs of a useful length that occur in that module alone."""
    from data.langid import is_polish
    from data.polish import help_html_paragraphs
    found: dict[str, list[tuple[str, str]]] = {}
    for module in MODULES:
        base = root / "usr/share/libreoffice/help/pl/text" / module
        found[module] = []
        for page in sorted(base.rglob("*.html")):
            for paragraph in help_html_paragraphs(page.read_text(encoding="utf-8")):
                paragraph = " ".join(paragraph.split())    # also removes tabs and newlines, TSV's separators
                if PARAGRAPH_CHARS[0] <= len(paragraph) <= PARAGRAPH_CHARS[1] and is_polish(paragraph):
                    found[module].append((page.relative_to(base).as_posix(), paragraph))
    # A paragraph repeated within or across modules (shared boilerplate) would be an unanswerable or leaked example.
    counts = Counter(p for items in found.values() for _, p in items)
    return {m: [(page, p) for page, p in items if counts[p] == 1] for m, items in found.items()}


def build_task_files(data_dir: Path, seed: int = 0, log=print) -> Path:
    """Write klej_libreoffice-help/ (train.tsv, dev.tsv, test_features.tsv, and test.tsv with the labels) unless
    it is already there; built in a temporary folder and renamed into place when complete."""
    folder = Path(data_dir) / TASK.folder
    if (folder / "test.tsv").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        log(f"demo: downloading {PACKAGE} and extracting paragraphs")
        paragraphs = help_paragraphs(download_help(Path(tmp), log))
        rows: dict[str, list[tuple[str, str]]] = {split: [] for split in EXAMPLES}
        for module, items in paragraphs.items():
            for split, n in EXAMPLES.items():
                pool = [p for page, p in items if _split_of(f"{module}/{page}") == split]
                if len(pool) < n:
                    raise RuntimeError(f"{PACKAGE}: only {len(pool)} {split} paragraphs for {module}, need {n}")
                rows[split] += [(pool[i], MODULES[module]) for i in rng.choice(len(pool), n, replace=False)]
        stage = Path(tmp) / "task"
        stage.mkdir()
        for split, items in rows.items():
            items = [items[i] for i in rng.permutation(len(items))]
            name = "test.tsv" if split == "test" else f"{split}.tsv"
            _write_tsv(stage / name, ["sentence", "target"], items)
            if split == "test":
                _write_tsv(stage / "test_features.tsv", ["sentence"], [(s,) for s, _ in items])
        os.replace(stage, folder)
    log(f"demo: task written to {folder} ({', '.join(f'{len(MODULES) * n} {s}' for s, n in EXAMPLES.items())})")
    return folder


def _write_tsv(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")


def run_demo(out: Path, model_source: str = "smollm2-135m", device: str = "cpu", log=print) -> dict:
    """Build the task, fine-tune, evaluate and predict; -> the report also written to <out>/demo.json."""
    started = time.perf_counter()
    out = Path(out)
    task, cfg = TASK, DEMO_CONFIG
    folder = build_task_files(out / "data", cfg.seed, log)
    data = load_task(task, folder, seed=cfg.seed)
    run_dir = out / "runs" / task.name

    model, tokenizer = ft.load_base(model_source, device)
    head = ft.prepare_classifier(model, task, cfg)
    base = {"model": model_source, "adapter": None, "dtype": "float32", "quantize": None}
    # resume=True: a second demo in the same folder continues (or reuses) the first one's run.
    ft.finetune(head, tokenizer, task, data, run_dir, cfg, base, resume=True, log=log)
    del head, model

    # From here on, as `python -m klej evaluate` and `predict` do: everything comes back from the run folder.
    head, tokenizer, task, cfg = ft.open_run(run_dir, device)
    dev = ft.evaluate(head, tokenizer, task, data.dev, cfg)
    predictions = ft.predict(head, tokenizer, task, data.test, cfg, progress=True)
    pred_path = write_predictions(task, predictions, prediction_file(out / "predictions", task))
    y_test = read_split(task, folder / "test.tsv").y
    majority = np.bincount(data.train.y).argmax()
    report = {
        "task": task.name, "model": model_source, "classes": list(task.labels),
        "train": len(data.train), "dev": len(data.dev), "test": len(y_test),
        "dev_accuracy": dev["accuracy"],
        "test_accuracy": accuracy(y_test, predictions),
        "majority_baseline": accuracy(y_test, np.full_like(y_test, majority)),
        "predictions": str(pred_path), "seconds": round(time.perf_counter() - started, 1),
    }
    report["points_over_baseline"] = round(100 * (report["test_accuracy"] - report["majority_baseline"]), 1)
    training.atomic_write_text(out / "demo.json", json.dumps(report, indent=2) + "\n")
    log(f"demo: test accuracy {100 * report['test_accuracy']:.1f}% vs majority-class baseline "
        f"{100 * report['majority_baseline']:.1f}% (+{report['points_over_baseline']} points), dev accuracy "
        f"{100 * report['dev_accuracy']:.1f}%, {report['seconds']:.0f} s in all; predictions in {pred_path}")
    return report
