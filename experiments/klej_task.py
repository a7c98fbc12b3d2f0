"""The downstream task of the report: klej/demo.py's fortunes task (same files, cleaning, classes, train and dev
sizes), with a larger test split so that a difference in accuracy can be told from noise: 70 fortunes per class
(210 in all, where the demo keeps 30 per class). pratchett (149 usable fortunes) and milosc (158) cap it there, after
60 + 15 per class for train and dev.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from klej.demo import FILES, PACKAGE, TASK, _write_tsv, download_fortunes, fortunes_by_file

EXAMPLES = {"train": 60, "dev": 15, "test": 70}   # per class


def build_task(data_dir: Path, seed: int = 0, log=print) -> Path:
    """Write klej_fortunes/ (train, dev, test_features, and test with labels) unless it is there; -> the folder."""
    folder = Path(data_dir) / TASK.folder
    if (folder / "test.tsv").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        fortunes = fortunes_by_file(download_fortunes(Path(tmp), log))
        rows: dict[str, list[tuple[str, str]]] = {split: [] for split in EXAMPLES}
        for name in FILES:
            items, need = fortunes[name], sum(EXAMPLES.values())
            if len(items) < need:
                raise RuntimeError(f"{PACKAGE}: only {len(items)} usable fortunes in {name}, need {need}")
            order, start = rng.permutation(len(items)), 0
            for split, n in EXAMPLES.items():
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
    log(f"report: task written to {folder} ({', '.join(f'{3 * n} {s}' for s, n in EXAMPLES.items())})")
    return folder
