"""The Polish LAPT corpus: free Polish prose from five Debian packages, built once on the machine that uses it.

Curie-7B adapted Mistral to Polish on ~276 M tokens of web text. We cannot ship web text, and the machines this
project runs on reach no web, only package registries. Debian, though, packages a few megabytes of Polish written
by people, under free licences, and every machine here can `apt-get download` it:

    package              what                                                    licence ("Files: *" in copyright)
    manpages-pl(-dev)    translated man pages, gzip'd roff                       GPL-3+
    libreoffice-help-pl  LibreOffice's help, pre-rendered to HTML                MPL-2.0
    gnome-user-docs      GNOME's user help in Mallard XML (its Polish pages)     CC-BY-SA-3.0
    fortunes-pl          Polish fortune cookies: jokes, quotes, IRC logs         GPL-2+

The licences are read from each package's /usr/share/doc/<pkg>/copyright when we build, not hard-coded.

Building: download the packages, unpack them with `dpkg -x`, and turn each file into paragraphs of plain text with a
small extractor per format (below). Then clean, in this order, paragraph by paragraph:
  1. whitespace normalised, fragments under MIN_PARAGRAPH_CHARS dropped (headings, option names, "1.");
  2. paragraphs that are really English dropped (data/langid.py: much of the documentation is untranslated);
  3. a paragraph seen before anywhere in the corpus dropped (boilerplate: every man page ends with the same
     translators' note, LibreOffice repeats snippets across pages), so it cannot sit in both train and test.
A document is what is left of one file (one fortune for fortunes-pl), its paragraphs joined by blank lines; one
under MIN_DOCUMENT_CHARS is dropped, and so is a document identical to an earlier one, which step 3 has emptied.

Splitting is by document, never by paragraph, so that validation/test perplexity measures text from pages the model
never saw: a document's split is a seeded hash of its id ("<package>:<path in package>"), which does not depend on
the order of files or on what else is in the corpus. SPLIT_PERCENT gives validation and test 3% of the documents
each (~160 k characters, ~67 k Mistral tokens; the whole corpus is ~6.3 M characters, ~2.7 M tokens), plenty for a
stable perplexity, and leaves 94% for training.

Output, in `$MINICURIE_CACHE/corpus/polish-v1/`: train.jsonl, validation.jsonl, test.jsonl (one
{"id", "source", "licence", "text"} per line) and manifest.json (packages with versions and licences, counts per
split, build date). The folder is built beside its final place and renamed into it only when complete, so an
interrupted build leaves no half corpus, and a built corpus is returned at once.

Man pages are rendered by our own roff stripper, never by `man`/groff even where installed: the corpus must come out
the same on every machine, and the stripper is all a reader needs to see what text went into training.
"""
from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from data.langid import is_polish
from model.sources import cache_dir

VERSION = "polish-v1"
PACKAGES = ("manpages-pl", "manpages-pl-dev", "libreoffice-help-pl", "gnome-user-docs", "fortunes-pl")
SPLITS = ("train", "validation", "test")
# Percent of the documents in validation and in test; the rest are train. See the module docstring for the choice.
SPLIT_PERCENT = {"validation": 3.0, "test": 3.0}
MIN_PARAGRAPH_CHARS = 25
MIN_DOCUMENT_CHARS = 80


def default_corpus_dir() -> Path:
    return cache_dir() / "corpus" / VERSION


# ---------------------------------------------------------------------------------------------------------------
# Man pages: a roff stripper.
#
# Man pages are roff source: text lines to be filled into paragraphs, interleaved with control lines (".PP" new
# paragraph, ".B word" bold, ".TP" tagged paragraph, ...) and escapes inside text ("\fB" font, "\-" minus,
# "\(em" dash). We keep the prose and drop the typesetting: control lines that only change layout are dropped,
# those that start a new paragraph flush the current one, the few that carry text (fonts, headings) give their
# arguments as text. No-fill blocks (.nf/.EX/.Vb: code, synopses), tables (.TS) and macro definitions (.de) are
# dropped whole. mdoc pages (.Dd, 7 of ~600) keep only their plain text lines.
# ---------------------------------------------------------------------------------------------------------------

_BREAK = {"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "sp", "br", "RS", "RE", "Sp", "Sh", "Ss", "Pp"}
_FONT = {"B", "I", "R", "SM", "SB"}                          # arguments are text, joined by spaces
_ALTERNATING_FONT = {"BR", "RB", "BI", "IB", "IR", "RI"}     # arguments are text, joined without spaces
# A block opened by the key ends at a control line named by the value (".." reads as the request named ".").
_SKIP_UNTIL = {"nf": "fi", "EX": "EE", "Vb": "Ve", "TS": "TE", "de": ".", "am": ".", "ig": "."}

_GLYPHS = {
    "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "em": "—", "en": "–", "hy": "-",
    "bu": "•", "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "+-": "±", "<=": "≤",
    ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "ti": "~", "ha": "^", "sl": "/", "rs": "\\", "ba": "|",
    "bv": "|", "ul": "_", "at": "@", "pd": "∂", "if": "∞", "is": "∫", "ga": "`", "aa": "´", "*p": "π",
    "*b": "β", "*W": "Ω",
}
# Strings (\*x) defined by the man and pod2man macro packages; any other string expands to nothing.
_STRINGS = {"lq": "“", "rq": "”", "C`": '"', "C'": '"', 'L"': "“", 'R"': "”", "Aq": "'", "R": "®", "Tm": "™"}
# One-character escapes; an escape missing here stands for its character (\. is ".", \' is "'").
_SIMPLE_ESCAPES = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "&": "", ")": "",
                   "|": "", "^": "", "c": "", ",": "", "/": "", "%": "", ":": "", "u": "", "d": "", "p": "",
                   "r": "", "{": "", "}": ""}

_ESCAPE = re.compile(r"""\\(?:
      (?P<comment>["\#].*)                               # \" comment, to the end of the line
    | f(?:\[[^\]]*\]|\(..|.)                             # font change
    | s[+-]?(?:\(\d\d|\[\d+\]|\d)                        # size change
    | \((?P<glyph2>..) | \[(?P<glyph>[^\]]*)\]           # \(xx, \[name]: special characters
    | \*(?:\((?P<string2>..)|\[(?P<string>[^\]]*)\]|(?P<string1>.))   # \*x, \*(xx, \*[name]: strings
    | n[+-]?(?:\(..|\[[^\]]*\]|.)                        # number register
    | [hvwoDlLNbxXSRZ]'[^']*'                            # motions and drawing, with a quoted argument
    | k. | z
    | (?P<char>.)
)""", re.VERBOSE)


def _expand_escape(m: re.Match) -> str:
    if m["glyph2"] is not None or m["glyph"] is not None:
        name = m["glyph2"] or m["glyph"]
        if re.fullmatch(r"u[0-9A-F]{4,5}", name):          # \[u0105]: a Unicode code point
            return chr(int(name[1:], 16))
        return _GLYPHS.get(name, "")
    string = m["string2"] or m["string"] or m["string1"]
    if string is not None:
        return _STRINGS.get(string, "")
    if m["char"] is not None:
        return _SIMPLE_ESCAPES.get(m["char"], m["char"])
    return ""                                                 # comments, fonts, sizes, registers, motions


def roff_text(line: str) -> str:
    """One line of roff text with its escapes resolved to plain characters."""
    return _ESCAPE.sub(_expand_escape, line)


def _roff_arguments(rest: str) -> list[str]:
    # Roff splits arguments on spaces; "a b" is one argument, and "" inside quotes is a literal quote.
    return [m[1].replace('""', '"') if m[1] is not None else m[2]
            for m in re.finditer(r'"((?:[^"]|"")*)"?|(\S+)', rest)]


def roff_paragraphs(source: str) -> list[str]:
    """The prose paragraphs of a man page's roff source (see the notes above); whitespace not yet normalised."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    skip_until: str | None = None
    brace_depth = 0            # inside a conditional's \{ ... \} block (pod2man's preamble), which we drop
    tag_pending = False        # .TP: the next text line is the tag, a paragraph of its own
    # A line ending in an unescaped backslash continues on the next line.
    lines = re.sub(r"(?<!\\)((?:\\\\)*)\\\n", r"\1", source).split("\n")
    for line in lines:
        is_control = line[:1] in (".", "'")
        name, _, rest = line[1:].strip().partition(" ") if is_control else ("", "", "")
        rest = rest.strip()
        if skip_until is not None:
            if is_control and name == skip_until:
                skip_until = None
            continue
        if brace_depth or (is_control and name in ("if", "ie", "el")):
            brace_depth += line.count("\\{") - line.count("\\}")
            brace_depth = max(brace_depth, 0)
            continue
        if not is_control:
            if not line.strip() or line[0] == " ":     # a blank line or leading space breaks the filled text
                flush()
            text = roff_text(line)
            if text.strip():
                current.append(text.strip())
                if tag_pending:
                    flush()
                    tag_pending = False
            continue
        if name in _SKIP_UNTIL:
            flush()
            skip_until = _SKIP_UNTIL[name]
        elif name in _BREAK:
            flush()
            tag_pending = name == "TP"
            if name in ("SH", "SS", "Sh", "Ss") and rest:
                paragraphs.append(roff_text(" ".join(_roff_arguments(rest))))
        elif name in _FONT or name in _ALTERNATING_FONT:
            sep = " " if name in _FONT else ""
            text = roff_text(sep.join(_roff_arguments(rest))).strip()
            if text:
                current.append(text)
                if tag_pending:
                    flush()
                    tag_pending = False
        elif name in ("UE", "ME") and current and rest:
            current[-1] += roff_text(rest)                  # punctuation right after a link: no space before it
        # Every other request or macro only changes layout (or is an mdoc macro we do not render): dropped.
    flush()
    return paragraphs


# ---------------------------------------------------------------------------------------------------------------
# LibreOffice help: HTML pages (Debian ships them pre-rendered from LibreOffice's .xhp sources). The help text
# sits in <div id="DisplayArea">; headers, side bars and the debug footer are navigation. Each <p>, <h1>-<h6>, <li>
# and table cell is a paragraph; code (<pre>, <p class="code">) and scripts are dropped. Text that differs by
# system or module comes in hidden variants that the page's script chooses between, e.g. for a key name
# <span hidden id="MAC..." class="MAC">Option</span><span hidden id="default...">Alt</span>: we keep the default one.
# ---------------------------------------------------------------------------------------------------------------

_HTML_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th"}
_HTML_SKIPPED = {"script", "style", "pre"}
_HTML_CODE_CLASSES = {"code", "codeintable", "smathcode"}


class _HelpPageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._text: list[str] = []
        self._display_divs = 0       # depth of <div>s inside DisplayArea; 0: outside it
        self._skip_tag = ""          # the tag of the dropped element we are in ("" when none) ...
        self._skip_depth = 0         # ... and how many of that tag are open inside it, itself included

    def _flush(self) -> None:
        text = "".join(self._text)
        if text.strip():
            self.paragraphs.append(text)
        self._text.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "div" and (self._display_divs or attributes.get("id") == "DisplayArea"):
            self._display_divs += 1
        if not self._display_divs:
            return
        if self._skip_depth:
            self._skip_depth += tag == self._skip_tag
            return
        if tag in _HTML_BLOCKS:
            self._flush()
        if (tag in _HTML_SKIPPED or (tag == "p" and attributes.get("class") in _HTML_CODE_CLASSES)
                or ("hidden" in attributes and not (attributes.get("id") or "").startswith("default"))):
            self._skip_tag, self._skip_depth = tag, 1
        elif tag == "br":
            self._text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if not self._display_divs:
            return
        if self._skip_depth:
            self._skip_depth -= tag == self._skip_tag
        elif tag in _HTML_BLOCKS:
            self._flush()
        if tag == "div":
            self._display_divs -= 1
            if not self._display_divs:
                self._flush()

    def handle_data(self, data: str) -> None:
        if self._display_divs and not self._skip_depth:
            self._text.append(data)


def help_html_paragraphs(html: str) -> list[str]:
    """The paragraphs of one LibreOffice help page."""
    parser = _HelpPageParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


# ---------------------------------------------------------------------------------------------------------------
# GNOME help: Mallard XML. Text lives in <p>, <title>, <subtitle> and <desc> (a <p> may hold inline markup such as
# <gui> or <key>, whose text we keep). <info> holds credits and links, <code>/<screen> blocks hold commands, and
# <comment> holds notes between editors: all dropped.
# ---------------------------------------------------------------------------------------------------------------

_MALLARD_TEXT = {"p", "title", "subtitle", "desc"}
_MALLARD_SKIPPED = {"info", "code", "screen", "comment"}


def mallard_paragraphs(xml: str) -> list[str]:
    """The paragraphs of one Mallard page. Raises xml.etree.ElementTree.ParseError on malformed XML."""
    paragraphs: list[str] = []

    def walk(element: ET.Element) -> None:
        tag = element.tag.rpartition("}")[2]                # drop the namespace: "{http://...}p" -> "p"
        if tag in _MALLARD_SKIPPED:
            return
        if tag in _MALLARD_TEXT:
            paragraphs.append("".join(element.itertext()))
            return
        for child in element:
            walk(child)

    walk(ET.fromstring(xml))
    return paragraphs


# ---------------------------------------------------------------------------------------------------------------
# Fortunes: plain text, entries separated by lines holding only "%". Each entry is a document; its blank-line-
# separated blocks are its paragraphs, with their line breaks kept (they are poems and dialogues).
# ---------------------------------------------------------------------------------------------------------------

def fortune_entries(text: str) -> list[list[str]]:
    """Each fortune of one fortune file, as its list of paragraphs."""
    entries = re.split(r"^%+[ \t]*$", text, flags=re.MULTILINE)
    return [re.split(r"\n[ \t]*\n", e.strip("\n")) for e in entries if e.strip()]


# ---------------------------------------------------------------------------------------------------------------
# From unpacked packages to documents.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RawDocument:
    id: str                  # "<package>:<path inside the package's text folder>", unique and stable
    source: str              # the Debian package
    paragraphs: list[str]
    keep_lines: bool = False  # keep line breaks inside paragraphs (fortunes); else reflow to single spaces


def _read_utf8(path: Path, data: bytes | None = None) -> str:
    data = path.read_bytes() if data is None else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte offset {e.start})") from None


def raw_documents(package: str, root: Path) -> Iterator[RawDocument]:
    """The documents of one package unpacked at `root` (by `dpkg -x`), in a fixed (sorted) order."""
    def files(folder: str, pattern: str) -> list[Path]:
        # Symlinks are aliases (a man page under a second name): the target is read once, under its own name.
        base = root / folder
        return sorted(p for p in base.glob(pattern) if p.is_file() and not p.is_symlink())

    if package in ("manpages-pl", "manpages-pl-dev"):
        for path in files("usr/share/man/pl", "**/*.gz"):
            source = _read_utf8(path, gzip.decompress(path.read_bytes()))
            name = path.relative_to(root / "usr/share/man/pl").as_posix().removesuffix(".gz")
            yield RawDocument(f"{package}:{name}", package, roff_paragraphs(source))
    elif package == "libreoffice-help-pl":
        base = root / "usr/share/libreoffice/help/pl"
        for path in files("usr/share/libreoffice/help/pl", "text/**/*.html"):
            name = path.relative_to(base).as_posix()
            yield RawDocument(f"{package}:{name}", package, help_html_paragraphs(_read_utf8(path)))
    elif package == "gnome-user-docs":
        base = root / "usr/share/help/pl"
        for path in files("usr/share/help/pl", "**/*.page"):
            try:
                paragraphs = mallard_paragraphs(_read_utf8(path))
            except ET.ParseError as e:
                raise ValueError(f"{path}: malformed Mallard XML ({e})") from None
            yield RawDocument(f"{package}:{path.relative_to(base).as_posix()}", package, paragraphs)
    elif package == "fortunes-pl":
        base = root / "usr/share/games/fortunes/pl"
        # A fortune file is the one with a strfile index "<name>.dat" beside it.
        for path in files("usr/share/games/fortunes/pl", "*"):
            if path.suffix in (".dat", ".u8") or not path.with_name(path.name + ".dat").exists():
                continue
            for i, entry in enumerate(fortune_entries(_read_utf8(path))):
                yield RawDocument(f"{package}:{path.relative_to(base).as_posix()}#{i}", package, entry,
                                  keep_lines=True)
    else:
        raise ValueError(f"no extractor for package {package!r}; known: {', '.join(PACKAGES)}")


def _normalise(paragraph: str, keep_lines: bool) -> str:
    if keep_lines:
        return "\n".join(" ".join(line.split()) for line in paragraph.strip().splitlines())
    return " ".join(paragraph.split())


class Cleaner:
    """Steps 1-3 of the module docstring, remembering what it has seen across the whole corpus."""

    def __init__(self) -> None:
        self._seen_paragraphs: set[bytes] = set()
        self.dropped: Counter[str] = Counter()

    def __call__(self, doc: RawDocument) -> str | None:
        kept = []
        for paragraph in doc.paragraphs:
            paragraph = _normalise(paragraph, doc.keep_lines)
            if len(paragraph) < MIN_PARAGRAPH_CHARS:
                self.dropped["short paragraph"] += 1
            elif not is_polish(paragraph):
                self.dropped["English paragraph"] += 1
            elif (key := hashlib.sha1(paragraph.encode()).digest()) in self._seen_paragraphs:
                self.dropped["duplicate paragraph"] += 1
            else:
                self._seen_paragraphs.add(key)
                kept.append(paragraph)
        text = "\n\n".join(kept)
        if len(text) < MIN_DOCUMENT_CHARS:
            self.dropped["short document"] += 1
            return None
        return text


def split_of(doc_id: str) -> str:
    """The split a document belongs to: a hash of its id (and the corpus version, our seed), nothing else."""
    bucket = int.from_bytes(hashlib.sha256(f"{VERSION}:{doc_id}".encode()).digest()[:8], "big") % 1000
    if bucket < SPLIT_PERCENT["validation"] * 10:
        return "validation"
    if bucket < (SPLIT_PERCENT["validation"] + SPLIT_PERCENT["test"]) * 10:
        return "test"
    return "train"


def debian_licence(copyright_text: str) -> str:
    """The licence of a package's own files: the "License:" of the "Files: *" stanza of its DEP-5 copyright file."""
    for stanza in re.split(r"\n\s*\n", copyright_text):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, flags=re.MULTILINE))
        if fields.get("Files", "").strip() == "*" and fields.get("License"):
            return fields["License"].strip()
    raise ValueError("no 'Files: *' stanza with a License field (not a DEP-5 copyright file?)")


# ---------------------------------------------------------------------------------------------------------------
# Downloading and the build itself.
# ---------------------------------------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


class DownloadError(RuntimeError):
    """The Debian packages could not be downloaded (no apt, no network, no such package)."""


def download_packages(folder: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """`apt-get download` each package into `folder`; `apt-get update` first only if a download fails (the package
    lists are missing or stale on a fresh machine). Returns {package: its .deb}."""
    if shutil.which("apt-get") is None:
        raise DownloadError("apt-get not found: the Polish corpus is built from Debian packages, so it needs a "
                            "Debian or Ubuntu machine (or give your own text files instead of a corpus split)")
    result = _run(["apt-get", "download", *PACKAGES], folder)
    if result.returncode != 0:
        log(f"apt-get download failed ({result.stderr.strip().splitlines()[-1:]}); running apt-get update")
        update = _run(["apt-get", "update"], folder)
        if update.returncode != 0:
            raise DownloadError(f"apt-get update failed:\n{update.stderr.strip()[-2000:]}")
        result = _run(["apt-get", "download", *PACKAGES], folder)
        if result.returncode != 0:
            raise DownloadError(f"apt-get download {' '.join(PACKAGES)} failed in {folder}:\n"
                                f"{result.stderr.strip()[-2000:]}")
    debs = {}
    for package in PACKAGES:
        found = sorted(folder.glob(f"{package}_*.deb"))
        if not found:
            raise DownloadError(f"apt-get download reported success but left no {package}_*.deb in {folder}")
        debs[package] = found[-1]
    return debs


def _write_jsonl(path: Path, records: list[dict]) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path.stat().st_size


def build_corpus(out_dir: Path | None = None, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build the corpus into `out_dir` (default: default_corpus_dir()) unless it is already there; return out_dir."""
    out_dir = Path(out_dir) if out_dir is not None else default_corpus_dir()
    if (out_dir / "manifest.json").exists() and not force:
        return out_dir
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists but holds no manifest.json (not a corpus?); remove it or use force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Everything happens in a folder beside out_dir, so the final rename is atomic (same filesystem).
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-building-") as tmp:
        tmp = Path(tmp)
        (tmp / "debs").mkdir()
        log(f"downloading {', '.join(PACKAGES)}")
        debs = download_packages(tmp / "debs", log)

        clean = Cleaner()
        records: dict[str, list[dict]] = {split: [] for split in SPLITS}
        sources = {}
        for package, deb in debs.items():
            root = tmp / "unpacked" / package
            root.mkdir(parents=True)
            result = _run(["dpkg", "-x", str(deb), str(root)], tmp)
            if result.returncode != 0:
                raise RuntimeError(f"dpkg -x {deb} failed:\n{result.stderr.strip()[-2000:]}")
            copyright_file = root / "usr/share/doc" / package / "copyright"
            try:
                licence = debian_licence(_read_utf8(copyright_file))
            except (OSError, ValueError) as e:
                raise ValueError(f"{copyright_file}: cannot read the licence ({e})") from None
            version = _run(["dpkg-deb", "-f", str(deb), "Version"], tmp).stdout.strip()
            n_docs = n_chars = n_files = 0
            for doc in raw_documents(package, root):
                n_files += 1
                text = clean(doc)
                if text is None:
                    continue
                records[split_of(doc.id)].append({"id": doc.id, "source": package, "licence": licence, "text": text})
                n_docs += 1
                n_chars += len(text)
            sources[package] = {"version": version, "licence": licence, "documents": n_docs, "characters": n_chars}
            log(f"{package} {version} ({licence}): {n_files} documents read, {n_docs} kept, {n_chars:,} characters")
            shutil.rmtree(root)                                 # keep the temp folder small

        stage = tmp / "corpus"
        stage.mkdir()
        splits = {}
        for split in SPLITS:
            n_bytes = _write_jsonl(stage / f"{split}.jsonl", records[split])
            splits[split] = {"documents": len(records[split]),
                             "characters": sum(len(r["text"]) for r in records[split]), "bytes": n_bytes}
            log(f"{split}: {splits[split]['documents']} documents, {splits[split]['characters']:,} characters")
        log(f"dropped: {dict(clean.dropped)}")
        manifest = {
            "version": VERSION,
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sources": sources, "splits": splits, "dropped": dict(clean.dropped),
            "split_percent": SPLIT_PERCENT, "min_paragraph_chars": MIN_PARAGRAPH_CHARS,
            "min_document_chars": MIN_DOCUMENT_CHARS,
        }
        # The manifest is written last: a folder with a manifest is a complete corpus.
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _publish(stage, out_dir)
    log(f"corpus {out_dir} built in {time.monotonic() - started:.0f} s")
    return out_dir


def _publish(stage: Path, out_dir: Path) -> None:
    """Rename the finished `stage` folder to `out_dir`, replacing an old corpus there (force)."""
    if out_dir.exists():
        # Move the old corpus aside first: rename cannot replace a non-empty folder.
        old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(stage, out_dir)
        shutil.rmtree(old)
        return
    try:
        os.rename(stage, out_dir)
    except OSError:
        # Another process published the same corpus while we built ours; theirs is as good as ours.
        if not (out_dir / "manifest.json").exists():
            raise
