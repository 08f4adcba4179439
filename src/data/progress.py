"""Progress of the long data phases of ``fit``: one bar per phase, the same for all of them.

The phases (self-distillation and feature building for an EAGLE head, label mining for AutoJudge) run for
minutes before Lightning prints anything, and one batch of them can take longer than a minute on a CPU.
:func:`phase_progress` gives each a tqdm bar on stderr with the phase's name, done/total, rate and ETA, and a
heartbeat thread redraws it while a batch runs, so the elapsed time moves at least every
:data:`LINE_INTERVAL_S` seconds even when no item finished.

Where stderr is not a terminal (a log file, CI, a test's capture), in-place redraws would pile up as one
endless line of carriage returns: there the bar is written as whole lines instead, one at the start, then at
most one per :data:`LINE_INTERVAL_S` seconds, and the last one when the phase ends.

A resumed store starts its bar at what it already holds, and the description says so
(``building features (resuming: 120/620 already stored)``), so the rate and ETA count this run's work only.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 10.0  # a line this often at most (and at least, by the heartbeat) where stderr is no terminal
TERMINAL_REDRAW_S = 1.0  # on a terminal the bar redraws in place, so the elapsed time may tick every second
QUICK_PHASE_DELAY_S = 5.0  # ``delay_s`` of a phase that is usually quick: a bar only once it has run this long


class _Lines:
    """A stream for tqdm that turns each in-place redraw (``"\\r" + bar + padding``) into one whole line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> None:
        line = text.strip("\r\n").rstrip()
        if line:  # tqdm's clearing writes ('' and the closing newline) carry nothing
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _heartbeat(bar: tqdm, interval: float, stop: threading.Event) -> None:
    """Redraw ``bar`` whenever it has not been drawn for ``interval`` s (and its delay, if any, has passed)."""
    while not stop.wait(min(interval, 1.0)):
        now = bar._time()
        if now >= bar.start_t + bar.delay and now - bar.last_print_t >= interval:
            bar.refresh()
            bar.last_print_t = now  # update() throttles on it: no second line right after this one


@contextmanager
def phase_progress(
    phase: str, total: int, done: int = 0, unit: str = "item", enabled: bool = True, delay_s: float = 0.0,
) -> Iterator[tqdm]:
    """A bar for one phase over ``total`` items of which ``done`` were finished by an earlier run.

    Yields the tqdm bar: ``update(n)`` after each batch, ``set_postfix_str`` for the phase's own figures.
    ``enabled`` False shows nothing (``--trainer.enable_progress_bar false``, or a rank other than 0).
    ``delay_s``: show nothing unless the phase runs that long (for phases that are usually quick).
    """
    stream = sys.stderr  # looked up now: a test's capture (or a redirect) replaces it after import
    lines = not (hasattr(stream, "isatty") and stream.isatty())
    description = f"{phase} (resuming: {done}/{total} already stored)" if done else phase
    options: dict[str, Any] = {"file": _Lines(stream), "mininterval": LINE_INTERVAL_S, "ascii": True} if lines \
        else {"file": stream}
    bar = tqdm(total=total, initial=done, desc=description, unit=unit, disable=not enabled, delay=delay_s,
               leave=True, dynamic_ncols=not lines, **options)
    stop = threading.Event()
    beat = None
    if enabled:
        beat = threading.Thread(target=_heartbeat, args=(bar, LINE_INTERVAL_S if lines else TERMINAL_REDRAW_S, stop),
                                name=f"progress: {phase}", daemon=True)
        beat.start()
    try:
        yield bar
    finally:
        stop.set()
        if beat is not None:
            beat.join()
        bar.close()


def shows_progress(trainer) -> bool:
    """Whether a fit's data phases show their bars: only where its Lightning ``trainer`` shows one (it is
    not run with ``enable_progress_bar: false``), and on the global rank 0 only; True without a trainer."""
    if trainer is None:
        return True
    return getattr(trainer, "progress_bar_callback", None) is not None and bool(getattr(trainer, "is_global_zero", True))


@contextmanager
def still_running(phase: str, enabled: bool = True, interval: float = LINE_INTERVAL_S) -> Iterator[None]:
    """For a phase made of steps too uneven for a bar (predict's cost profile, the ``auto`` calibration): a line
    ``<phase>: still running, 20 s`` every ``interval`` seconds while the block runs, nothing if it ends sooner."""
    stop = threading.Event()

    def beat() -> None:
        elapsed = 0.0
        while not stop.wait(interval):
            elapsed += interval
            print(f"{phase}: still running, {elapsed:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, name=f"still running: {phase}", daemon=True) if enabled else None
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread is not None:
            thread.join()
