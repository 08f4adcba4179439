"""Our baseline decode vs transformers' ``model.generate(do_sample=False)`` on the same prompts, interleaved.

    python benchmarks/bench_baseline_vs_hf.py --prompts 5 --new-tokens 64

Prints load times of the embedded model and tokens/s of both decoders, and whether their tokens agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from src.data.prompts import encode_messages, read_prompt_file
from src.decoding import Baseline, SamplingConfig
from src.models import ModelSpec, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data", default="datasets/mt_bench.jsonl")
    args = parser.parse_args()

    started = time.perf_counter()
    loaded = load_model(ModelSpec(device="cpu"))
    print(f"load (cached after the first conversion): {time.perf_counter() - started:.2f} s")
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = {tokenizer.eos_token_id}
    totals = {"ours": [0, 0.0], "hf": [0, 0.0]}
    agree = 0
    prompts = read_prompt_file(args.data)[: args.prompts]
    for prompt in prompts:
        input_ids = encode_messages(tokenizer, [{"role": "user", "content": prompt.turns[0]}], True)
        t0 = time.perf_counter()
        ours = Baseline().generate(model, None, input_ids, args.new_tokens, SamplingConfig(), eos).tokens
        t1 = time.perf_counter()
        with torch.inference_mode():
            hf = model.generate(input_ids, max_new_tokens=args.new_tokens, do_sample=False)[0, input_ids.shape[1]:].tolist()
        t2 = time.perf_counter()
        totals["ours"][0] += len(ours)
        totals["ours"][1] += t1 - t0
        totals["hf"][0] += len(hf)
        totals["hf"][1] += t2 - t1
        agree += ours == hf
    for name, (tokens, seconds) in totals.items():
        print(f"{name:>5}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s")
    print(f"identical outputs: {agree}/{len(prompts)}")


if __name__ == "__main__":
    main()
