"""Our decoding methods vs transformers' ``generate`` on the same pair and prompts, interleaved, in one table.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_vs_hf.py --prompts 10 --max-new-tokens 64
    .venv/bin/python benchmarks/bench_vs_hf.py --prompts 1 --max-new-tokens 8 --ks 2 --specexec 8x4   # smoke
    .venv/bin/python benchmarks/bench_vs_hf.py --device cuda --draft nf4 --repeat 3 --json out/vs_hf.json
    # one draft per precision, all rows interleaved in one pass (+ a draft cost and agreement line per draft)
    .venv/bin/python benchmarks/bench_vs_hf.py --draft bf16 fp32 int8 int4 --ks 2 4 --specexec 16x8 \
        --json out/vs_hf_drafts.json
    # prompt lookup on Spec-Bench's copy-heavy tasks (no --ks / --assist / --specexec rows: no draft loaded)
    .venv/bin/python benchmarks/bench_vs_hf.py --ks --specexec --lookup 10:3 5:3 --lookup-tree 32:10:3 \
        --data ../shared/datasets/spec_bench.jsonl --categories summarization rag --max-new-tokens 128

Pair: the embedded SmolLM2-135M-Instruct, float32 target; the draft is the same model's weights in bfloat16
(``--draft bf16``, the default), float32 (``fp32``: the target's own copy, agreement 1), torchao weight-only int8
or int4 with bfloat16 compute (``int8`` / ``int4``: ``quantization: torchao-int8`` / ``torchao-int4``, see
``src.models.quantize``), torch's fused int8 CPU kernel (``torch-int8``) or bitsandbytes NF4 (``nf4``), loaded only when a draft-model row (``--ks``,
``--assist``, ``--specexec``) is requested: ``--ks --specexec`` with no values and no ``--assist`` load none.
Several kinds (``--draft bf16 int8 int4``) are each loaded once at the start, and every draft-model row is built
once per kind, ours and HF assisted given the same draft model; those rows' params end with ``draft=KIND`` (only
when several kinds are given: a one-draft run's rows, table and JSON keep their labels), and they interleave
with all other rows as below.
All configurations decode greedily the same first turns with the same ``--max-new-tokens``: from MT-Bench by
default, or from ``--data FILE`` (MT-Bench format, e.g. ``../shared/datasets/spec_bench.jsonl``), restricted
to ``--categories`` when given (an unknown one is refused, naming those available); one prompt per category
first, in file order, then a second of each, ...: ``--prompts N``. Long prompts (Spec-Bench summarization and
rag: ~200-1600 tokens) are fine as long as prompt + new tokens fit the target's positions (checked up front):

- ``ours baseline``    vs ``HF generate`` = ``target.generate(input_ids, do_sample=False, max_new_tokens=N)``;
- ``ours speculative`` vs ``HF assisted``, for each k in ``--ks``: HF assisted generation with the same draft
  and a constant schedule of k draft tokens. transformers 5.x ignores the ``num_assistant_tokens*`` /
  ``assistant_confidence_threshold`` keywords of ``generate``, so they are set on ``draft.generation_config``
  for the call (and restored afterwards);
- ``--assist K:THRESHOLD[:heuristic]``: adaptive drafting, ours vs HF with the same settings: chains of at
  most K tokens that stop once the draft's probability of its token is below THRESHOLD, and with ``heuristic``
  HF's schedule (+2 after a fully accepted chain, else -1; reset per generation). HF's own defaults are
  ``20:0.4`` (note: HF also retunes the threshold during a generation when scikit-learn is installed; ours
  stays fixed);
- ``ours specexec``, for each ``BUDGETxMAX_DEPTH`` in ``--specexec`` (other parameters: SpecExec's defaults
  unless ``--max-beams`` / ``--max-branch-width`` / ``--prune-threshold`` set them);
- ``ours prompt lookup`` vs ``HF prompt lookup``, for each ``N:G`` in ``--lookup`` (none by default):
  speculative sampling with ``PromptLookup(max_ngram=G, min_ngram=--min-ngram)`` proposing up to N tokens
  (those after the earliest earlier occurrence of the longest suffix n-gram, n from G down) vs
  ``target.generate(..., prompt_lookup_num_tokens=N, max_matching_ngram_size=G)``, which selects HF's
  PromptLookupCandidateGenerator. Neither has a draft model. HF's shortest n-gram is always 1, so ours/HF is
  like-for-like only at ``--min-ngram 1`` (the default; other values show in our row's params);
- ``ours lookup tree``, for each ``B:N:G`` in ``--lookup-tree``: SpecExec with budget B and max_depth N over
  the ``--lookup-branches`` (default 4) distinct looked-up continuations of the longest matching n-gram
  (n <= G, down to ``--min-ngram``) as sibling branches, verified in one target forward; no HF counterpart.

A row whose method proposes nothing at a step (a lookup finds no match) makes that step a plain target step,
so tok/call is never below 1.

Protocol: one process; every configuration runs once untimed on the first prompt (warm-up); then each pass
runs prompt i on every configuration (order rotated per prompt) before any configuration runs prompt i + 1.
``--repeat R`` runs R passes and reports each figure as the mean over passes with the min-max spread.

Columns:

- tok/s: new tokens / wall seconds, summed over the prompts of a pass;
- tok/call: new tokens per target forward; draft/call: draft forwards per target forward. Both count forwards
  with the library's time split (``src.decoding.timing.TimeSplit``) hooked on the target and on the draft side
  (the row's draft model, a row's EAGLE head), for our methods and HF alike (a prefill is one forward). Lookup
  rows show draft/call 0: they have no draft side (our lookup methods are never handed a draft);
- ours/HF: tok/s of our row / tok/s of its HF counterpart in the same pass (baseline vs generate, speculative
  k vs assisted k, prompt lookup N:G vs HF prompt lookup N:G);
- identical: every prompt's output equals the target's greedy output (the ``HF generate`` row, marked ``ref``)
  up to and including the first EOS of the generation config; else ``no (d/P)`` with d prompts differing;
- overhead: for our methods, 1 - (seconds inside target and draft forwards) / (prefill_s + decode_s);
- peak RSS: the process's maximum resident set size (``ru_maxrss``) after the configuration's last run; it
  only grows, so it mostly tells how much memory the whole benchmark needed. With ``--device cuda`` a column
  adds the peak CUDA memory allocated during the configuration's runs.

Above the table: the machine, the data (file, categories, prompt lengths in tokens), the mean latency of one
target forward of 1, 32 and 64 tokens after the first prompt (to relate tok/s to the cost of a target call),
one "draft cost" line per draft kind, and the resident memory after the warm-up and after each pass (it must
not grow from pass to pass: every generation frees its caches). A draft cost line gives the draft's 1-token
forward after the first prompt (timed like the target's, before the warm-up) as a share of the target's, its ms
per proposed token (a drafted chain of 8, median over the prompts) and its greedy agreement with the target:
after the passes, one teacher-forced forward of the draft over each prompt + the ``HF generate`` output of the
first pass (up to its EOS), the share of positions where the draft's argmax is the target's token
(``src.lit.auto.agreement_along``, what ``quantization: auto`` measures). ``--json PATH`` writes all of it, with
per-pass figures and ``draft_cost`` (per kind: ``forward_ms``, ``target_forward_ms``, ``step_ms``,
``agreement``, ``agreed_tokens``, ``tokens``); ``run.draft`` is the kind of a one-draft run (a string, as
before), the list of kinds of several, null when none was loaded; ``models.drafts`` describes each of several;
its ``machine`` is ``src.lit.system.system_info`` (as in every result record) with the cores and the load
average.

Code: this file sets up (models, prompts) and runs the passes; ``vs_hf_options.py`` parses the command line,
``vs_hf_rows.py`` builds the rows, ``vs_hf_report.py`` turns the records into figures and prints them, and
``harness.py`` holds what the benchmark scripts share (one timed run, machine facts, datasets, prompts).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from harness import (
    EMBEDDED,
    Models,
    Record,
    encode_first_turns,
    eos_ids,
    find_dataset,
    load_models,
    machine_info,
    resident_mb,
    rotated,
    timed_run,
)
from vs_hf_options import DRAFT_KINDS, parse_args
from vs_hf_report import LATENCY_REPEATS, LATENCY_SIZES, build_rows, cut_at_eos, print_report, write_json
from vs_hf_rows import REFERENCE, Config, build_configs, eagle_draft_cost

from src.data.prompts import Prompt, read_prompt_file, round_robin
from src.decoding.profile import forward_latency
from src.errors import InvalidParameterError, UserInputError
from src.lit.auto import CalibrationPrompt, agreement_along, draft_step_ms
from src.models import ModelSpec

# ------------------------------------------------------------------------------------------------ setup


def draft_spec(kind: str, device: str) -> ModelSpec:
    """The draft ``--draft KIND`` names: a copy of the target's own weights in another precision."""
    if kind in ("bf16", "fp32"):
        return ModelSpec(name_or_path=EMBEDDED, dtype="bfloat16" if kind == "bf16" else "float32", device=device)
    if kind in ("int8", "int4"):  # torchao weight-only (src.models.quantize), bf16 compute
        return ModelSpec(name_or_path=EMBEDDED, dtype="bfloat16", device=device, quantization=f"torchao-{kind}")
    if kind == "torch-int8":  # torch's fused int8 CPU kernel (src.models.quantize.Int8PackedLinear), bf16 compute
        return ModelSpec(name_or_path=EMBEDDED, dtype="bfloat16", device=device, quantization="torch-int8")
    if kind == "nf4":
        return ModelSpec(
            name_or_path=EMBEDDED, dtype="float32", device=device, quantization="bnb-4bit",
            bnb_4bit_quant_type="nf4", bnb_compute_dtype="float32",
        )
    raise InvalidParameterError(f"--draft {kind!r} is unknown: use {', '.join(DRAFT_KINDS)}")


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"--device cuda: torch {torch.__version__} sees no CUDA device (use --device cpu)")


def needs_draft_model(args: argparse.Namespace) -> bool:
    """Only the draft-model rows do: lookup rows and the references run on the target alone."""
    return bool(args.ks or args.assist or args.specexec)


def bench_models(args: argparse.Namespace) -> Models:
    """The target and, when some configuration needs one, each ``--draft`` (else none is loaded: time and
    memory), each loaded once."""
    target = ModelSpec(name_or_path=EMBEDDED, dtype=args.target_dtype, device=args.device)
    kinds = args.draft if needs_draft_model(args) else []
    return load_models(target, {kind: draft_spec(kind, args.device) for kind in kinds})


def keep_categories(prompts: list[Prompt], categories: list[str] | None, source: Path) -> list[Prompt]:
    """The prompts of ``categories`` (all when None); an unknown category is refused, naming those present."""
    if categories is None:
        return prompts
    available = list(dict.fromkeys(prompt.category for prompt in prompts))  # file order
    unknown = [category for category in categories if category not in available]
    if unknown:
        raise InvalidParameterError(
            f"--categories {' '.join(unknown)}: {source} has no such category; "
            f"available: {', '.join(available)}"
        )
    return [prompt for prompt in prompts if prompt.category in categories]


def pick_prompts(prompts: list[Prompt], count: int, source: Path) -> list[Prompt]:
    """The first prompt of each category (file order), then the second of each, ...; the first ``count``."""
    ranked = round_robin(prompts)
    if count > len(ranked):
        categories = dict.fromkeys(prompt.category for prompt in prompts)
        raise InvalidParameterError(f"--prompts {count}: {source} holds only {len(ranked)} prompts (of the "
                                    f"categories taken: {', '.join(categories)})")
    return ranked[:count]


def select_prompts(args: argparse.Namespace) -> tuple[list[Prompt], Path]:
    """Read and pick the prompts before any model loads: bad --data / --categories / --prompts fail first."""
    source = find_dataset("mt_bench.jsonl", args.data, "--data", setup=True)
    prompts = keep_categories(read_prompt_file(source), args.categories, source)
    return pick_prompts(prompts, args.prompts, source), source


def encode_prompts(models: Models, prompts: list[Prompt], max_new_tokens: int) -> list[torch.Tensor]:
    inputs = encode_first_turns(models.tokenizer, prompts, models.device)
    check_context(models, prompts, inputs, max_new_tokens)
    return inputs


def check_context(
    models: Models, prompts: list[Prompt], inputs: list[torch.Tensor], max_new_tokens: int
) -> None:
    """Long prompts (Spec-Bench summarization / rag: up to ~1600 tokens) plus the new tokens must fit the
    target's positions; past them a model may silently degrade instead of failing, and every row would then
    compare garbage."""
    limit = getattr(models.target.config, "max_position_embeddings", None)
    for prompt, input_ids in zip(prompts, inputs):
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise InvalidParameterError(
                f"prompt {prompt.prompt_id} ({prompt.category}) has {input_ids.shape[1]} tokens: with "
                f"--max-new-tokens {max_new_tokens} it exceeds the target's {limit} positions "
                "(fewer new tokens, or other --categories)"
            )


# ------------------------------------------------------------------------------------------------ runs


def run_config(config: Config, input_ids: torch.Tensor, models: Models) -> Record:
    """One run of ``config``, the library's TimeSplit hooked on the target and on the draft side: the row's draft
    model and its EAGLE head (a head row has no draft model; one row runs at a time)."""
    drafts = [module for module in (config.draft, config.head) if module is not None]
    return timed_run(config.run, input_ids, models.device, models.target, drafts)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(configs: list[Config], input_ids: torch.Tensor, models: Models) -> None:
    for config in configs:
        run_config(config, input_ids, models)
    free_memory(models.device)


def run_pass(configs: list[Config], inputs: list[torch.Tensor], models: Models, index: int) -> dict:
    """Prompt i on every configuration (order rotated per prompt) before prompt i + 1: {key: [Record per prompt]}."""
    records: dict[str, list[Record]] = {config.key: [] for config in configs}
    for position, input_ids in enumerate(inputs):
        for config in rotated(configs, index * len(inputs) + position):
            records[config.key].append(run_config(config, input_ids, models))
        free_memory(models.device)
        print(f"  pass {index + 1} prompt {position + 1}/{len(inputs)} done", file=sys.stderr, flush=True)
    return records


# ------------------------------------------------------------------------------------------------ draft cost


def draft_forward_ms(models: Models, context: torch.Tensor) -> dict[str, float]:
    """Each draft's ms for one 1-token forward after ``context`` (the first prompt): the code path, context and
    repeats of the target's latency above the table."""
    return {kind: forward_latency(draft, context, (1,), LATENCY_REPEATS)[1] for kind, draft in models.drafts.items()}


def draft_costs(models: Models, inputs: list[torch.Tensor], references: list[list[int]],
                forward_ms: dict[str, float], target_ms: float) -> dict[str, dict[str, Any]]:
    """Per draft: its 1-token forward (``forward_ms``) against the target's (``target_ms``), its ms per proposed token (median over
    the prompts) and its greedy agreement with the target along ``references``, the bench's own greedy outputs:
    :func:`src.lit.auto.agreement_along` per prompt (one teacher-forced forward over prompt + output, argmax ==
    the target's token at every position) and :func:`src.lit.auto.draft_step_ms` (a drafted chain of 8 after half
    the output, timed)."""
    costs = {}
    for kind, draft in models.drafts.items():
        prompts = [CalibrationPrompt(input_ids, tokens) for input_ids, tokens in zip(inputs, references)]
        agreement = [agrees for prompt in prompts for agrees in agreement_along(draft, models.target, prompt)]
        step_ms = [draft_step_ms(draft, models.target, prompt) for prompt in prompts]
        costs[kind] = {
            "forward_ms": forward_ms[kind],
            "target_forward_ms": target_ms,
            "step_ms": statistics.median(step_ms),
            "agreement": sum(agreement) / len(agreement),
            "agreed_tokens": sum(agreement),
            "tokens": len(agreement),
        }
    return costs


# ------------------------------------------------------------------------------------------------ main


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, source = select_prompts(args)
    machine = machine_info(torch.device(args.device))
    models = bench_models(args)
    eos = eos_ids(models.target, models.tokenizer)
    inputs = encode_prompts(models, prompts, args.max_new_tokens)
    with torch.inference_mode():
        latency = forward_latency(models.target, inputs[0], LATENCY_SIZES, LATENCY_REPEATS)
        draft_ms = draft_forward_ms(models, inputs[0])
        configs = build_configs(args, models, eos)
        head_ms = eagle_draft_cost(args, models, inputs[0])
        warm_up(configs, inputs[0], models)
        resident = [resident_mb()]  # after the warm-up, then after each pass: caches must not pile up
        passes = []
        for index in range(args.repeat):
            passes.append(run_pass(configs, inputs, models, index))
            resident.append(resident_mb())
        references = [cut_at_eos(record.tokens, eos) for record in passes[0][REFERENCE]]
        drafts = draft_costs(models, inputs, references, draft_ms, latency[1])
    return {
        "machine": machine,
        "models": models.info,
        "run": {
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "repeat": args.repeat,
            "draft": draft_kinds(models), "device": args.device,
            "eos_token_ids": sorted(eos), "data": str(source),
            "categories": list(dict.fromkeys(p.category for p in prompts)),  # file order
            "prompt_tokens": [input_ids.shape[1] for input_ids in inputs], "min_ngram": args.min_ngram,
        },
        "target_forward_ms": latency,
        "eagle_draft_ms_per_token": head_ms,
        "draft_cost": drafts,
        "resident_mb": resident,
        "rows": build_rows(configs, passes, eos),
    }


def draft_kinds(models: Models) -> list[str] | str | None:
    """``run.draft`` of the JSON: the kind of the one draft (as before several could be given), the list of several,
    None when no row needed one."""
    kinds = list(models.drafts)
    return kinds[0] if len(kinds) == 1 else kinds or None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = benchmark(args)
    except UserInputError as error:
        sys.exit(f"error: {error}")
    print_report(report)
    if args.json is not None:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
