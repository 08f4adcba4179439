"""``bench_vs_hf.py``'s command line: the options and the parsers of their values (a bad value is refused by
name, before any model loads). See ``bench_vs_hf.py`` for what each row runs."""

from __future__ import annotations

import argparse
from pathlib import Path

DRAFT_KINDS = ("bf16", "fp32", "int8", "int4", "torch-int8", "nf4")  # bench_vs_hf.draft_spec builds each


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def specexec_shape(text: str) -> tuple[int, int]:
    """``"32x16"`` -> (budget 32, max_depth 16)."""
    budget, separator, depth = text.lower().partition("x")
    try:
        shape = (int(budget), int(depth))
    except ValueError:
        shape = (0, 0)
    if not separator or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BUDGETxMAX_DEPTH with two positive integers (e.g. 32x16)"
        )
    return shape


def assist_setting(text: str) -> tuple[int, float, str]:
    """``"20:0.4"`` -> (k 20, threshold 0.4, constant schedule); ``"4:0:heuristic"`` -> heuristic schedule."""
    parts = text.split(":")
    try:
        k, threshold = int(parts[0]), float(parts[1])
        schedule = parts[2] if len(parts) > 2 else "constant"
    except (ValueError, IndexError):
        k, threshold, schedule = 0, 0.0, ""
    if len(parts) > 3 or k < 1 or not 0 <= threshold < 1 or schedule not in ("constant", "heuristic"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not K:THRESHOLD[:heuristic] with K >= 1 and THRESHOLD in [0, 1) (e.g. 20:0.4)"
        )
    return k, threshold, schedule


def positive_ints(text: str, names: str, example: str) -> tuple[int, ...]:
    """``"10:3"`` -> (10, 3) when ``names`` (``"N:G"``) has as many fields, all positive integers."""
    parts = text.split(":")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != len(names.split(":")) or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {names} with {len(names.split(':'))} positive integers (e.g. {example})"
        )
    return values


def lookup_setting(text: str) -> tuple[int, int, int | None]:
    """``"10:3"`` -> (k 10 looked-up tokens per call, max_ngram 3, min_ngram None = --min-ngram);
    ``"5:3:2"`` -> the same with min_ngram 2 for this row."""
    if text.count(":") == 2:
        return positive_ints(text, "N:G:M", "5:3:2")
    return (*positive_ints(text, "N:G", "10:3"), None)


def lookup_tree_setting(text: str) -> tuple[int, int, int]:
    """``"32:10:3"`` -> (budget 32, max_depth 10, max_ngram 3)."""
    return positive_ints(text, "B:N:G", "32:10:3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Our baseline / speculative / SpecExec vs HF generate / assisted generation, interleaved.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompts", type=positive_int, default=10, help="MT-Bench first turns to decode")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--ks", type=positive_int, nargs="*", default=[2, 4, 6, 8],
                        help="draft lengths k of speculative sampling and HF assisted generation (none: skip)")
    parser.add_argument("--assist", type=assist_setting, nargs="*", default=[], metavar="K:THRESHOLD[:heuristic]",
                        help="adaptive drafting rows: ours speculative with k, confidence_threshold (and the heuristic"
                        " schedule) vs HF assisted with the same settings, e.g. 20:0.4 (HF's defaults) 4:0:heuristic")
    parser.add_argument("--specexec", type=specexec_shape, nargs="*", default=[(16, 8), (32, 16), (64, 16)],
                        metavar="BUDGETxMAX_DEPTH", help="SpecExec configurations (none: skip)")
    parser.add_argument("--lookup", type=lookup_setting, nargs="*", default=[], metavar="N:G[:M]",
                        help="prompt lookup rows: ours speculative with PromptLookup (up to N tokens after"
                        " the earliest match of the longest suffix n-gram, M <= n <= G; M defaults to --min-ngram)"
                        " vs HF prompt_lookup_num_tokens=N, max_matching_ngram_size=G, e.g. 10:3 5:3:2 (no draft"
                        " model; ours/HF only where M is 1, HF's own shortest n-gram)")
    parser.add_argument("--lookup-tree", type=lookup_tree_setting, nargs="*", default=[], metavar="B:N:G",
                        help="ours SpecExec over looked-up branches: budget B, max_depth N, max_ngram G,"
                        " e.g. 32:10:3 (no HF counterpart, no draft model)")
    parser.add_argument("--lookup-branches", type=positive_int, default=4,
                        help="--lookup-tree: distinct looked-up continuations verified as sibling branches")
    parser.add_argument("--min-ngram", type=positive_int, default=1,
                        help="our lookup rows' shortest n-gram (HF's is always 1: ours/HF is like-for-like"
                        " only at 1)")
    parser.add_argument("--eagle", nargs="*", default=[], metavar="HEAD:K",
                        help="EAGLE rows: ours speculative with EagleDrafter(HEAD) drafting K tokens per target call,"
                        " e.g. artifacts/eagle/head:4 (no draft model; HEAD as given to head_path)")
    parser.add_argument("--eagle-tree", nargs="*", default=[], metavar="HEAD:BUDGET:DEPTH",
                        help="EAGLE tree rows: ours SpecExec growing its tree with EagleDrafter(HEAD), e.g."
                        " artifacts/eagle/head:16:6 (SpecExec's growth defaults; --max-beams etc. apply)")
    parser.add_argument("--max-beams", type=positive_int, default=None, help="SpecExec max_beams (its default)")
    parser.add_argument("--max-branch-width", type=positive_int, default=None,
                        help="SpecExec max_branch_width (its default)")
    parser.add_argument("--prune-threshold", type=float, default=None,
                        help="SpecExec prune_threshold (its default)")
    parser.add_argument("--draft", choices=DRAFT_KINDS, nargs="+", default=["bf16"], metavar="KIND",
                        help=f"drafts (one of {', '.join(DRAFT_KINDS)} or several): copies of the target in bf16, fp32,"
                        " torchao int8 / int4 weight-only (bf16 compute), torch's int8 CPU kernel or bitsandbytes NF4; every draft-model row"
                        " runs once per draft, labelled draft=KIND when several are given")
    parser.add_argument("--target-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the target's dtype (a GPU run may use bfloat16 with --draft nf4)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeat", type=positive_int, default=1, help="interleaved passes over all prompts")
    parser.add_argument("--data", type=Path, default=None,
                        help="prompts JSONL in MT-Bench format, e.g. ../shared/datasets/spec_bench.jsonl"
                        " (default: datasets/ or ../shared/datasets/mt_bench.jsonl)")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT",
                        help="take prompts only from these categories of --data (default: all)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    args.draft = list(dict.fromkeys(args.draft))  # one row set per kind, in the order given
    check_min_ngram(parser, args)
    return args


def check_min_ngram(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any model loads, a --min-ngram that a lookup row's G cannot reach."""
    rows = [(f"--lookup {k}:{g}", g, m) for k, g, m in args.lookup]
    rows += [(f"--lookup-tree {b}:{d}:{g}", g, None) for b, d, g in args.lookup_tree]
    for option, max_ngram, min_ngram in rows:
        if min_ngram is not None and min_ngram > max_ngram:
            parser.error(f"M={min_ngram} is above G={max_ngram} in {option}:{min_ngram}: use M <= G")
        if min_ngram is None and args.min_ngram > max_ngram:
            parser.error(
                f"--min-ngram {args.min_ngram} is above G={max_ngram} of {option}: use G >= --min-ngram"
            )
