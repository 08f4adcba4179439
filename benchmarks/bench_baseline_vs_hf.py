"""Our baseline decode vs transformers' ``model.generate(do_sample=False)`` on the same prompts, interleaved.

    python benchmarks/bench_baseline_vs_hf.py --prompts 5 --new-tokens 64

A shortcut for ``bench_vs_hf.py`` with only its ``ours baseline`` and ``HF generate`` rows (no draft is
loaded); any other ``bench_vs_hf.py`` option (``--device``, ``--threads``, ``--repeat``, ``--json``) passes
through. See ``benchmarks/bench_vs_hf.py`` for the protocol and the columns.
"""

from __future__ import annotations

import argparse

from bench_vs_hf import main as bench_vs_hf_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data", default=None, help="MT-Bench JSONL (default: bench_vs_hf.py's search)")
    args, passthrough = parser.parse_known_args()
    argv = ["--prompts", str(args.prompts), "--max-new-tokens", str(args.new_tokens), "--ks", "--specexec"]
    if args.data is not None:
        argv += ["--data", args.data]
    bench_vs_hf_main(argv + passthrough)


if __name__ == "__main__":
    main()
