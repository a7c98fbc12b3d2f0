"""The demo: its task builder on a small fake fortunes package (fast), and the real run end to end (slow)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from klej import demo
from klej.tasks import load_task, read_split


def _fake_fortunes(folder: Path) -> dict[str, str]:
    """Fortune files in the package's format; -> the cleaned text we expect of each fortune -> its file."""
    origin = {}
    folder.mkdir(parents=True)
    shared = "Ten sam tekst stoi w dwóch plikach, więc nie może należeć do żadnej klasy."
    for name in demo.FILES:
        entries = []
        for k in range(30):
            text = f"Fortuna {k} z pliku {name}: coś\tzabawnego,\nco zajmuje dwie linie."
            entries.append(f"{k + 1}. {text}\n            Autor Cytatu, \"Książka\"")   # number, attribution
            origin[f"Fortuna {k} z pliku {name}: coś zabawnego, co zajmuje dwie linie."] = name
        entries += [shared, "Za krótka."]
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
    return origin


def test_task_builder_cleans_balances_and_splits_without_overlap(tmp_path, monkeypatch):
    origin = _fake_fortunes(tmp_path / "fortunes")
    monkeypatch.setattr(demo, "download_fortunes", lambda folder, log: tmp_path / "fortunes")
    monkeypatch.setattr(demo, "EXAMPLES", {"train": 6, "dev": 2, "test": 3})
    folder = demo.build_task_files(tmp_path / "data", log=lambda *_: None)
    data = load_task(demo.TASK, folder)
    test = read_split(demo.TASK, folder / "test.tsv")
    assert test.fields == data.test.fields
    seen = []
    for split, per_class in ((data.train, 6), (data.dev, 2), (test, 3)):
        assert sorted(split.y.tolist()) == sorted(list(range(len(demo.FILES))) * per_class)
        for (text,), label in zip(split.fields, split.y):
            assert origin[text] == demo.TASK.labels[label]     # KeyError: uncleaned or dropped text slipped in
            seen.append(text)
    assert len(seen) == len(set(seen)), "a fortune is in two splits"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get to download fortunes-pl")
def test_demo_beats_the_majority_baseline_by_20_points_within_15_minutes(tmp_path):
    if subprocess.run(["apt-get", "download", "--print-uris", demo.PACKAGE], capture_output=True).returncode:
        pytest.skip(f"apt-get cannot fetch {demo.PACKAGE} here")
    report = demo.run_demo(tmp_path, "smollm2-135m", "cpu")
    assert report["test_accuracy"] - report["majority_baseline"] >= 0.20, report
    assert report["seconds"] <= 15 * 60, report
    assert (tmp_path / "predictions" / "test_pred_fortunes.tsv").exists()
