"""Command line: ``python -m src.report`` (a thin entry point) runs :func:`main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.jsonl import UnreadableFileError
from src.results.check import OneLineArgumentParser
from src.results.report import __doc__ as report_doc
from src.results.report.reading import read_results
from src.results.report.render import build_report, write_outputs
from src.results.report.sections import duplicate_warning, make_section, pooled_prompts_warning


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} should be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m src.report", description=report_doc.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="results JSONL file(s)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md, report.html and PNGs")
    parser.add_argument("--compare", action="store_true", help="two files: report each and their B/A ratios")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--bootstrap", type=_positive_int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--merge-configs", action="store_true",
                        help="pool the records of a method whose settings differ into one row (default: one "
                             "row per configuration, labelled 'method #n')")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> str | None:
    for path in args.paths:
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            return (f"results file {path} {what}: run `make predict` (writes datasets/results.jsonl) or pass "
                    f"the path of an existing results JSONL")
    if args.compare and len(args.paths) != 2:
        return f"--compare needs exactly two results files (A B), got {len(args.paths)}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_inputs(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        loaded = [read_results(path) for path in args.paths]
    except UnreadableFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not any(one.records for one in loaded):
        print("warning: no usable record in the input; the report only counts malformed lines", file=sys.stderr)
    groups = [[one] for one in loaded] if args.compare else [loaded]  # duplicates count within a side only
    sections = [make_section(group, args.merge_configs) for group in groups]
    for warning in filter(None, [check(section) for section in sections
                                 for check in (duplicate_warning, pooled_prompts_warning)]):
        print(warning, file=sys.stderr)
    blocks = build_report(sections, args.compare, args.seed, args.bootstrap)
    try:
        written = write_outputs(blocks, args.out)
    except OSError as error:
        print(f"error: cannot write the report to {args.out} ({error.strerror}): choose another --out",
              file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
