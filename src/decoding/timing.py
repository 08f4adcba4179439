"""Every clock of a generation: its wall-clock stages, and where its time goes.

Stages (:class:`StageTimer`, CUDA-synchronized at both ends so queued kernels count where they ran):

    prefill_s  time to the first emitted token(s): the baseline's prompt forward; a draft method's first cycle,
               which encodes the prompt in both models and verifies the first chain or tree in the same forwards
    decode_s   everything after it (``GenerationState.prefill`` / ``.decode`` in :mod:`src.decoding.base` time
               each method's two stages into :class:`~src.decoding.stats.GenerationStats`)

Where the time goes (:class:`TimeSplit`):

    target_s  time inside the target model's forwards (a forward pre-hook and a forward hook on the model)
    draft_s   time inside the drafter: draft-model forwards, EAGLE head steps, n-gram lookups, SpecExec tree growth
              (the decoding code marks these regions with :func:`drafting`; forwards of the draft model outside
              them are caught by hooks on it)
    other_s   prefill_s + decode_s - target_s - draft_s: sampling, acceptance, cache rollback, tree walk, Python

Regions do not nest: a target forward inside a drafting region (none today) counts once, as draft. On a GPU each
region records two CUDA events and the elapsed times are read once, after the generation (no host sync per
forward); on a CPU it is ``time.perf_counter``.

The split is used as a context around ``method.generate`` (:func:`timed_generate`); without one, :func:`drafting`
costs a context-variable lookup and measures nothing. The cost model that predicts these times from measured
latencies is :mod:`src.decoding.profile`.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch

from src.decoding.stats import Generation, GenerationStats

_ACTIVE: contextvars.ContextVar[TimeSplit | None] = contextvars.ContextVar("sp_samp_time_split", default=None)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels (a no-op elsewhere), so a clock read counts them where they ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock time of a stage (``with StageTimer(device) as t: ...; t.elapsed``), synchronizing CUDA so
    queued kernels are counted where they ran."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0.0

    def __enter__(self) -> StageTimer:
        synchronize(self.device)
        self.start = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.elapsed = time.perf_counter() - self.start


@contextlib.contextmanager
def timed_stage(stats: GenerationStats, stage: Literal["prefill", "decode"], device: torch.device) -> Iterator[None]:
    """Time the block into ``stats.prefill_s`` or ``stats.decode_s`` (see the module docstring)."""
    if stage not in ("prefill", "decode"):
        raise ValueError(f"stage={stage!r} is unknown: use 'prefill' or 'decode'")
    with StageTimer(device) as timer:
        yield
    setattr(stats, f"{stage}_s", timer.elapsed)


class TimeSplit:
    """Accumulates target and draft time of one generation (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = {"target": 0.0, "draft": 0.0}
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        # tokens read per forward -> forwards, per watched model ("target", "draft")
        self.forward_sizes: dict[str, Counter[int]] = {"target": Counter(), "draft": Counter()}
        self._open: tuple[str, float | torch.cuda.Event] | None = None
        self._handles: list = []

    # ---- regions
    def start(self, label: str) -> bool:
        """Open a region unless one is open; returns whether this call opened it."""
        if self._open is not None:
            return False
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open = (label, event)
        else:
            self._open = (label, time.perf_counter())
        return True

    def stop(self) -> None:
        label, begun = self._open
        self._open = None
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((label, begun, end))
        else:
            self.seconds[label] += time.perf_counter() - begun

    def totals(self) -> dict[str, float]:
        """Seconds per label; on a GPU this waits for the recorded events (once per generation)."""
        if self.events:
            torch.cuda.synchronize()
            for label, begun, end in self.events:
                self.seconds[label] += begun.elapsed_time(end) / 1000.0
            self.events.clear()
        return dict(self.seconds)

    # ---- hooks on models
    def watch(self, model, label: str) -> None:
        """Time every forward of ``model`` as ``label`` and count its input sizes."""
        opened: list[bool] = []

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self.forward_sizes[label][int(ids.shape[-1])] += 1
            opened.append(self.start(label))

        def after(module, args, kwargs, output):
            if opened.pop():
                self.stop()

        self._handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(model.register_forward_hook(after, with_kwargs=True))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def drafting() -> Iterator[None]:
    """Marks drafter work (propose, commit, tree growth) for the active :class:`TimeSplit`, if any."""
    split = _ACTIVE.get()
    opened = split.start("draft") if split is not None else False
    try:
        yield
    finally:
        if opened:
            split.stop()


def timed_generate(method, target, draft, input_ids: torch.Tensor, *args, **kwargs) -> Generation:
    """``method.generate(target, draft, input_ids, ...)`` with its time split into ``stats.extra``: ``target_s``,
    ``draft_s``, ``other_s``, and ``target_forward_sizes`` / ``draft_forward_sizes`` ({tokens per forward: count}
    of the target and of the draft model)."""
    split = TimeSplit(input_ids.device)
    split.watch(target, "target")
    if draft is not None and draft is not target:
        split.watch(draft, "draft")
    token = _ACTIVE.set(split)
    try:
        generation = method.generate(target, draft, input_ids, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)
        split.close()
    seconds = split.totals()
    stats = generation.stats
    wall = stats.prefill_s + stats.decode_s
    stats.extra.update(target_s=seconds["target"], draft_s=seconds["draft"],
                       other_s=wall - seconds["target"] - seconds["draft"],
                       **{f"{label}_forward_sizes": {str(n): c for n, c in sorted(sizes.items())}
                          for label, sizes in split.forward_sizes.items()})
    return generation
