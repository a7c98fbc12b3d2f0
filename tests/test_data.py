"""data/: the extractors, the language filter, the corpus build and split, reading documents, and token files.

The extractors are checked on small pages written by hand for these tests (tests/fixtures/data/), against the
paragraphs a person reads in them. The whole build runs on real .deb packages that we assemble from those pages with
dpkg-deb, so everything but the download is the real code path; one slow test builds the real corpus.
"""
from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import data.polish as polish
from data.documents import read_documents
from data.langid import is_polish
from data.polish import (PACKAGES, SPLITS, DownloadError, build_corpus, debian_licence, fortune_entries,
                         help_html_paragraphs, mallard_paragraphs, raw_documents, roff_paragraphs, roff_text, split_of)
from data.tokens import cached_token_file, load_tokens, sidecar_path, token_file_info, tokenize_to_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# ---------------------------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------------------------

def test_roff_paragraphs_keep_prose_and_drop_typesetting():
    paragraphs = roff_paragraphs((FIXTURES / "sample.1").read_text())
    assert paragraphs == [
        "NAZWA",
        "kotek - wypisuje imiona kotów z podanego pliku",
        "SKŁADNIA",
        "OPIS",
        "Program kotek czyta plik PLIK i wypisuje imiona wszystkich kotów, które w nim znajdzie — po jednym "
        "w wierszu.",
        "Uwaga: plik musi być zapisany w kodowaniu UTF-8.",
        "-a, --all",
        "wypisuje także koty, które śpią",
        "-q, --quiet",
        "This option has not been translated yet, so it stays in English for now.",
        "PRZYKŁAD",
        "Więcej informacji o projekcie można znaleźć na stronie domowej programu. Zażółć gęślą jaźńą \\ koniec.",
    ]


@pytest.mark.parametrize("roff, text", [
    (r"\fBpogrubione\fP i \fIpochyłe\fR", "pogrubione i pochyłe"),
    (r"\f(CWkod\f[]", "kod"),
    (r"a\-b \(em c \[en] d", "a-b — c – d"),
    (r"\*(lqcytat\*(rq", "“cytat”"),
    (r"\s-1MAŁE\s0 litery", "MAŁE litery"),
    (r"ukośnik \e i \\ też", "ukośnik \\ i \\ też"),
    (r"\&.kropka na początku", ".kropka na początku"),
    (r"tekst \" komentarz", "tekst "),
    (r"znak \[u0142]", "znak ł"),
    (r"nic\h'3n'tu", "nictu"),
])
def test_roff_text_escapes(roff, text):
    assert roff_text(roff) == text


def test_roff_line_continuation_and_conditionals():
    source = "Pierwsza część \\\ndruga część.\n.if t \\{\\\n.ds X y\nUkryty tekst\n.\\}\nWidoczny tekst.\n"
    assert roff_paragraphs(source) == ["Pierwsza część druga część. Widoczny tekst."]


def test_help_html_paragraphs():
    paragraphs = [" ".join(p.split()) for p in help_html_paragraphs((FIXTURES / "help.html").read_text())]
    assert paragraphs == [
        "Wstawianie tabeli",
        "Aby wstawić tabelę, wybierz Tabela - Wstaw tabelę & podaj liczbę wierszy.",
        "Ikona w komórce tabeli",
        "Pierwsza komórka",
        "Druga komórka w dwóch wierszach",
        "Punkt listy numer jeden",
        "Naciśnij Ctrl, aby zaznaczyć.",
        "Ostatni akapit treści.",
    ]


def test_mallard_paragraphs():
    assert mallard_paragraphs((FIXTURES / "sample.page").read_text()) == [
        "Karmienie kota",
        "Kliknij Ustawienia, a potem naciśnij Enter > gotowe.",
        "Otwórz puszkę.",
        "Nałóż karmę do miski.",
        "Woda",
        "Kot musi mieć stały dostęp do świeżej wody.",
        "Wodę wymieniaj codziennie.",
    ]


def test_fortune_entries():
    assert fortune_entries((FIXTURES / "fortunes").read_text()) == [
        ["Pierwsza fortunka: kot siedzi na płocie\ni patrzy na księżyc."],
        ["- Dlaczego kot miauczy?\n- Bo nie umie szczekać.", "Drugi akapit tej samej fortunki."],
        ["Ostatnia fortunka bez znaku procentu na końcu."],
    ]


def test_debian_licence_reads_the_files_star_stanza():
    assert debian_licence((FIXTURES / "copyright").read_text()) == "MPL-2.0"
    with pytest.raises(ValueError, match="Files: \\*"):
        debian_licence("This package is free software.\n")


def test_raw_documents_names_a_man_page_that_is_not_utf8(tmp_path):
    page = tmp_path / "usr/share/man/pl/man1/zly.1.gz"
    page.parent.mkdir(parents=True)
    good = "Dobry początek, potem ".encode()
    page.write_bytes(gzip.compress(good + b"\xb3."))              # 0xb3 is "ł" in ISO-8859-2, invalid in UTF-8
    with pytest.raises(ValueError, match=rf"zly\.1\.gz: not UTF-8 \(byte offset {len(good)}\)"):
        list(raw_documents("manpages-pl", tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Language filter
# ---------------------------------------------------------------------------------------------------------------

POLISH = [
    "Program zapisuje bieżące ustawienia i przywraca je przy następnym uruchomieniu.",
    "Kot jest na stole, a pies śpi pod oknem.",
    "Jeśli plik nie istnieje, zostanie utworzony w katalogu domowym użytkownika.",
    "Wybierz opcję Narzędzia, aby zmienić kolor tła dokumentu.",
    "Ala ma kota, który bardzo lubi mleko.",
    "Nie wiem, czy to dobry pomysł, ale spróbujmy jeszcze raz.",
    "Zmienna PATH zawiera listę katalogów, w których powłoka szuka poleceń.",
    "Tak sie pisalo na IRC-u, bez ogonkow, bo juz nikt nie mial polskiej klawiatury.",
]
ENGLISH = [
    "This option has not been translated yet, so it stays in English for now.",
    "The program saves the current settings and restores them the next time it is started.",
    "If the file does not exist, it is created in the home directory of the user.",
    "Copyright 2004 Paweł Kowalski. This is free software; see the source for copying conditions.",
    "With -l, scale sizes by SIZE when printing them; see SIZE format below.",
    "Returns the number of bytes written, or -1 if an error occurred.",
]
NEITHER = ["", "12345 678.90", "ls -la /usr/bin | grep x11", "int main(int argc, char **argv)"]


@pytest.mark.parametrize("text", POLISH)
def test_polish_paragraphs_are_polish(text):
    assert is_polish(text)


@pytest.mark.parametrize("text", ENGLISH + NEITHER)
def test_english_and_code_are_not_polish(text):
    assert not is_polish(text)


# ---------------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------------

def test_split_depends_only_on_the_document_id():
    rng = random.Random(1)
    ids = [f"pkg:{rng.getrandbits(64):x}/{i}" for i in range(20000)]
    splits = [split_of(i) for i in ids]
    shuffled = ids[:]
    rng.shuffle(shuffled)
    assert {i: s for i, s in zip(ids, splits)} == {i: split_of(i) for i in shuffled}
    # Each split's share is its SPLIT_PERCENT within 5 binomial standard deviations.
    for split in ("validation", "test"):
        p = polish.SPLIT_PERCENT[split] / 100
        share = splits.count(split) / len(ids)
        assert abs(share - p) < 5 * (p * (1 - p) / len(ids)) ** 0.5, (split, share)


# ---------------------------------------------------------------------------------------------------------------
# The whole build, on .deb packages assembled from the fixtures
# ---------------------------------------------------------------------------------------------------------------

WORDS = ("kot pies dom okno stół miska mleko ogród płot księżyc drzewo rzeka most droga miasto wieś las pole "
         "śpi pije biega skacze patrzy czeka myśli lubi widzi").split()


def _random_polish(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        words.insert(rng.randint(1, len(words) - 1), rng.choice(["i", "w", "na", "się", "jest", "z", "że"]))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def fake_debs(tmp_path_factory) -> dict[str, Path]:
    """One real .deb per package, each holding fixture pages (and random Polish fortunes) where Debian puts them."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not found: cannot assemble test packages")
    rng = random.Random(0)
    base = tmp_path_factory.mktemp("debs")
    copyright_text = (FIXTURES / "copyright").read_text()
    fortunes = [_random_polish(rng, rng.randint(4, 6)) for _ in range(150)]   # each over MIN_DOCUMENT_CHARS
    fortunes += [fortunes[0], "This fortune is in English and it should be dropped from the corpus.", "Za krótka."]
    pages = {
        "manpages-pl": {"usr/share/man/pl/man1/kotek.1.gz": gzip.compress((FIXTURES / "sample.1").read_bytes())},
        "manpages-pl-dev": {"usr/share/man/pl/man3/kotek.3.gz": gzip.compress(
            (".TH KOTEK 3\n.SH OPIS\n" + _random_polish(rng, 5) + "\n").encode())},
        "libreoffice-help-pl": {"usr/share/libreoffice/help/pl/text/shared/kotek.html":
                                (FIXTURES / "help.html").read_bytes()},
        "gnome-user-docs": {"usr/share/help/pl/gnome-help/kotek.page": (FIXTURES / "sample.page").read_bytes()},
        "fortunes-pl": {"usr/share/games/fortunes/pl/koty": "\n%\n".join(fortunes).encode(),
                        "usr/share/games/fortunes/pl/koty.dat": b"",
                        "usr/share/games/fortunes/pl/README": "Nie fortunki, tylko opis pakietu.".encode()},
    }
    debs = {}
    for package in PACKAGES:
        root = base / package
        files = {**pages[package], f"usr/share/doc/{package}/copyright": copyright_text.encode()}
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        (root / "DEBIAN").mkdir()
        (root / "DEBIAN/control").write_text(f"Package: {package}\nVersion: 1.0-test\nArchitecture: all\n"
                                             f"Maintainer: Test <test@example.org>\nDescription: test package\n")
        debs[package] = base / f"{package}_1.0-test_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(debs[package])],
                       check=True, capture_output=True)
    return debs


@pytest.fixture
def offline_download(monkeypatch, fake_debs):
    """Replace apt-get download by a copy of the fake packages; counts the calls."""
    calls = []

    def download(folder: Path, log) -> dict[str, Path]:
        calls.append(folder)
        return {p: Path(shutil.copy(deb, folder)) for p, deb in fake_debs.items()}

    monkeypatch.setattr(polish, "download_packages", download)
    return calls


def _read_split(corpus: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (corpus / f"{split}.jsonl").read_text().splitlines()]


def test_build_corpus_from_packages(tmp_path, offline_download):
    corpus = build_corpus(tmp_path / "corpus", log=lambda _: None)
    assert sorted(p.name for p in corpus.iterdir()) == ["manifest.json", "test.jsonl", "train.jsonl",
                                                        "validation.jsonl"]
    records = {split: _read_split(corpus, split) for split in SPLITS}
    everything = [r for split in SPLITS for r in records[split]]
    ids = [r["id"] for r in everything]
    assert len(ids) == len(set(ids)), "a document appears twice"
    for split in SPLITS:
        assert all(split_of(r["id"]) == split for r in records[split])
    assert all(r["licence"] == "MPL-2.0" for r in everything)           # from the fixture's "Files: *" stanza
    by_id = {r["id"]: r for r in everything}

    man = by_id["manpages-pl:man1/kotek.1"]["text"].split("\n\n")
    assert man == ["kotek - wypisuje imiona kotów z podanego pliku",
                   "Program kotek czyta plik PLIK i wypisuje imiona wszystkich kotów, które w nim znajdzie — po "
                   "jednym w wierszu.",
                   "Uwaga: plik musi być zapisany w kodowaniu UTF-8.",
                   "wypisuje także koty, które śpią",
                   "Więcej informacji o projekcie można znaleźć na stronie domowej programu. Zażółć gęślą jaźńą "
                   "\\ koniec."]
    assert by_id["gnome-user-docs:gnome-help/kotek.page"]["text"].split("\n\n") == [
        "Kliknij Ustawienia, a potem naciśnij Enter > gotowe.", "Kot musi mieć stały dostęp do świeżej wody.",
        "Wodę wymieniaj codziennie."]
    assert "libreoffice-help-pl:text/shared/kotek.html" in by_id

    fortunes = [r for r in everything if r["source"] == "fortunes-pl"]
    texts = [r["text"] for r in fortunes]
    assert len(texts) == len(set(texts)) == 150          # the duplicate, the English and the short one dropped
    assert all(r["id"].startswith("fortunes-pl:koty#") for r in fortunes)   # README has no .dat: not fortunes

    manifest = json.loads((corpus / "manifest.json").read_text())
    for split in SPLITS:
        assert manifest["splits"][split] == {
            "documents": len(records[split]), "characters": sum(len(r["text"]) for r in records[split]),
            "bytes": (corpus / f"{split}.jsonl").stat().st_size}
    for package in PACKAGES:
        mine = [r["text"] for r in everything if r["source"] == package]
        assert manifest["sources"][package] == {"version": "1.0-test", "licence": "MPL-2.0",
                                                "documents": len(mine), "characters": sum(map(len, mine))}
    assert not [p for p in tmp_path.iterdir() if p.name != "corpus"], "temporary build folders left behind"


def test_build_corpus_returns_a_built_corpus_at_once_and_rebuilds_on_force(tmp_path, offline_download):
    corpus = build_corpus(tmp_path / "corpus", log=lambda _: None)
    stamp = (corpus / "manifest.json").read_text()
    assert build_corpus(tmp_path / "corpus", log=lambda _: None) == corpus
    assert len(offline_download) == 1 and (corpus / "manifest.json").read_text() == stamp
    build_corpus(tmp_path / "corpus", force=True, log=lambda _: None)
    assert len(offline_download) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_interrupted_build_leaves_no_corpus(tmp_path, offline_download, monkeypatch):
    real = polish.raw_documents

    def failing(package, root):
        if package == "gnome-user-docs":
            raise KeyboardInterrupt
        return real(package, root)

    monkeypatch.setattr(polish, "raw_documents", failing)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "corpus", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_stats(tmp_path, offline_download, capsys):
    from data.__main__ import main
    assert main(["build", "--out", str(tmp_path / "corpus")]) == 0
    out = capsys.readouterr().out
    assert all(package in out for package in PACKAGES) and "validation" in out
    assert main(["stats", "--dir", str(tmp_path / "nothing")]) == 1
    assert "no corpus built here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------

def test_read_documents_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("Pierwszy akapit.\n\nDrugi akapit tego samego dokumentu.\n")
    (tmp_path / "a.jsonl").write_text('{"text": "jeden", "id": 1}\n\n{"text": "dwa"}\n{"text": "  "}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("trzeci")
    (tmp_path / "ignored.md").write_text("nie czytamy")
    assert read_documents(tmp_path / "b.txt") == ["Pierwszy akapit.\n\nDrugi akapit tego samego dokumentu.\n"]
    assert read_documents(str(tmp_path / "a.jsonl")) == ["jeden", "dwa"]
    assert read_documents(tmp_path) == ["jeden", "dwa", "Pierwszy akapit.\n\nDrugi akapit tego samego "
                                        "dokumentu.\n", "trzeci"]


def test_read_documents_split_reads_the_built_corpus(tmp_path, monkeypatch):
    (tmp_path / "validation.jsonl").write_text(json.dumps({"id": "x", "source": "s", "text": "tekst"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "y", "source": "s", "text": " "}) + "\n")
    monkeypatch.setattr("data.documents.build_corpus", lambda: tmp_path)
    assert read_documents("validation") == ["tekst"]
    with pytest.raises(ValueError, match=r"test\.jsonl: no documents"):
        read_documents("test")


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", "zażółć".encode() + b"\xff\xfe reszta",
     rf"bad\.txt: not valid UTF-8 at byte offset {len('zażółć'.encode())}\b"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"bad\.jsonl, line 3: not valid JSON"),
    ("notext.jsonl", b'{"text": "a"}\n\n{"tekst": "b"}\n', r'notext\.jsonl, line 3: expected an object with'),
    ("list.jsonl", b'["a"]\n', r'list\.jsonl, line 1: expected an object'),
    ("empty.txt", b"", r"empty\.txt: empty file"),
    ("blank.txt", b"  \n\n", r"blank\.txt: empty file"),
    ("empty.jsonl", b"\n", r"empty\.jsonl: no documents"),
    ("data.csv", b"a,b\n", r"data\.csv: unknown kind of file"),
    ("surrogate.jsonl", b'{"text": "a"}\n{"text": "b\\ud800c"}\n',
     r"surrogate\.jsonl, line 2: .*lone UTF-16 surrogate"),
])
def test_read_documents_errors_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_documents(tmp_path / name)


def test_read_documents_folder_skips_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text("\n\n")
    (tmp_path / "c.txt").write_text("treść")
    assert read_documents(tmp_path) == ["treść"]
    (tmp_path / "c.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"no documents in its 3 \.txt/\.jsonl files \(all empty\)"):
        read_documents(tmp_path)


def test_read_documents_missing_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="holds no .txt or .jsonl"):
        read_documents(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """A stand-in with our tokenizers' interface: one token per UTF-8 byte, shifted above the special ids."""
    bos_id, eos_id, add_bos, add_eos, stop_ids = 1, 2, False, False, (2,)

    def __init__(self, offset: int = 3, fail_on: int | None = None) -> None:
        self.offset, self.fail_on, self.calls = offset, fail_on, 0
        self.vocab_size = offset + 256

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("tokenizer failed mid-write")
        return [self.bos_id] * bos + [b + self.offset for b in text.encode()] + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode()


def _random_documents(rng: random.Random, n: int) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyząćęłńóśźż .,\n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(n)]


@pytest.mark.parametrize("offset, dtype", [(3, np.uint16), (66000, np.uint32)])
def test_token_file_round_trip(tmp_path, offset, dtype):
    documents = _random_documents(random.Random(offset), 30)
    tokenizer = ByteTokenizer(offset)
    path = tokenize_to_file(documents, tokenizer, tmp_path / "t.bin", source="unit test")
    tokens = load_tokens(path)
    assert tokens.dtype == dtype
    # Reference: the same stream built by hand from the byte values, EOS after every document.
    expected = [i for doc in documents for i in [b + offset for b in doc.encode()] + [ByteTokenizer.eos_id]]
    assert tokens.tolist() == expected
    ends = np.flatnonzero(tokens == ByteTokenizer.eos_id)
    assert len(ends) == len(documents)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)] == documents
    info = token_file_info(path)
    assert info["n_documents"] == len(documents) and info["n_tokens"] == len(expected)
    assert info["tokenizer"] == {"name": "ByteTokenizer", "vocab_size": offset + 256} and info["source"] == "unit test"


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    documents = _random_documents(random.Random(2), 10)
    with pytest.raises(RuntimeError, match="mid-write"):
        tokenize_to_file(documents, ByteTokenizer(fail_on=4), tmp_path / "t.bin")
    assert list(tmp_path.iterdir()) == []
    tokenize_to_file(documents, ByteTokenizer(), tmp_path / "t.bin")
    before = load_tokens(tmp_path / "t.bin").tolist()
    with pytest.raises(RuntimeError, match="mid-write"):
        tokenize_to_file(documents[::-1] + ["więcej"], ByteTokenizer(fail_on=7), tmp_path / "t.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.bin.json"]
    assert load_tokens(tmp_path / "t.bin").tolist() == before


def test_token_file_with_mistral_tokenizer(tmp_path, mistral_tokenizer_path):
    import sentencepiece
    from model.tokenizer import SentencePieceTokenizer
    documents = [" ".join(roff_paragraphs((FIXTURES / "sample.1").read_text())),
                 (FIXTURES / "fortunes").read_text(), "Zażółć gęślą jaźń."]
    tokens = load_tokens(tokenize_to_file(documents, SentencePieceTokenizer(mistral_tokenizer_path),
                                          tmp_path / "t.bin"))
    # Oracle: sentencepiece itself. Mistral's convention adds BOS to a text (transformers' tokenizer(text) does),
    # so each document is BOS, its pieces, and the EOS that separates documents.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [i for doc in documents for i in [sp.bos_id()] + sp.encode(doc) + [sp.eos_id()]]


def test_load_tokens_refuses_inconsistent_files(tmp_path):
    path = tokenize_to_file(_random_documents(random.Random(3), 5), ByteTokenizer(), tmp_path / "t.bin")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)
    with pytest.raises(ValueError, match="t.bin: .* bytes, but its sidecar"):
        load_tokens(path)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.bin\.json: not valid JSON"):
        load_tokens(path)
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="sidecar missing"):
        load_tokens(path)


def test_cached_token_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICURIE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.txt"
    text.write_text("Krótki dokument użytkownika.")
    tokenizer = ByteTokenizer()
    path = cached_token_file(text, tokenizer, "bytes-v1")
    assert path.is_relative_to(tmp_path / "cache" / "tokens" / "bytes-v1")
    assert cached_token_file(text, tokenizer, "bytes-v1") == path and tokenizer.calls == 1   # not encoded again
    text.write_text("Zmieniony dokument użytkownika.")
    changed = cached_token_file(text, tokenizer, "bytes-v1")
    assert changed != path and tokenizer.decode(load_tokens(changed)[:-1].tolist()) == text.read_text()
    with pytest.raises(ValueError, match="same key"):
        cached_token_file(text, ByteTokenizer(offset=10), "bytes-v1")
    with pytest.raises(ValueError, match="tokenizer_key"):
        cached_token_file(text, tokenizer, "../escape")


# ---------------------------------------------------------------------------------------------------------------
# The real corpus
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_polish_corpus():
    try:
        corpus = build_corpus()
    except DownloadError as e:
        pytest.skip(f"the Debian packages could not be downloaded, so the real corpus cannot be built: {e}")
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert set(manifest["sources"]) == set(PACKAGES)
    assert all(s["documents"] > 50 and s["licence"] for s in manifest["sources"].values())
    seen: set[str] = set()
    total = 0
    for split in SPLITS:
        records = _read_split(corpus, split)
        chars = sum(len(r["text"]) for r in records)
        assert manifest["splits"][split]["documents"] == len(records)
        assert manifest["splits"][split]["characters"] == chars
        assert chars >= (4_000_000 if split == "train" else 100_000), (split, chars)
        assert all(split_of(r["id"]) == split for r in records)
        ids = {r["id"] for r in records}
        assert not ids & seen and len(ids) == len(records)
        seen |= ids
        total += chars
        # Language sanity, independent of our filter: Polish letters common, English's commonest word rare.
        text = " ".join(r["text"] for r in records).lower()
        letters = sum(c.isalpha() for c in text)
        assert sum(text.count(c) for c in "ąćęłńóśźż") / letters > 0.04
        words = text.split()
        assert words.count("the") / len(words) < 0.002
    assert 4_000_000 < total < 12_000_000
