"""The downstream task of the report: klej/demo.py's fortunes task (same files, cleaning, classes, train and dev
sizes), with a larger test split so that a difference in accuracy can be told from noise: 70 fortunes per class
(210 in all, where the demo keeps 30 per class). pratchett (149 usable fortunes) and milosc (158) cap it there, after
60 + 15 per class for train and dev.
"""
from __future__ import annotations

from pathlib import Path

from klej.demo import build_task_files

EXAMPLES = {"train": 60, "dev": 15, "test": 70}   # per class


def build_task(data_dir: Path, seed: int = 0, log=print) -> Path:
    """Write klej_fortunes/ (train, dev, test_features, and test with labels) unless it is there; -> the folder."""
    return build_task_files(data_dir, seed, log, examples=EXAMPLES)
