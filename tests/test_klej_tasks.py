"""KLEJ loaders on hand-written fixture files in the official format (tests/fixtures/klej), and their errors.

The oracle for reading is Python's csv module told exactly what the format is (tab-separated, QUOTE_NONE): an
independent reader that must see the same fields as ours, quotes included.
"""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from klej.metrics import METRICS
from klej.tasks import TASKS, get_task, load_task, read_split, stratified_holdout

FIXTURES = Path(__file__).parent / "fixtures" / "klej"


def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_registry_matches_the_issue_table():
    assert list(TASKS) == ["nkjp-ner", "cdsc-e", "cdsc-r", "cbd", "polemo2.0-in", "polemo2.0-out", "dyk", "psc", "ar"]
    for task in TASKS.values():
        assert task.metric in METRICS
        assert len(set(task.labels)) == len(task.labels)
        assert task.epochs == (1 if task.name in ("ar", "cbd", "cdsc-e", "cdsc-r") else 5)
        assert task.has_dev == (task.name not in ("cbd", "dyk", "psc"))
    assert TASKS["cdsc-r"].is_regression and TASKS["ar"].is_regression
    with pytest.raises(KeyError, match="known: nkjp-ner"):
        get_task("glue")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_reads_its_fixture_files_like_csv_quote_none(name):
    task = TASKS[name]
    folder = FIXTURES / task.folder
    data = load_task(task, FIXTURES)
    test_rows = _csv_rows(folder / "test_features.tsv")
    assert data.test.fields == [tuple(r[c] for c in task.inputs) for r in test_rows]
    assert data.test.y is None
    train_rows = _csv_rows(folder / "train.tsv")
    if task.has_dev:
        dev_rows = _csv_rows(folder / "dev.tsv")
        splits = [(data.train, train_rows), (data.dev, dev_rows)]
    else:   # the hold-out: train and dev together are train.tsv, in order, each row with its own label
        kept, held = _matches(data.train, train_rows, task), _matches(data.dev, train_rows, task)
        index = np.sort(np.concatenate([[train_rows.index(r) for r in kept], [train_rows.index(r) for r in held]]))
        np.testing.assert_array_equal(index, np.arange(len(train_rows)))
        splits = [(data.train, kept), (data.dev, held)]
    for split, rows in splits:
        assert split.fields == [tuple(r[c] for c in task.inputs) for r in rows]
        if task.is_regression:
            np.testing.assert_array_equal(split.y, [float(r[task.target]) for r in rows])
        else:
            assert [task.labels[i] for i in split.y] == [r[task.target] for r in rows]


def _matches(split, rows, task):
    by_fields = {tuple(r[c] for c in task.inputs): r for r in rows}
    return [by_fields[f] for f in split.fields]


def test_double_quotes_are_ordinary_characters():
    quoted = []
    for task in TASKS.values():
        data = load_task(task, FIXTURES)
        quoted += [f for split in (data.train, data.dev, data.test) for fields in split.fields
                   for f in fields if '"' in f]
    assert len(quoted) >= 9
    assert 'Kto napisał "Pana Tadeusza"?' in quoted


@pytest.mark.parametrize("name", ["cbd", "dyk", "psc"])
def test_tasks_without_dev_hold_out_a_stratified_seeded_tenth(name):
    task = TASKS[name]
    data = load_task(task, FIXTURES, seed=3)
    again = load_task(task, FIXTURES, seed=3)
    assert data.dev.fields == again.dev.fields
    assert not set(data.dev.fields) & set(data.train.fields)
    # Stratified: each class gives a tenth of its rows (at least one), counted on the file's own labels.
    rows = _csv_rows(FIXTURES / task.folder / "train.tsv")
    labels = [task.labels.index(r[task.target]) for r in rows]
    for c in set(labels):
        n = labels.count(c)
        assert list(data.dev.y).count(c) == (max(1, round(0.1 * n)) if n > 1 else 0), c
    assert len(data.dev) + len(data.train) == len(rows)
    # Seeded: other seeds hold out other rows.
    splits = {tuple(load_task(task, FIXTURES, seed=seed).dev.fields) for seed in range(8)}
    assert len(splits) > 1


@pytest.mark.parametrize("seed", range(4))
def test_stratified_holdout_keeps_class_balance(seed):
    rng = np.random.default_rng(seed)
    strata = rng.choice(5, size=rng.integers(50, 400), p=[0.5, 0.2, 0.15, 0.1, 0.05])
    kept, held = stratified_holdout(strata, 0.1, seed)
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(strata)))
    for c in np.unique(strata):
        n = np.sum(strata == c)
        expected = max(1, round(0.1 * n)) if n > 1 else 0
        assert np.sum(strata[held] == c) == expected
    other_kept, other_held = stratified_holdout(strata, 0.1, seed + 100)
    assert not np.array_equal(held, other_held)


def _copy_task(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / f"klej_{name}"
    shutil.copytree(FIXTURES / f"klej_{name}", folder)
    return folder


def test_missing_column_names_the_file(tmp_path):
    folder = _copy_task(tmp_path, "cdsc-e")
    (folder / "train.tsv").write_text("pair_ID\tsentence_A\tentailment_judgment\n1\tZdanie.\tNEUTRAL\n")
    with pytest.raises(ValueError, match=r"train\.tsv: no column 'sentence_B'"):
        load_task(TASKS["cdsc-e"], tmp_path)


def test_unknown_label_names_file_and_line(tmp_path):
    folder = _copy_task(tmp_path, "polemo2.0-in")
    lines = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\t__label__z_plus_m"
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev\.tsv:3: unknown target '__label__z_plus_m'"):
        load_task(TASKS["polemo2.0-in"], tmp_path)


def test_malformed_line_names_file_and_line(tmp_path):
    folder = _copy_task(tmp_path, "dyk")
    text = (folder / "test_features.tsv").read_text(encoding="utf-8")
    (folder / "test_features.tsv").write_text(text + "czy-wiesz-11\tPytanie bez odpowiedzi?\n", encoding="utf-8")
    n = len(text.splitlines()) + 1
    with pytest.raises(ValueError, match=rf"test_features\.tsv:{n}: malformed line: 2 tab-separated field\(s\)"):
        load_task(TASKS["dyk"], tmp_path)


@pytest.mark.parametrize("value, message", [("dużo", "is not a number"), ("5.5", r"outside \[0, 5\]")])
def test_bad_regression_target_names_file_and_line(tmp_path, value, message):
    folder = _copy_task(tmp_path, "cdsc-r")
    lines = (folder / "train.tsv").read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4].rsplit("\t", 1)[0] + f"\t{value}"
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"train\.tsv:5: relatedness_score .*{message}"):
        load_task(TASKS["cdsc-r"], tmp_path)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_bad_utf8_names_file_and_line(tmp_path, bom):
    folder = _copy_task(tmp_path, "ar")
    head = bom + "text\trating\nDobre.\t5\n".encode() + b"Z"
    (folder / "dev.tsv").write_bytes(head + b"\xb3e.\t1\n")
    with pytest.raises(ValueError, match=rf"dev\.tsv:3: not valid UTF-8 \(byte offset {len(head)}\)"):
        load_task(TASKS["ar"], tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="klej_nkjp-ner/train.tsv"):
        load_task(TASKS["nkjp-ner"], tmp_path)
    folder = _copy_task(tmp_path, "nkjp-ner")
    (folder / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv: missing"):
        load_task(TASKS["nkjp-ner"], tmp_path)


def test_task_folder_itself_may_be_given():
    data = load_task(TASKS["ar"], FIXTURES / "klej_ar")
    assert data.train.fields == read_split(TASKS["ar"], FIXTURES / "klej_ar" / "train.tsv").fields


def test_another_tasks_folder_is_refused_naming_both(tmp_path):
    # PolEmo-IN's files would pass every column and label check of PolEmo-OUT: only the folder name tells them apart.
    with pytest.raises(ValueError, match=r"klej_polemo2\.0-in/, not klej_polemo2\.0-out/"):
        load_task(TASKS["polemo2.0-out"], FIXTURES / "klej_polemo2.0-in")
    # A folder not named like another task's is taken at its word, klej_data (the README's name) included.
    for name in ("my-polemo", "klej_data"):
        shutil.copytree(FIXTURES / "klej_polemo2.0-in", tmp_path / name)
        data = load_task(TASKS["polemo2.0-out"], tmp_path / name)
        assert len(data.train) == len(read_split(TASKS["polemo2.0-out"], tmp_path / name / "train.tsv"))


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    # AR's first column, text, is an input: a BOM left in place would hide it ("\ufefftext" is no column of AR).
    folder = _copy_task(tmp_path, "ar")
    plain = load_task(TASKS["ar"], tmp_path)
    for name in ("train.tsv", "dev.tsv", "test_features.tsv"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    with_bom = load_task(TASKS["ar"], tmp_path)
    for a, b in ((plain.train, with_bom.train), (plain.dev, with_bom.dev), (plain.test, with_bom.test)):
        assert a.fields == b.fields
        np.testing.assert_array_equal(a.y, b.y)
