"""Our decoding methods vs transformers' ``generate`` on the same pair and prompts, interleaved, in one table.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_vs_hf.py --prompts 10 --max-new-tokens 64
    .venv/bin/python benchmarks/bench_vs_hf.py --prompts 1 --max-new-tokens 8 --ks 2 --specexec 8x4   # smoke
    .venv/bin/python benchmarks/bench_vs_hf.py --device cuda --draft nf4 --repeat 3 --json out/vs_hf.json
    # prompt lookup on Spec-Bench's copy-heavy tasks (no --ks / --assist / --specexec rows: no draft loaded)
    .venv/bin/python benchmarks/bench_vs_hf.py --ks --specexec --lookup 10:3 5:3 --lookup-tree 32:10:3 \
        --data ../shared/datasets/spec_bench.jsonl --categories summarization rag --max-new-tokens 128

Pair: the embedded SmolLM2-135M-Instruct, float32 target; the draft is the same model in bfloat16
(``--draft bf16``) or bitsandbytes NF4 (``--draft nf4``), loaded only when a draft-model row (``--ks``,
``--assist``, ``--specexec``) is requested: ``--ks --specexec`` with no values and no ``--assist`` load none.
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
  with hooks on the two models, for our methods and HF alike (a prefill is one forward). Lookup rows show
  draft/call 0: the hooks saw no draft forward (our lookup methods are never handed the draft);
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
and the resident memory after the warm-up and after each pass (it must not grow from pass to pass: every
generation frees its caches). ``--json PATH`` writes all of it, with per-pass figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.data.prompts import Prompt, encode_messages, read_prompt_file, round_robin
from src.decoding import Baseline, DecodingMethod, SamplingConfig, SpecExec, SpeculativeSampling
from src.decoding.base import input_device
from src.decoding.drafters import PromptLookup
from src.decoding.eagle import EagleDrafter
from src.decoding.profile import drafter_step_ms, forward_latency
from src.decoding.stats import synchronize
from src.errors import InvalidParameterError, MissingInputError, UserInputError
from src.models import ModelSpec, load_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_CANDIDATES = (
    REPO_ROOT / "datasets" / "mt_bench.jsonl",
    REPO_ROOT.parent / "shared" / "datasets" / "mt_bench.jsonl",
)
EMBEDDED = "embedded:smollm2-135m-instruct"
LATENCY_SIZES = (1, 32, 64)
LATENCY_REPEATS = 5
REFERENCE = "HF generate"
ASSISTANT_SCHEDULE = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


# ------------------------------------------------------------------------------------------------ CLI


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
    parser.add_argument("--draft", choices=["bf16", "nf4"], default="bf16", help="draft: the target in bf16 or NF4")
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


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Models:
    target: Any
    draft: Any | None
    tokenizer: Any
    info: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return input_device(self.target)


def draft_spec(kind: str, device: str) -> ModelSpec:
    if kind == "bf16":
        return ModelSpec(name_or_path=EMBEDDED, dtype="bfloat16", device=device)
    if kind == "nf4":
        return ModelSpec(
            name_or_path=EMBEDDED, dtype="float32", device=device, quantization="bnb-4bit",
            bnb_4bit_quant_type="nf4", bnb_compute_dtype="float32",
        )
    raise InvalidParameterError(f"--draft {kind!r} is unknown: use bf16 or nf4")


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"--device cuda: torch {torch.__version__} sees no CUDA device (use --device cpu)")


def needs_draft_model(args: argparse.Namespace) -> bool:
    """Only the draft-model rows do: lookup rows and the references run on the target alone."""
    return bool(args.ks or args.assist or args.specexec)


def load_models(args: argparse.Namespace) -> Models:
    """The target and, when some configuration needs it, the draft (else none is loaded: time and memory)."""
    started = time.perf_counter()
    pair = load_pair(
        ModelSpec(name_or_path=EMBEDDED, dtype=args.target_dtype, device=args.device),
        draft_spec(args.draft, args.device) if needs_draft_model(args) else None,
    )
    info = {**pair.describe(), "load_s": round(time.perf_counter() - started, 2)}
    draft = pair.draft.model if pair.draft is not None else None
    return Models(target=pair.target.model, draft=draft, tokenizer=pair.tokenizer, info=info)


def eos_ids(models: Models) -> set[int]:
    """The generation config's EOS ids (what HF ``generate`` stops on); the tokenizer's when it has none."""
    config_eos = models.target.generation_config.eos_token_id
    ids = {config_eos} if isinstance(config_eos, int) else set(config_eos or [])
    if not ids and models.tokenizer.eos_token_id is not None:
        ids = {models.tokenizer.eos_token_id}
    return {int(i) for i in ids}


def dataset_path(given: Path | None) -> Path:
    if given is not None:
        return given  # read_prompt_file names it if it is missing
    for candidate in DATASET_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise MissingInputError(
        f"no MT-Bench file at {' or '.join(map(str, DATASET_CANDIDATES))}: run `make setup` or pass --data FILE"
    )


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
    source = dataset_path(args.data)
    prompts = keep_categories(read_prompt_file(source), args.categories, source)
    return pick_prompts(prompts, args.prompts, source), source


def encode_prompts(models: Models, prompts: list[Prompt], max_new_tokens: int) -> list[torch.Tensor]:
    inputs = [
        encode_messages(models.tokenizer, [{"role": "user", "content": p.turns[0]}], True).to(models.device)
        for p in prompts
    ]
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


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        # Before the models load: other busy processes slow every row (torch's threads spin against them).
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------ measurement


def resident_mb() -> float:
    """The process's resident set size now (Linux /proc; elsewhere the peak, the best available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return rss_mb()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class ForwardMeter:
    """Forward hooks on the target and the draft: forwards of each, and seconds spent inside them.

    On CUDA each forward is bracketed by a synchronize, so the seconds are the kernels' time, not launch time.
    """

    def __init__(self, models: Models, heads: list[torch.nn.Module] = ()) -> None:
        # EAGLE heads count as the draft: one row runs at a time, and a head row has no draft model.
        self.modules = {"target": [models.target], "draft": [m for m in (models.draft, *heads) if m is not None]}
        self.device = models.device
        self._started: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        self.calls = {"target": 0, "draft": 0}
        self.seconds = 0.0

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _hooks(self, role: str) -> tuple[Callable, Callable]:
        def before(module, args) -> None:
            self._started[role] = self._now()

        def after(module, args, output) -> None:
            self.seconds += self._now() - self._started.pop(role)
            self.calls[role] += 1

        return before, after

    @contextmanager
    def installed(self) -> Iterator[ForwardMeter]:
        handles = []
        try:
            for role, modules in self.modules.items():
                for module in modules:
                    before, after = self._hooks(role)
                    handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
            yield self
        finally:
            for handle in handles:
                handle.remove()


# ------------------------------------------------------------------------------------------------ configurations

Runner = Callable[[torch.Tensor], tuple[list[int], float | None]]  # input_ids -> (new tokens, our method's s)


@dataclass
class Config:
    method: str
    params: str
    run: Runner
    ours: bool
    drafts: bool  # proposes tokens (a draft model or a lookup): draft/call is reported, 0 for a lookup
    pair: str | None = None  # key of the HF row our tok/s is compared with
    head: torch.nn.Module | None = None  # an EAGLE row's head: its forwards count as draft forwards

    @property
    def key(self) -> str:
        return f"{self.method} {self.params}".strip()


def ours_runner(method: DecodingMethod, models: Models, max_new_tokens: int, eos: set[int]) -> Runner:
    # A lookup method gets no draft even when other rows loaded one: its draft/call reads 0 by construction.
    draft = models.draft if method.needs_draft else None

    def run(input_ids: torch.Tensor) -> tuple[list[int], float]:
        generation = method.generate(models.target, draft, input_ids, max_new_tokens, SamplingConfig(), eos)
        return generation.tokens, generation.stats.prefill_s + generation.stats.decode_s

    return run


@contextmanager
def assistant_schedule(draft, k: int, threshold: float = 0.0, schedule: str = "constant") -> Iterator[None]:
    """k draft tokens per round (a constant schedule, or HF's heuristic reset at each call), a confidence stop at
    ``threshold`` (0: none); the draft's settings come back after."""
    config = draft.generation_config
    saved = {name: getattr(config, name, None) for name in ASSISTANT_SCHEDULE}
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "heuristic_transient" if schedule == "heuristic" else "constant"
    config.assistant_confidence_threshold = threshold
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def hf_generate(models: Models, max_new_tokens: int) -> Callable[..., list[int]]:
    """Greedy ``target.generate`` returning the new tokens; assistant / lookup keywords pass through."""
    pad = models.tokenizer.pad_token_id
    if pad is None:
        pad = models.tokenizer.eos_token_id

    def generate(input_ids: torch.Tensor, **assist: Any) -> list[int]:
        output = models.target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad,
            do_sample=False, max_new_tokens=max_new_tokens, **assist,
        )
        return output[0, input_ids.shape[1]:].tolist()

    return generate


def hf_runner(
    models: Models, max_new_tokens: int, k: int | None = None, threshold: float = 0.0, schedule: str = "constant"
) -> Runner:
    """HF ``generate``, greedy; with ``k``, assisted by the draft (k tokens per round, see assistant_schedule)."""
    generate = hf_generate(models, max_new_tokens)

    def run(input_ids: torch.Tensor) -> tuple[list[int], None]:
        if k is None:
            return generate(input_ids), None
        with assistant_schedule(models.draft, k, threshold, schedule):
            return generate(input_ids, assistant_model=models.draft), None

    return run


def hf_lookup_runner(models: Models, max_new_tokens: int, k: int, max_ngram: int) -> Runner:
    """HF prompt lookup decoding: ``prompt_lookup_num_tokens`` alone selects its
    PromptLookupCandidateGenerator (transformers 5.x, ``_get_candidate_generator``); no assistant model is
    passed, so none can be used."""
    generate = hf_generate(models, max_new_tokens)

    def run(input_ids: torch.Tensor) -> tuple[list[int], None]:
        return generate(input_ids, prompt_lookup_num_tokens=k, max_matching_ngram_size=max_ngram), None

    return run


def eagle_setting(text: str) -> tuple[str, int]:
    """``"artifacts/eagle/head:4"`` -> (head path, k 4)."""
    path, _, k = text.rpartition(":")
    if not path or not k.isdigit() or int(k) < 1:
        raise InvalidParameterError(f"--eagle {text!r} is not HEAD:K with K >= 1 (e.g. artifacts/eagle/head:4)")
    return path, int(k)


def eagle_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Ours speculative sampling with an EAGLE head as the drafter (no HF counterpart)."""
    configs = []
    for text in args.eagle:
        path, k = eagle_setting(text)
        method = SpeculativeSampling(k, drafter=EagleDrafter(path))
        method.prepare(models.info["target"], None)  # a missing head or one for another target: refused here
        method.drafter.load(models.target)  # now, so that the forward meter can hook it
        label = f"k={k} head={path}"
        config = Config("ours eagle", label, ours_runner(method, models, args.max_new_tokens, eos), True, True)
        config.head = method.drafter.head
        configs.append(config)
    return configs


def eagle_tree_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Ours SpecExec with an EAGLE head growing the tree (EAGLE-2's dynamic tree; no HF counterpart)."""
    configs = []
    for text in args.eagle_tree:
        rest, _, depth = text.rpartition(":")
        path, _, budget = rest.rpartition(":")
        if not path or not budget.isdigit() or not depth.isdigit() or min(int(budget), int(depth)) < 1:
            raise InvalidParameterError(f"--eagle-tree {text!r} is not HEAD:BUDGET:DEPTH (e.g. artifacts/eagle/head:16:6)")
        options = {name: getattr(args, name) for name in ("max_beams", "max_branch_width", "prune_threshold")
                   if getattr(args, name) is not None}
        method = SpecExec(budget=int(budget), max_depth=int(depth), drafter=EagleDrafter(path), **options)
        method.prepare(models.info["target"], None)
        method.drafter.load(models.target)
        label = f"budget={budget} depth={depth} head={path}"
        config = Config("ours eagle tree", label, ours_runner(method, models, args.max_new_tokens, eos), True, True)
        config.head = method.drafter.head
        configs.append(config)
    return configs


def eagle_draft_cost(args: argparse.Namespace, models: Models, context: torch.Tensor) -> dict[str, float]:
    """ms per proposed token of each --eagle head (src.decoding.profile.drafter_step_ms: a chain of 8 after
    ``context``, median of 3): what a draft step costs, lm_head rows included."""
    heads = [path for path, _ in map(eagle_setting, args.eagle)]
    heads += [text.rsplit(":", 2)[0] for text in args.eagle_tree]
    costs = {}
    for text in dict.fromkeys(heads):
        drafter = EagleDrafter(text)
        drafter.prepare(models.info["target"])
        costs[text] = drafter_step_ms(drafter, models.target, context, models.target.config.vocab_size)
    return costs


def lookup_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Ours prompt lookup (a chain) next to HF's with the same N and G, then our lookup trees (no HF twin)."""
    n, min_ngram = args.max_new_tokens, args.min_ngram
    # HF's min n-gram is 1: any other value shows in our params, and the row has no HF twin (not like-for-like).
    suffix = f" min_ngram={min_ngram}" if min_ngram != 1 else ""
    configs = []
    for k, max_ngram, row_min in args.lookup:
        row_min = min_ngram if row_min is None else row_min
        label = f"k={k} max_ngram={max_ngram}"
        hf = Config("HF prompt lookup", label, hf_lookup_runner(models, n, k, max_ngram), False, True)
        ours = SpeculativeSampling(k, drafter=PromptLookup(max_ngram=max_ngram, min_ngram=row_min))
        runner = ours_runner(ours, models, n, eos)
        if row_min == 1:
            configs += [Config("ours prompt lookup", label, runner, True, True, hf.key), hf]
        else:
            configs.append(Config("ours prompt lookup", f"{label} min_ngram={row_min}", runner, True, True))
    for budget, depth, max_ngram in args.lookup_tree:
        drafter = PromptLookup(max_ngram=max_ngram, min_ngram=min_ngram, max_branches=args.lookup_branches)
        method = SpecExec(budget=budget, max_depth=depth, drafter=drafter)
        label = f"budget={budget} depth={depth} max_ngram={max_ngram} branches={args.lookup_branches}{suffix}"
        configs.append(Config("ours lookup tree", label, ours_runner(method, models, n, eos), True, True))
    return configs


def specexec_method(shape: tuple[int, int], args: argparse.Namespace) -> tuple[SpecExec, str]:
    budget, depth = shape
    options = {
        "max_beams": args.max_beams,
        "max_branch_width": args.max_branch_width,
        "prune_threshold": args.prune_threshold,
    }
    options = {name: value for name, value in options.items() if value is not None}
    label = " ".join([f"budget={budget} depth={depth}", *(f"{n}={v}" for n, v in options.items())])
    return SpecExec(budget=budget, max_depth=depth, **options), label


def build_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    n = args.max_new_tokens
    configs = [
        Config("ours baseline", "", ours_runner(Baseline(), models, n, eos), True, False, pair=REFERENCE),
        Config(REFERENCE, "", hf_runner(models, n), False, False),
    ]
    for k in args.ks:
        hf = Config("HF assisted", f"k={k}", hf_runner(models, n, k), False, True)
        ours = SpeculativeSampling(k)
        configs += [Config("ours speculative", f"k={k}", ours_runner(ours, models, n, eos), True, True, hf.key), hf]
    for k, threshold, schedule in args.assist:
        label = f"k={k} threshold={threshold}" + (" heuristic" if schedule == "heuristic" else "")
        hf = Config("HF assisted", label, hf_runner(models, n, k, threshold, schedule), False, True)
        # HF's heuristic schedule has no ceiling: ours gets one no generation can reach.
        ours = SpeculativeSampling(k, schedule=schedule, max_k=max(k, n), confidence_threshold=threshold)
        configs += [Config("ours speculative", label, ours_runner(ours, models, n, eos), True, True, hf.key), hf]
    for shape in args.specexec:
        method, label = specexec_method(shape, args)
        configs.append(Config("ours specexec", label, ours_runner(method, models, n, eos), True, True))
    return unique(configs + lookup_configs(args, models, eos) + eagle_configs(args, models, eos)
                  + eagle_tree_configs(args, models, eos))


def unique(configs: list[Config]) -> list[Config]:
    """A setting given twice would share one key and mix its records: keep its first row only."""
    by_key: dict[str, Config] = {}
    for config in configs:
        by_key.setdefault(config.key, config)
    return list(by_key.values())


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Record:
    tokens: list[int]
    wall_s: float
    target_calls: int
    draft_calls: int
    forward_s: float
    method_s: float | None
    rss_mb: float
    gpu_mb: float | None = None


def timed_run(config: Config, input_ids: torch.Tensor, meter: ForwardMeter) -> Record:
    device = meter.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter.reset()
    synchronize(device)
    started = time.perf_counter()
    tokens, method_s = config.run(input_ids)
    synchronize(device)
    wall_s = time.perf_counter() - started
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Record(
        tokens, wall_s, meter.calls["target"], meter.calls["draft"], meter.seconds, method_s, rss_mb(), gpu_mb
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(configs: list[Config], input_ids: torch.Tensor, meter: ForwardMeter) -> None:
    for config in configs:
        timed_run(config, input_ids, meter)
    free_memory(meter.device)


def run_pass(configs: list[Config], inputs: list[torch.Tensor], meter: ForwardMeter, index: int) -> dict:
    """Prompt i on every configuration (order rotated per prompt) before prompt i + 1: {key: [Record per prompt]}."""
    records: dict[str, list[Record]] = {config.key: [] for config in configs}
    for position, input_ids in enumerate(inputs):
        shift = (index * len(inputs) + position) % len(configs)
        for config in configs[shift:] + configs[:shift]:
            records[config.key].append(timed_run(config, input_ids, meter))
        free_memory(meter.device)
        print(f"  pass {index + 1} prompt {position + 1}/{len(inputs)} done", file=sys.stderr, flush=True)
    return records


# ------------------------------------------------------------------------------------------------ summary


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def tokens_per_second(records: list[Record]) -> float:
    return sum(len(r.tokens) for r in records) / sum(r.wall_s for r in records)


def pass_figures(records: list[Record], config: Config) -> dict[str, float | None]:
    tokens = sum(len(r.tokens) for r in records)
    target_calls = sum(r.target_calls for r in records)
    method_s = sum(r.method_s or 0.0 for r in records)
    forward_s = sum(r.forward_s for r in records)
    return {
        "tok_s": tokens_per_second(records),
        "tok_per_call": tokens / target_calls if target_calls else None,
        "draft_per_call": sum(r.draft_calls for r in records) / target_calls if config.drafts else None,
        "overhead": 1 - forward_s / method_s if config.ours and method_s else None,
    }


def spread(values: list[float | None]) -> dict[str, float] | None:
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def differing_prompts(passes: list[dict], key: str, eos: set[int]) -> int:
    """Prompts whose output differs from the reference (HF generate of the same pass) in any pass."""
    count = len(passes[0][key])
    return sum(
        any(cut_at_eos(p[key][i].tokens, eos) != cut_at_eos(p[REFERENCE][i].tokens, eos) for p in passes)
        for i in range(count)
    )


def build_row(config: Config, passes: list[dict], eos: set[int]) -> dict[str, Any]:
    per_pass = [pass_figures(p[config.key], config) for p in passes]
    if config.pair is not None:
        for figures, pass_records in zip(per_pass, passes):
            figures["ratio"] = figures["tok_s"] / tokens_per_second(pass_records[config.pair])
    records = [r for p in passes for r in p[config.key]]
    gpu_peaks = [r.gpu_mb for r in records if r.gpu_mb is not None]
    differing = differing_prompts(passes, config.key, eos)
    return {
        "method": config.method,
        "params": config.params,
        **{name: spread([f.get(name) for f in per_pass]) for name in
           ("tok_s", "tok_per_call", "draft_per_call", "ratio", "overhead")},
        "identical": differing == 0,
        "prompts_differing": differing,
        "prompts": len(passes[0][config.key]),
        "peak_rss_mb": records[-1].rss_mb,  # after the configuration's last run
        "peak_gpu_mb": max(gpu_peaks) if gpu_peaks else None,
        "passes": per_pass,
    }


def build_rows(configs: list[Config], passes: list[dict], eos: set[int]) -> list[dict[str, Any]]:
    return [build_row(config, passes, eos) for config in configs]


# ------------------------------------------------------------------------------------------------ report


def show(value: dict[str, float] | None, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    mean, low, high = (value[name] * scale for name in ("mean", "min", "max"))
    text = f"{mean:.{digits}f}{suffix}"
    if f"{low:.{digits}f}" != f"{high:.{digits}f}":
        text += f" ({low:.{digits}f}-{high:.{digits}f})"
    return text


def table_cells(row: dict[str, Any]) -> list[str]:
    if row["method"] == REFERENCE:
        identical = "ref"
    else:
        identical = "yes" if row["identical"] else f"no ({row['prompts_differing']}/{row['prompts']})"
    cells = [
        row["method"],
        row["params"] or "-",
        show(row["tok_s"], 1),
        show(row["tok_per_call"], 2),
        show(row["draft_per_call"], 2),
        show(row["ratio"], 2),
        identical,
        show(row["overhead"], 1, 100, "%"),
        f"{row['peak_rss_mb']:.0f}",
    ]
    if row["peak_gpu_mb"] is not None:
        cells.append(f"{row['peak_gpu_mb']:.0f}")
    return cells


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["method", "params", "tok/s", "tok/call", "draft/call", "ours/HF", "identical", "overhead",
              "peak RSS MB"]
    if rows and rows[0]["peak_gpu_mb"] is not None:
        header.append("peak GPU MB")
    lines = [header, *map(table_cells, rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(header), "  ".join("-" * w for w in widths), *map(render, lines[1:])])


def describe_model(info: dict[str, Any] | None) -> str:
    if info is None:
        return "none (no configuration needs one)"
    quantization = "" if info["quantization"] == "none" else f" {info['quantization']}"
    return f"{info['name']} ({info['dtype']}{quantization}, {info['device']})"


def print_report(report: dict[str, Any]) -> None:
    machine, run = report["machine"], report["run"]
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    average = machine["load_average"]
    load = f", load average {average:.1f} before the run" if average is not None else ""
    print(f"machine: {machine['cpu']} ({machine['cores']} cores{load}), torch threads {machine['threads']}, "
          f"torch {machine['torch']}, transformers {machine['transformers']}{gpu}")
    models = report["models"]
    print(f"pair: target {describe_model(models['target'])}; draft {describe_model(models['draft'])}; "
          f"loaded in {models['load_s']:.1f} s")
    lengths = run["prompt_tokens"]
    print(f"run: {run['prompts']} first turns of {Path(run['data']).name} ({', '.join(run['categories'])}; "
          f"{min(lengths)}-{max(lengths)} prompt tokens, mean {statistics.mean(lengths):.0f}), "
          f"max_new_tokens {run['max_new_tokens']}, greedy, {run['repeat']} interleaved pass(es) after one "
          "warm-up per configuration")
    latency = ", ".join(f"{size} tok {ms:.1f} ms" for size, ms in report["target_forward_ms"].items())
    print(f"target forward latency (median of {LATENCY_REPEATS}, after the first prompt): {latency}")
    one_token = report["target_forward_ms"][1]
    for head, ms in report.get("eagle_draft_ms_per_token", {}).items():
        print(f"EAGLE head {head}: {ms:.2f} ms per proposed token = {100 * ms / one_token:.1f}% of a 1-token target "
              "forward")
    resident = report.get("resident_mb") or []
    if len(resident) > 1:
        print(f"resident memory after the warm-up and after each pass: {', '.join(f'{mb:.0f}' for mb in resident)} MB "
              f"(growth {resident[-1] - resident[0]:+.0f} MB)")
    print()
    print(format_table(report["rows"]))


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


# ------------------------------------------------------------------------------------------------ main


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, source = select_prompts(args)
    machine = machine_info(torch.device(args.device))
    models = load_models(args)
    eos = eos_ids(models)
    inputs = encode_prompts(models, prompts, args.max_new_tokens)
    with torch.inference_mode():
        latency = forward_latency(models.target, inputs[0], LATENCY_SIZES, LATENCY_REPEATS)
        configs = build_configs(args, models, eos)
        head_ms = eagle_draft_cost(args, models, inputs[0])
        meter = ForwardMeter(models, [config.head for config in configs if config.head is not None])
        with meter.installed():
            warm_up(configs, inputs[0], meter)
            resident = [resident_mb()]  # after the warm-up, then after each pass: caches must not pile up
            passes = []
            for index in range(args.repeat):
                passes.append(run_pass(configs, inputs, meter, index))
                resident.append(resident_mb())
    return {
        "machine": machine,
        "models": models.info,
        "run": {
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "repeat": args.repeat,
            "draft": args.draft if models.draft is not None else None, "device": args.device,
            "eos_token_ids": sorted(eos), "data": str(source),
            "categories": list(dict.fromkeys(p.category for p in prompts)),  # file order
            "prompt_tokens": [input_ids.shape[1] for input_ids in inputs], "min_ngram": args.min_ngram,
        },
        "target_forward_ms": latency,
        "eagle_draft_ms_per_token": head_ms,
        "resident_mb": resident,
        "rows": build_rows(configs, passes, eos),
    }


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
