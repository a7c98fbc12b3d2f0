"""The nine KLEJ tasks, and readers for the benchmark's files exactly as distributed.

KLEJ (Rybak et al., 2020) ships one folder per task, `klej_<task>/`, holding `train.tsv`, `dev.tsv` and
`test_features.tsv`: tab-separated, a header line, no quoting at all (a `"` is an ordinary character, so Python's
csv module in its default dialect would mangle them). CBD, DYK and PSC come without `dev.tsv`; for those we hold
out a seeded, stratified 10% of train, which early stopping then watches.

Column names and label spellings below are those of the official files (checked against the KLEJ loaders that
read them: `sentence`/`target` for NKJP-NER, CBD and PolEmo, `sentence_A`/`sentence_B` for CDSC, `question`/
`answer` for DYK, `extract_text`/`summary_text`/`label` for PSC, `text`/`rating` for AR). Everything that differs
between tasks lives in the one `TASKS` registry; the code that trains, scores and submits reads it from there.
"""
from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str                              # as in the benchmark's folder name, klej_<name>
    inputs: tuple[str, ...]                # columns the model reads, in the order the template joins them
    target: str                            # column holding the answer in train.tsv / dev.tsv
    metric: str                            # a name from klej.metrics.METRICS
    epochs: int                            # Curie: 1 for AR, CBD, CDSC-E, CDSC-R; 5 for the others
    labels: tuple[str, ...] = ()           # class labels as spelled in the files; empty for a regression task
    value_range: tuple[float, float] | None = None  # regression targets lie in [low, high]
    has_dev: bool = True                   # the official distribution includes dev.tsv
    weighted: bool = True                  # loss weighted by inverse frequency of the class (AR: of the rating)

    @property
    def folder(self) -> str:
        return f"klej_{self.name}"

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def n_outputs(self) -> int:
        """Width of the head: one logit per class, or one number for a regression task."""
        return 1 if self.is_regression else len(self.labels)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("nkjp-ner", ("sentence",), "target", "accuracy", epochs=5,
         labels=("noEntity", "placeName", "persName", "orgName", "time", "geogName")),
    Task("cdsc-e", ("sentence_A", "sentence_B"), "entailment_judgment", "accuracy", epochs=1,
         labels=("ENTAILMENT", "CONTRADICTION", "NEUTRAL")),
    Task("cdsc-r", ("sentence_A", "sentence_B"), "relatedness_score", "spearman", epochs=1, value_range=(0.0, 5.0),
         weighted=False),
    Task("cbd", ("sentence",), "target", "binary_f1", epochs=1, labels=("0", "1"), has_dev=False),
    Task("polemo2.0-in", ("sentence",), "target", "accuracy", epochs=5,
         labels=("__label__meta_amb", "__label__meta_minus_m", "__label__meta_plus_m", "__label__meta_zero")),
    Task("polemo2.0-out", ("sentence",), "target", "accuracy", epochs=5,
         labels=("__label__meta_amb", "__label__meta_minus_m", "__label__meta_plus_m", "__label__meta_zero")),
    Task("dyk", ("question", "answer"), "target", "binary_f1", epochs=5, labels=("0", "1"), has_dev=False),
    Task("psc", ("extract_text", "summary_text"), "label", "binary_f1", epochs=5, labels=("0", "1"), has_dev=False),
    # AR's ratings are whole stars, but the score is a mean absolute error: we regress the rating (see finetune.py).
    Task("ar", ("text",), "rating", "ar_score", epochs=1, value_range=(1.0, 5.0)),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown KLEJ task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class Split:
    """One file's examples: `fields[i]` holds example i's input columns (in task.inputs order).

    `y` is None for test features; else label indices (int64) for classification, values (float64) for regression.
    """
    path: Path
    fields: list[tuple[str, ...]]
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.fields)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.path, [self.fields[i] for i in index], None if self.y is None else self.y[index])


@dataclass
class TaskData:
    train: Split
    dev: Split
    test: Split


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """-> (header, [(line number, fields)]). No quoting: a line is split on every tab, and nothing else."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    # A leading byte-order mark is dropped, as pandas (the official baseline's reader) drops it; kept, it would be
    # glued to the first column's name, which then matches no task column. Skipped by hand rather than decoded as
    # "utf-8-sig", whose error offsets would count from after the mark, not from the start of the file.
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = raw[:offset].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte offset {offset})") from None
    # Split on '\n' only: str.splitlines would also break inside a field at \x0b, \x1c, \u2028 and friends.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                          # the newline that ends the last line
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header line)")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    header = lines[0].split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{number}: malformed line: {len(fields)} tab-separated field(s), the header "
                             f"has {len(header)} ({', '.join(header)})")
        rows.append((number, fields))
    return header, rows


def read_split(task: Task, path: Path, with_target: bool = True) -> Split:
    """Read train/dev (with_target) or test features of `task`, checking columns and every target value."""
    header, rows = read_tsv(path)
    needed = task.inputs + ((task.target,) if with_target else ())
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} for task {task.name} "
                         f"(header: {', '.join(header)})")
    columns = [header.index(c) for c in task.inputs]
    fields = [tuple(row[c] for c in columns) for _, row in rows]
    if not with_target:
        return Split(path, fields, None)
    t = header.index(task.target)
    if task.is_regression:
        y = np.array([_parse_value(task, path, number, row[t]) for number, row in rows], dtype=np.float64)
    else:
        index = {label: i for i, label in enumerate(task.labels)}
        for number, row in rows:
            if row[t] not in index:
                raise ValueError(f"{path}:{number}: unknown {task.target} {row[t]!r} for task {task.name}; "
                                 f"expected one of {', '.join(task.labels)}")
        y = np.array([index[row[t]] for _, row in rows], dtype=np.int64)
    return Split(path, fields, y)


def _parse_value(task: Task, path: Path, number: int, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}:{number}: {task.target} {text!r} is not a number") from None
    low, high = task.value_range
    if not low <= value <= high:
        raise ValueError(f"{path}:{number}: {task.target} {value:g} outside [{low:g}, {high:g}]")
    return value


def task_folder(task: Task, data_dir: Path) -> Path:
    """`data_dir` may be the task's own klej_<task>/ folder or the folder holding all nine. Another task's folder
    is refused: PolEmo-IN and -OUT share columns and labels, so one read as the other would load without a hitch."""
    data_dir = Path(data_dir)
    if (data_dir / task.folder / "train.tsv").exists():
        return data_dir / task.folder
    if (data_dir / "train.tsv").exists():
        name = Path(os.path.abspath(data_dir)).name       # "." and "x/.." named too; a symlink keeps its own name
        if name != task.folder and name in {t.folder for t in TASKS.values()}:
            raise ValueError(f"{data_dir}: this is {name}/, not {task.folder}/ of task {task.name}; pass the "
                             f"folder holding {task.folder}/ or that folder itself")
        return data_dir
    raise FileNotFoundError(f"{data_dir}: neither it nor {data_dir / task.folder} holds train.tsv of task "
                            f"{task.name} (expected {task.folder}/train.tsv, dev.tsv, test_features.tsv)")


def load_task(task: Task, data_dir: Path, seed: int = 0) -> TaskData:
    """train / dev / test of one task. A dev.tsv is used whenever present; tasks distributed without one (CBD, DYK,
    PSC) get a seeded, stratified 10% of train held out instead."""
    folder = task_folder(task, data_dir)
    train = read_split(task, folder / "train.tsv")
    dev_path = folder / "dev.tsv"
    if dev_path.exists():
        dev = read_split(task, dev_path)
    elif task.has_dev:
        raise FileNotFoundError(f"{dev_path}: missing (task {task.name} is distributed with a dev.tsv)")
    else:
        keep, held_out = stratified_holdout(train.y, 0.1, seed)
        train, dev = train.subset(keep), train.subset(held_out)
    test = read_split(task, folder / "test_features.tsv", with_target=False)
    return TaskData(train, dev, test)


def stratified_holdout(strata: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (kept, held-out) indices, both sorted. Each stratum gives round(fraction * its size) examples, at least
    one if it has two or more, so the held-out part has train's class balance and every class of train (but
    singletons, which training needs more); the same seed always picks the same examples."""
    rng = np.random.default_rng(seed)
    held_out = []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        n = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held_out.append(rng.permutation(members)[:n])
    held = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, dtype=np.int64)
    if len(held) == 0:
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(strata)} examples: too few")
    kept = np.setdiff1d(np.arange(len(strata)), held)
    return kept, held
