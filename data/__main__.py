"""The corpus from the command line.

    python -m data build [--out DIR] [--force]    download the Debian packages and build the Polish corpus
    python -m data stats [--dir DIR]              print a built corpus's sources, licences and sizes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.polish import SPLITS, build_corpus, default_corpus_dir


def stats(corpus: Path) -> int:
    manifest_path = corpus / "manifest.json"
    if not manifest_path.exists():
        print(f"{corpus}: no corpus built here (no manifest.json); run `python -m data build`", file=sys.stderr)
        return 1
    manifest = json.loads(manifest_path.read_text())
    print(f"{corpus}  ({manifest['version']}, built {manifest['built']})")
    print(f"{'package':<22}{'version':<24}{'licence':<14}{'documents':>10}{'characters':>13}")
    for package, s in manifest["sources"].items():
        print(f"{package:<22}{s['version']:<24}{s['licence']:<14}{s['documents']:>10,}{s['characters']:>13,}")
    print(f"{'split':<22}{'':<38}{'documents':>10}{'characters':>13}{'bytes':>13}")
    for split in SPLITS:
        s = manifest["splits"][split]
        print(f"{split:<22}{'':<38}{s['documents']:>10,}{s['characters']:>13,}{s['bytes']:>13,}")
    print("dropped while cleaning: " + ", ".join(f"{n:,} {why}" for why, n in manifest["dropped"].items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description="The Polish LAPT corpus.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="download the Debian packages and build the corpus")
    build.add_argument("--out", type=Path, default=None, help=f"corpus folder (default {default_corpus_dir()})")
    build.add_argument("--force", action="store_true", help="rebuild even if the corpus is already there")
    show = commands.add_parser("stats", help="print the built corpus's sizes, sources and licences")
    show.add_argument("--dir", type=Path, default=None, help=f"corpus folder (default {default_corpus_dir()})")
    args = parser.parse_args(argv)
    if args.command == "build":
        corpus = build_corpus(args.out, force=args.force)
        return stats(corpus)
    return stats(args.dir or default_corpus_dir())


if __name__ == "__main__":
    sys.exit(main())
