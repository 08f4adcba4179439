"""``python -m src.tools.spec_bench_export RESULTS.jsonl [MORE.jsonl ...] --out DIR [--dataset NAME]``: Spec-Bench
answer files (one per method and configuration, the baseline included) for Spec-Bench's ``evaluation/speed.py``
and ``evaluation/equal.py``. The format, the file names and what those scripts compute from them:
:mod:`src.results.spec_bench`."""

from __future__ import annotations

import sys
from pathlib import Path

from src.errors import UserInputError
from src.jsonl import UnreadableFileError
from src.results.check import OneLineArgumentParser
from src.results.spec_bench import export


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m src.tools.spec_bench_export",
                                   description="Spec-Bench answer files (for its evaluation/speed.py and "
                                               "equal.py) from results records")
    parser.add_argument("paths", nargs="+", type=Path, help="results JSONL file(s) of python -m src predict")
    parser.add_argument("--out", type=Path, required=True, help="folder for the answer files (created if needed)")
    parser.add_argument("--dataset", help="the dataset to export when the records hold several")
    args = parser.parse_args(argv)
    try:
        built, written = export(args.paths, args.out, args.dataset)
    except (UserInputError, UnreadableFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for warning in built.warnings:
        print(warning, file=sys.stderr)
    for answer_file, path in zip(built.files, written):
        print(f"{path}: {answer_file.label}, {len(answer_file.lines)} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
