"""What the benchmark scripts share: the embedded pair's name, where the datasets are, the prompts' encoding, the
EOS ids HF ``generate`` stops on, the interleaved order, and one measurement taken the library's way.

- machine facts: :func:`src.lit.system.system_info` (what every result record carries), plus the core count and
  the load average before the run;
- forwards and seconds inside the target and the draft: :class:`src.decoding.timing.TimeSplit` hooked on the
  models for one run (:func:`timed_run`);
- wall seconds: ``StageTimer``, the methods' own stage clock (CUDA-synchronized at both ends).

The scripts run as ``python benchmarks/NAME.py``: this folder is on ``sys.path`` and ``src`` is installed
(editable, by ``make setup``). Nothing here imports a sibling script, so a test can load this file on its own.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from src.data.prompts import Prompt, encode_messages
from src.decoding.base import input_device
from src.decoding.timing import StageTimer, TimeSplit
from src.errors import InvalidParameterError, MissingInputError
from src.lit.system import system_info
from src.models import ModelSpec, load_model, load_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = "embedded:smollm2-135m-instruct"

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ inputs


def dataset_candidates(name: str) -> tuple[Path, Path]:
    """Where a dataset is looked for: ``datasets/NAME`` (``make setup`` puts MT-Bench there), then the shared copy
    next to the checkout, ``../shared/datasets/NAME``."""
    return REPO_ROOT / "datasets" / name, REPO_ROOT.parent / "shared" / "datasets" / name


def find_dataset(name: str, given: Path | str | None, option: str, setup: bool = False) -> Path:
    """``given`` (the value of ``option``; refused if it is no file), else the first of :func:`dataset_candidates`;
    ``setup``: ``make setup`` fetches this one, and the error says so."""
    if given is not None:
        if not Path(given).is_file():
            raise MissingInputError(f"{option} {given}: no such file")
        return Path(given)
    candidates = dataset_candidates(name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    remedy = f"run `make setup` or pass {option} FILE" if setup else f"pass {option} FILE"
    raise MissingInputError(f"no {name} at {' or '.join(map(str, candidates))}: {remedy}")


def encode_first_turns(tokenizer, prompts: list[Prompt], device: torch.device) -> list[torch.Tensor]:
    """Each prompt's first turn as a one-message chat (the chat template, ending with the assistant header)."""
    return [
        encode_messages(tokenizer, [{"role": "user", "content": prompt.turns[0]}], True).to(device)
        for prompt in prompts
    ]


def eos_ids(model, tokenizer) -> set[int]:
    """The generation config's EOS ids (what HF ``generate`` stops on); the tokenizer's when it has none."""
    config_eos = model.generation_config.eos_token_id
    ids = {config_eos} if isinstance(config_eos, int) else set(config_eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = {tokenizer.eos_token_id}
    return {int(i) for i in ids}


def rotated(items: list[T], shift: int) -> list[T]:
    """``items`` starting at ``shift`` (modulo their number): each prompt runs the configurations in another
    order, so a noisy neighbour on the cores hits all alike."""
    shift %= len(items)
    return items[shift:] + items[:shift]


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Models:
    """The target and the draft (None: no row needs one) as loaded modules, the tokenizer, and the pair's
    ``describe()`` with ``load_s``. ``drafts``: every draft loaded, by kind (``draft`` is the first);
    :meth:`with_draft` is the same models with another of them as ``draft``."""

    target: Any
    draft: Any | None
    tokenizer: Any
    info: dict[str, Any]
    drafts: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return input_device(self.target)

    def with_draft(self, kind: str) -> Models:
        return replace(self, draft=self.drafts[kind])


def load_models(target: ModelSpec, drafts: dict[str, ModelSpec] | ModelSpec | None) -> Models:
    """The target and each draft of ``drafts`` (kind -> spec; one spec: kind ``draft``), each loaded once. The
    first draft's tokenizer is checked against the target's (:func:`src.models.load_pair`); the others must name
    the same checkpoint. ``info["draft"]`` describes the first draft; with several, ``info["drafts"]`` each."""
    if isinstance(drafts, ModelSpec):
        drafts = {"draft": drafts}
    specs = list((drafts or {}).items())
    started = time.perf_counter()
    pair = load_pair(target, specs[0][1] if specs else None)
    loaded = {specs[0][0]: pair.draft} if specs else {}
    for kind, spec in specs[1:]:
        spec = spec.resolved_against(target)
        if spec.name_or_path != specs[0][1].resolved_against(target).name_or_path:
            raise InvalidParameterError(f"draft {kind!r} ({spec.describe()}) is another checkpoint than the first "
                                        "draft's: several drafts must share one tokenizer")
        loaded[kind] = load_model(spec, tokenizer=pair.draft.tokenizer)
    info = {**pair.describe(), "load_s": round(time.perf_counter() - started, 2)}
    if len(loaded) > 1:
        info["drafts"] = {kind: model.info for kind, model in loaded.items()}
    models = {kind: model.model for kind, model in loaded.items()}
    first = next(iter(models.values()), None)
    return Models(target=pair.target.model, draft=first, tokenizer=pair.tokenizer, info=info, drafts=models)


# ------------------------------------------------------------------------------------------------ machine


def machine_info(device: torch.device) -> dict[str, Any]:
    """:func:`src.lit.system.system_info` (as in every result record), plus the cores and the load average."""
    return {
        **system_info(device),
        "cores": os.cpu_count(),
        # Before the models load: other busy processes slow every row (torch's threads spin against them).
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def resident_mb() -> float:
    """The process's resident set size now (Linux /proc; elsewhere the peak, the best available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return rss_mb()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ------------------------------------------------------------------------------------------------ one run


@contextmanager
def forward_split(device: torch.device, target, drafts: Iterable[torch.nn.Module]) -> Iterator[TimeSplit]:
    """A :class:`TimeSplit` hooked on ``target`` ("target") and on each of ``drafts`` ("draft": a draft model, an
    EAGLE head) for one run, its hooks removed after.

    The split is never made the active one (that is :func:`src.decoding.timing.timed_generate`), so the
    decoding code's ``drafting()`` regions stay closed: its seconds are those inside the hooked forwards only,
    for our methods and HF's alike.
    """
    split = TimeSplit(device)
    split.watch(target, "target")
    for module in drafts:
        split.watch(module, "draft")
    try:
        yield split
    finally:
        split.close()


def forwards(split: TimeSplit, label: str) -> int:
    """Forwards of the models watched as ``label`` (TimeSplit counts them by the tokens each reads)."""
    return sum(split.forward_sizes[label].values())


@dataclass
class Record:
    """One run: the new tokens and what it took."""

    tokens: list[int]
    wall_s: float
    target_calls: int
    draft_calls: int
    forward_s: float  # inside the target's and the draft's forwards
    method_s: float | None  # our method's prefill_s + decode_s (None for HF's)
    rss_mb: float
    gpu_mb: float | None = None


Run = Callable[[torch.Tensor], tuple[list[int], float | None]]  # input_ids -> (new tokens, our method's seconds)


def timed_run(run: Run, input_ids: torch.Tensor, device: torch.device, target,
              drafts: Iterable[torch.nn.Module]) -> Record:
    """``run(input_ids)`` with its wall time, the target's and the draft's forwards and seconds, and the memory
    after it (peak CUDA memory allocated during it on a GPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with forward_split(device, target, drafts) as split:
        with StageTimer(device) as wall:
            tokens, method_s = run(input_ids)
        seconds = split.totals()
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Record(tokens, wall.elapsed, forwards(split, "target"), forwards(split, "draft"),
                  seconds["target"] + seconds["draft"], method_s, rss_mb(), gpu_mb)
