"""Test predictions in the form klejbenchmark.com takes them, and the zip of all nine.

Each task's predictions are one file, `test_pred_<task>.tsv`: a header `target` and one line per line of the
task's test_features.tsv, in the same order. A class is written as the label exactly as the training files spell
it (`__label__meta_plus_m`, `ENTAILMENT`, `1`); a regression value (CDSC-R's relatedness, AR's rating) as a
decimal number. The submission is the nine files, side by side at the root of one zip.

`make_submission` checks every file before zipping (header, row count against test_features.tsv, every value a
known label or a number in range), so a broken submission fails here, naming the file and line, rather than on
the benchmark's server.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

import training
from klej.tasks import TASKS, Task, read_split, read_tsv, task_folder

COLUMN = "target"


def prediction_file(pred_dir: Path, task: Task) -> Path:
    return Path(pred_dir) / f"test_pred_{task.name}.tsv"


def format_prediction(task: Task, value: float | int) -> str:
    return f"{float(value):.6g}" if task.is_regression else task.labels[int(value)]


def write_predictions(task: Task, predictions: np.ndarray, path: Path) -> Path:
    """Class indices or values (klej.finetune.predict's output) -> test_pred_<task>.tsv, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training.atomic_write_text(path, "".join(f"{line}\n" for line in
                                             [COLUMN, *(format_prediction(task, v) for v in predictions)]))
    return path


def check_predictions(task: Task, path: Path, expected_rows: int | None = None) -> None:
    """Raise ValueError naming the file (and line) unless `path` is a valid prediction file for `task`."""
    header, rows = read_tsv(path)
    if header != [COLUMN]:
        raise ValueError(f"{path}: header must be the single column {COLUMN!r}, found {header}")
    if expected_rows is not None and len(rows) != expected_rows:
        raise ValueError(f"{path}: {len(rows)} predictions, but test_features.tsv of {task.name} has "
                         f"{expected_rows} rows")
    for number, (value,) in rows:
        if task.is_regression:
            try:
                ok = task.value_range[0] <= float(value) <= task.value_range[1]
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{path}:{number}: {value!r} is not a number in "
                                 f"[{task.value_range[0]:g}, {task.value_range[1]:g}]")
        elif value not in task.labels:
            raise ValueError(f"{path}:{number}: unknown label {value!r}; expected one of {', '.join(task.labels)}")


def make_submission(pred_dir: Path, out_zip: Path, data_dir: Path | None = None) -> Path:
    """Zip the nine test_pred_<task>.tsv of pred_dir into out_zip, each checked first (and, given the KLEJ data
    folder, its row count against the task's test_features.tsv)."""
    pred_dir, out_zip = Path(pred_dir), Path(out_zip)
    files = {name: prediction_file(pred_dir, task) for name, task in TASKS.items()}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{pred_dir}: no {', '.join(missing)} (run `python -m klej predict` for each task)")
    for name, path in files.items():
        task = TASKS[name]
        rows = None
        if data_dir is not None:
            rows = len(read_split(task, task_folder(task, data_dir) / "test_features.tsv", with_target=False))
        check_predictions(task, path, rows)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_zip.parent, prefix=f".{out_zip.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for path in files.values():
                z.write(path, arcname=path.name)
        os.replace(tmp, out_zip)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_zip
