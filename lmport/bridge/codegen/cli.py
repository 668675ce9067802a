"""`lmport codegen --lang elixir|node|go [--out DIR] [--check] [--manifest FILE]`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from lmport.bridge.codegen.common import LANGUAGES, REPO_ROOT, load_manifest, stale_files, write_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lang", required=True, choices=sorted(LANGUAGES), help="client language to generate")
    parser.add_argument("--out", type=Path, default=None,
                        help="client root to write into (default: the repository's clients/<lang>)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the committed generated files are not current")
    parser.add_argument("--manifest", default=None,
                        help="read the manifest from this JSON file (`-` = stdin, e.g. a saved `describe` "
                             "result) instead of building it in-process")


def generate(lang: str, manifest: dict) -> dict[str, str]:
    """Runs one language's generator (see the contract in lmport/bridge/codegen/common.py)."""
    return importlib.import_module(LANGUAGES[lang].module).generate(manifest)


def run(args: argparse.Namespace) -> int:
    out_dir = args.out if args.out is not None else REPO_ROOT / LANGUAGES[args.lang].client_dir
    files = generate(args.lang, load_manifest(args.manifest))
    if args.check:
        problems = stale_files(out_dir, files)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"generated {args.lang} code is stale; run: lmport codegen --lang {args.lang}", file=sys.stderr)
            return 1
        print(f"{args.lang}: {len(files)} generated files are current")
        return 0
    written = write_files(out_dir, files)
    print(f"{args.lang}: {len(files)} files in {out_dir} ({len(written)} changed)")
    return 0
