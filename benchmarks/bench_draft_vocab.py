"""A draft that scores only its N most frequent token ids (FR-Spec): draft latency and greedy speculative decoding.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_draft_vocab.py
    .venv/bin/python benchmarks/bench_draft_vocab.py --prompts 2 --new-tokens 16 --sizes 8192   # smoke

Pair: the embedded SmolLM2-135M-Instruct, float32 target, bfloat16 draft (``--device``, default cpu). The token
map is built first (``--map``, default ``artifacts/token_map.json``) from the GSM8K training questions and
answers and the MT-Bench texts, with the draft's tokenizer, plus the generated ``tokens`` of ``--results``
JSONL files when given (the target's own outputs: the words of its answers, which questions alone miss).
Prompts: the first turn of the first MT-Bench prompt of each category (file order), then the second of each...

Rows: ``full`` (the unrestricted draft) and each N of ``--sizes`` (``ModelDrafter(top_tokens=N)``). Columns:

- draft ms: one draft forward of one token (with the argmax), after a cache of the first prompt; the mean of
  ``--latency-repeats`` after as many warm-up calls;
- tok/call: new tokens per target forward of greedy speculative decoding with ``--k`` drafts;
- accept: accepted / drafted tokens;
- tok/s: new tokens / wall seconds over the prompts (every configuration, the baseline too, runs prompt i before
  any runs prompt i + 1, order rotated per prompt, so a noisy neighbour on the cores hits all alike);
- identical: every output equals the baseline's greedy output (it must: the draft never changes the output).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from harness import EMBEDDED, REPO_ROOT, encode_first_turns, eos_ids, find_dataset, rotated

from src.data.prompts import read_prompt_file, round_robin
from src.decoding import Baseline, DecodingMethod, SamplingConfig, SpeculativeSampling
from src.decoding.base import input_device, vocab_width
from src.decoding.drafters import ModelDrafter
from src.decoding.token_map import build_from_files
from src.errors import UserInputError
from src.models import ModelSpec, load_pair

GREEDY = SamplingConfig()


@dataclass
class Row:
    """One configuration's totals over the prompts."""

    label: str
    method: DecodingMethod
    draft_ms: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    outputs: list[list[int]] = field(default_factory=list)


def draft_latency_ms(drafter: ModelDrafter, draft, vocab: int, sequence: list[int], repeats: int) -> float:
    """Mean ms of one one-token draft forward (+ argmax) after ``sequence[:-1]`` is cached."""
    with torch.inference_mode():
        drafter.begin(draft, vocab, input_device(draft))
        drafter.propose(sequence[:-1], 1, GREEDY, None)  # encodes the prefix
        drafter.commit(len(sequence) - 1)
        times = []
        for i in range(2 * repeats):
            start = time.perf_counter()
            drafter.propose(sequence, 1, GREEDY, None).tokens.tolist()  # .tolist(): waits for a GPU
            if i >= repeats:  # the first half warms up
                times.append(time.perf_counter() - start)
            drafter.commit(len(sequence) - 1)  # back to the prefix: every call reads one new token
    return 1000 * statistics.mean(times)


def main(argv: list[str] | None = None) -> None:
    try:
        bench(argv)
    except UserInputError as error:
        sys.exit(f"error: {error}")


def bench(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5, help="MT-Bench first turns decoded per configuration")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per target call")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32768, 16384, 8192, 4096], help="N per row")
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--map", default=str(REPO_ROOT / "artifacts" / "token_map.json"), help="token map to write")
    parser.add_argument("--results", nargs="*", default=[], help="results JSONL whose tokens the map also counts")
    parser.add_argument("--gsm8k", default=None, help="GSM8K train JSONL (default: the shared datasets)")
    parser.add_argument("--mt-bench", default=None, help="MT-Bench JSONL (default: datasets/ or the shared datasets)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Step 1: the pair and the token map (the draft's tokenizer; GSM8K questions + answers, MT-Bench texts).
    gsm8k = find_dataset("gsm8k_train.jsonl", args.gsm8k, "--gsm8k")
    mt_bench = find_dataset("mt_bench.jsonl", args.mt_bench, "--mt-bench", setup=True)
    pair = load_pair(ModelSpec(EMBEDDED, dtype="float32", device=args.device),
                     ModelSpec(EMBEDDED, dtype="bfloat16", device=args.device))
    target, draft, tokenizer = pair.target.model, pair.draft.model, pair.target.tokenizer
    start = time.perf_counter()
    token_map = build_from_files(pair.draft.tokenizer, EMBEDDED, [gsm8k, mt_bench], args.results)
    token_map.save(args.map)
    print(f"token map {args.map}: {len(token_map.top_ids)} of {token_map.vocab_size} ids seen in "
          f"{token_map.counts_total} tokens ({time.perf_counter() - start:.1f} s); coverage "
          + ", ".join(f"top {n}: {token_map.coverage(n):.2%}" for n in args.sizes))

    # Step 2: prompts (chat template) and the configurations.
    prompts = round_robin(read_prompt_file(mt_bench))[: args.prompts]
    inputs = encode_first_turns(tokenizer, prompts, input_device(target))
    eos = eos_ids(draft, tokenizer)
    vocab = min(vocab_width(target), vocab_width(draft))
    rows = [Row("baseline", Baseline()), Row("full", SpeculativeSampling(args.k))]
    rows += [Row(f"N={n}", SpeculativeSampling(args.k, drafter=ModelDrafter(top_tokens=n, token_map=args.map)))
             for n in args.sizes]

    # Step 3: draft latency per row (the drafter of each speculative row, on the first prompt).
    sequence = inputs[0][0].tolist()
    for row in rows[1:]:
        row.draft_ms = draft_latency_ms(row.method.drafter, draft, vocab, sequence, args.latency_repeats)

    # Step 4: greedy decoding, every configuration on prompt i before prompt i + 1 (warm-up: prompt 0, untimed).
    def run(row: Row, input_ids: torch.Tensor, timed: bool) -> None:
        begin = time.perf_counter()
        generation = row.method.generate(target, draft, input_ids, args.new_tokens, GREEDY, eos)
        if not timed:
            return
        row.seconds += time.perf_counter() - begin
        row.tokens += len(generation.tokens)
        row.outputs.append(generation.tokens)
        stats = generation.stats
        row.target_calls += stats.target_calls
        row.drafted += stats.drafted_tokens
        row.accepted += stats.accepted_tokens

    for row in rows:
        run(row, inputs[0], timed=False)
    for i, input_ids in enumerate(inputs):
        for row in rotated(rows, i):
            run(row, input_ids, timed=True)

    # Step 5: the table.
    reference = rows[0].outputs
    categories = ", ".join(p.category for p in prompts)
    print(f"\n{len(prompts)} MT-Bench prompts ({categories}) x {args.new_tokens} new tokens, greedy, k={args.k}, "
          f"device {args.device}, {torch.get_num_threads()} threads, draft vocabulary {vocab_width(draft)}")
    print(f"{'config':<10} {'draft ms':>9} {'tok/call':>9} {'accept':>7} {'tok/s':>7} {'identical':>9}")
    for row in rows:
        draft_ms = f"{row.draft_ms:.2f}" if row.draft_ms is not None else "-"
        accept = f"{row.accepted / row.drafted:.3f}" if row.drafted else "-"
        same = sum(a == b for a, b in zip(row.outputs, reference))
        identical = "ref" if row is rows[0] else "yes" if same == len(reference) else f"no ({len(reference) - same})"
        print(f"{row.label:<10} {draft_ms:>9} {row.tokens / row.target_calls:>9.2f} {accept:>7} "
              f"{row.tokens / row.seconds:>7.2f} {identical:>9}")


if __name__ == "__main__":
    main()
