"""The offline demo: its task builder on a small fake help package (fast), and the real run end to end (slow)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from klej import demo
from klej.tasks import load_task, read_split


def _fake_help(root: Path) -> dict[str, str]:
    """LibreOffice-like HTML pages for the three modules; -> paragraph -> its module/page, for the kept ones."""
    origin = {}
    shared = "Ten akapit jest wspólny dla wszystkich modułów i dlatego nie może trafić do żadnej klasy zadania."
    for module in demo.MODULES:
        folder = root / "usr/share/libreoffice/help/pl/text" / module / "01"
        folder.mkdir(parents=True)
        for page in range(40):
            paragraphs = [f"Akapit {k} strony {page} modułu {module} opisuje, jak w tym programie można "
                          f"zmienić ustawienia i co się wtedy dzieje z dokumentem." for k in range(3)]
            origin.update({p: f"{module}/01/{page}.html" for p in paragraphs})
            body = "".join(f"<p>{p}</p>" for p in paragraphs)
            extra = (f"<p>{shared}</p><p>Krótki akapit.</p><p>This paragraph was never translated, so the "
                     f"filter must drop it from the Polish task.</p>")
            (folder / f"{page}.html").write_text(
                f'<html><body><div id="DisplayArea"><h1>Tytuł</h1>{body}{extra}</div></body></html>',
                encoding="utf-8")
    return origin


def test_task_builder_balances_classes_and_splits_by_page(tmp_path, monkeypatch):
    origin = _fake_help(tmp_path / "package")
    monkeypatch.setattr(demo, "download_help", lambda folder, log: tmp_path / "package")
    monkeypatch.setattr(demo, "EXAMPLES", {"train": 6, "dev": 2, "test": 3})
    folder = demo.build_task_files(tmp_path / "data", log=lambda *_: None)
    data = load_task(demo.TASK, folder)
    test = read_split(demo.TASK, folder / "test.tsv")
    assert test.fields == data.test.fields
    pages = {}
    for name, split, per_class in (("train", data.train, 6), ("dev", data.dev, 2), ("test", test, 3)):
        assert sorted(split.y.tolist()) == sorted(list(range(len(demo.MODULES))) * per_class)
        for (text,), label in zip(split.fields, split.y):
            module = origin[text].split("/")[0]           # KeyError: a dropped paragraph slipped in
            assert demo.MODULES[module] == demo.TASK.labels[label]
            pages.setdefault(origin[text], set()).add(name)
    assert all(len(splits) == 1 for splits in pages.values()), "a page gave paragraphs to two splits"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get to download libreoffice-help-pl")
def test_demo_beats_the_majority_baseline_by_20_points_within_15_minutes(tmp_path):
    if subprocess.run(["apt-get", "download", "--print-uris", demo.PACKAGE], capture_output=True).returncode:
        pytest.skip(f"apt-get cannot fetch {demo.PACKAGE} here")
    report = demo.run_demo(tmp_path, "smollm2-135m", "cpu")
    assert report["test_accuracy"] - report["majority_baseline"] >= 0.20, report
    assert report["seconds"] <= 15 * 60, report
    assert (tmp_path / "predictions" / "test_pred_libreoffice-help.tsv").exists()
