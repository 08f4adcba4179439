"""Lossless methods reproduce the target's greedy output on the real embedded pair (fp32 target; bf16 and
nf4 drafts) for MT-Bench prompts at 64 new tokens: two prompts in the default suite, one per category (5) in
the slow one (bf16 one-row matmuls are slow on some CPUs: each method took ~3 min for 5 prompts there).

On a mismatch the message gives the prompt, the first divergent index and the target's top-2 logit margin
there: tree / chunked verification changes float summation order, so a near-tie (margin ~1e-5) can flip
legitimately, while a real bug shows up with a large margin.
"""

from __future__ import annotations

import pytest
import torch
from conftest import chat_input_ids

from src.decoding import Baseline, SamplingConfig
from src.decoding.specexec import SpecExec
from src.decoding.speculative import SpeculativeSampling
from src.results.records import first_divergence

NEW_TOKENS = 64
PROMPTS = 5  # the slow run; the default suite checks the first DEFAULT_PROMPTS of them
DEFAULT_PROMPTS = 2
METHODS = {
    "speculative-k4": SpeculativeSampling(k=4),
    "specexec-b16": SpecExec(budget=16, max_depth=8, max_beams=4, max_branch_width=4),
}


@pytest.fixture(scope="module")
def greedy_references(embedded_target, mt_bench_prompts):
    """``references(n)``: (prompt id, input ids, baseline tokens) for the first turn of one prompt per MT-Bench
    category, the first ``n`` categories (baselines decoded once, when first asked for)."""
    eos = {embedded_target.tokenizer.eos_token_id}
    firsts, seen = [], set()
    for prompt in mt_bench_prompts:
        if prompt.category not in seen and len(firsts) < PROMPTS:
            seen.add(prompt.category)
            firsts.append(prompt)
    cases: list[tuple] = []

    def references(n: int) -> list[tuple]:
        for prompt in firsts[len(cases):n]:
            input_ids = chat_input_ids(embedded_target.tokenizer, prompt.turns[0])
            tokens = Baseline().generate(embedded_target.model, None, input_ids, NEW_TOKENS, SamplingConfig(), eos).tokens
            cases.append((prompt.prompt_id, input_ids, tokens))
        return cases[:n]

    return references


def top2_margin(model, input_ids: torch.Tensor, tokens: list[int], index: int) -> float:
    context = torch.cat([input_ids, torch.tensor([tokens[:index]], dtype=input_ids.dtype)], dim=1)
    with torch.inference_mode():
        logits = model(context).logits[0, -1]
    top2 = torch.topk(logits.float(), 2).values
    return float(top2[0] - top2[1])


def check_greedy(method_name, draft_name, references, embedded_target, request):
    draft = request.getfixturevalue(f"embedded_draft_{draft_name}")
    method = METHODS[method_name]
    eos = {embedded_target.tokenizer.eos_token_id}
    failures = []
    for prompt_id, input_ids, expected in references:
        generation = method.generate(embedded_target.model, draft.model, input_ids, NEW_TOKENS, SamplingConfig(), eos)
        index = first_divergence(generation.tokens, expected)
        if index is not None:
            margin = top2_margin(embedded_target.model, input_ids, expected, index)
            failures.append(f"prompt {prompt_id}: first divergence at token {index}, target top-2 logit margin {margin:.2e}")
        assert generation.stats.target_calls <= len(generation.tokens)
    assert not failures, f"{method_name} with the {draft_name} draft:\n" + "\n".join(failures)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_greedy_output_equals_baseline(method_name, greedy_references, embedded_target, request):
    check_greedy(method_name, "bf16", greedy_references(DEFAULT_PROMPTS), embedded_target, request)


# The nf4 draft runs bitsandbytes' slow CPU 4-bit kernels (~2 min per method): slow-marked, run by `make test-all`.
@pytest.mark.slow
@pytest.mark.parametrize("draft_name", ["bf16", "nf4"])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_greedy_output_equals_baseline_every_category(method_name, draft_name, greedy_references, embedded_target,
                                                      request):
    check_greedy(method_name, draft_name, greedy_references(PROMPTS), embedded_target, request)
