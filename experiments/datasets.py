"""The texts the report trains and measures on, cut from the Polish corpus (data/polish.py) and written once as
.jsonl files that train.py and eval_ppl read like any user's text:

    lapt-train     the corpus's train split without HELD_OUT (fortunes-pl): what LAPT trains on
    pl-test        the corpus's test split without HELD_OUT: in-domain Polish (man pages, LibreOffice and GNOME help)
    pl-fortunes    HELD_OUT's documents from every split (none of them trained on), in a seeded order: a second
                   Polish domain (jokes, poems, quotes, IRC logs) that LAPT never saw
    en-gnome       gnome-user-docs' English pages (the C locale; one document per page): English that never entered
                   training. (The "English" paragraphs the builder drops from the Polish pages were the first idea,
                   but they are ~3,500 characters of short Polish titles that data/langid.py misjudged, not English.)
                   These pages are the originals the trained Polish GNOME pages translate: the same subject matter.

Holding fortunes-pl out has a second use: the downstream task (klej/demo.py) is built from fortunes-pl, so the LAPT
adapter has never read the sentences it is later asked to classify.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from data.documents import read_documents
from data.langid import is_polish
from data.polish import MIN_PARAGRAPH_CHARS, _normalise, build_corpus, mallard_paragraphs
from model.sources import cache_dir
from training import atomic_write_text

HELD_OUT = "fortunes-pl"
VERSION = "report-v2"


def data_dir() -> Path:
    return cache_dir() / "experiments" / VERSION


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    atomic_write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def _split_records(split: str) -> list[dict]:
    path = build_corpus() / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def english_pages(log=print) -> list[str]:
    """gnome-user-docs' English help (its C locale, the original the Polish pages translate), one document per page:
    the Mallard paragraphs the corpus builder would drop as English (data/polish.py Cleaner, steps 1-2)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = subprocess.run(["apt-get", "download", "gnome-user-docs"], cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download gnome-user-docs failed:\n{result.stderr.strip()[-2000:]}")
        deb = sorted(tmp.glob("gnome-user-docs_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True, capture_output=True)
        docs = []
        for path in sorted((tmp / "root/usr/share/help/C").glob("**/*.page")):
            paragraphs = (_normalise(p, False) for p in mallard_paragraphs(path.read_text(encoding="utf-8")))
            english = [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS and not is_polish(p)]
            if english:
                docs.append("\n\n".join(english))
        shutil.rmtree(tmp / "root")
    log(f"report data: {len(docs)} English gnome-user-docs pages")
    return docs


def build(log=print) -> dict[str, Path]:
    """Write the four .jsonl files unless they are there; -> {name: path}."""
    folder = data_dir()
    paths = {name: folder / f"{name}.jsonl" for name in ("lapt-train", "pl-test", "pl-fortunes", "en-gnome")}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    train = _split_records("train")
    _write_jsonl(paths["lapt-train"], [r["text"] for r in train if r["source"] != HELD_OUT])
    _write_jsonl(paths["pl-test"], [r["text"] for r in _split_records("test") if r["source"] != HELD_OUT])
    fortunes = [r["text"] for split in ("train", "validation", "test") for r in _split_records(split)
                if r["source"] == HELD_OUT]
    random.Random(0).shuffle(fortunes)  # the files come in alphabetical order; a sample should mix them
    _write_jsonl(paths["pl-fortunes"], fortunes)
    english = english_pages(log)
    random.Random(0).shuffle(english)
    _write_jsonl(paths["en-gnome"], english)
    return paths


def subset(path: Path, n_documents: int) -> Path:
    """The first n documents of a .jsonl file as its own file (toy runs train on a small corpus)."""
    out = path.with_name(f"{path.stem}-first{n_documents}.jsonl")
    if not out.exists():
        _write_jsonl(out, read_documents(path)[:n_documents])
    return out
