"""Stopping a run with SIGINT (Ctrl-C) or SIGTERM (kill, timeout, docker stop): one line, no traceback, exit
status 130 / 143, and the command that continues the run.

``python -m src`` installs the handlers first thing (:func:`handling`), before torch and Lightning load (seconds
during which a Ctrl-C used to print an 80-line traceback). Then:

- while predict decodes (:func:`stop_between_prompts`), the first signal only asks to stop: the prompt in flight
  finishes and its records are written, predict ends as after its last prompt (summary printed, wandb runs
  finished, data-parallel part files merged) and says how to resume. A second signal stops at once;
- anywhere else (imports, model loading, fit) the first signal stops at once: fit's stores (the AutoJudge
  label store, the EAGLE feature store) are written to survive a kill and continue on the next fit;
- a write in a :func:`deferred` section (a record line, a part-file merge) is never cut by a stop: a stop that
  arrives during one is raised at its end;
- once a stop is raised, a further signal ends the process at once (a hung clean-up can still be cut short).

Lightning replaces the SIGTERM handler while it runs (its ``_SignalConnector`` only sets a flag, which its
predict loop never reads: that is why ``kill`` did not stop predict); :func:`take_over` puts ours back.

Plain Python (no torch, no Lightning), so that it loads before them.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM stopped the run; ``python -m src`` prints ``message`` as one line and exits 128 + signum.

    A BaseException, as KeyboardInterrupt is: the ``except Exception`` that keeps one failing prompt from ending a
    run must not swallow a stop.
    """

    def __init__(self, signum: int, repeated: bool = False, message: str | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.repeated = repeated  # a second signal, after a first one asked to stop between prompts
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def what(self) -> str:
        return f"a second {signal_name(self.signum)}" if self.repeated else signal_name(self.signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _State:
    def __init__(self) -> None:
        self.active = False  # our handlers are installed (by python -m src)
        self.argv: list[str] = []
        self.previous: dict[int, Any] = {}
        self.requested: int | None = None  # the first stop signal
        self.between_prompts = False
        self.raised = False  # a stop was raised: the run is cleaning up
        self.deferring = 0
        self.pending: RunInterrupted | None = None
        self.pending_exit: int | None = None
        self.children: list[Any] = []  # rank 0's data-parallel worker processes (subprocess.Popen)


_state = _State()


class handling:  # noqa: N801 (a context manager used as ``with handling(argv):``)
    """Install the stop handlers for a run of ``python -m src`` with arguments ``argv``.

    ``restore``: put the previous handlers back at the end (a caller that runs ``main`` in its own process, e.g. a
    test); ``python -m src`` itself keeps them, so a signal after the run has ended exits at once.
    """

    def __init__(self, argv: Sequence[str], restore: bool = True) -> None:
        self.argv = list(argv)
        self.restore = restore

    def __enter__(self) -> handling:
        global _state
        _state = _State()
        _state.argv = self.argv
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            _state.previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
            _state.active = True
            take_over()
        return self

    def __exit__(self, *exc_info) -> None:
        global _state
        if not _state.active:
            return
        if self.restore:
            for signum, handler in _state.previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            _state = _State()
        else:
            _state.raised = True  # the run is over: a late signal exits without a traceback


def take_over() -> None:
    """Make our handlers current again (Lightning installs its own SIGTERM handler while it runs). No-op unless
    :func:`handling` installed them."""
    if _state.active and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_signal)


def forward_sigterm_to(processes: Iterable[Any]) -> None:
    """Rank 0 of a data-parallel run passes a SIGTERM on to the other ranks (Ctrl-C reaches them all anyway)."""
    _state.children = list(processes)


def stop_between_prompts(enabled: bool) -> None:
    """While predict decodes, a first signal asks to stop after the prompt in flight (:func:`requested`)."""
    _state.between_prompts = enabled


def requested() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _state.requested


def argv() -> list[str]:
    return list(_state.argv)


class deferred:  # noqa: N801 (a context manager used as ``with deferred():``)
    """A section a stop must not cut (a record line being written): a stop arriving inside is raised at its end."""

    def __enter__(self) -> deferred:
        _state.deferring += 1
        return self

    def __exit__(self, *exc_info) -> None:
        _state.deferring -= 1
        if _state.deferring:
            return
        if _state.pending_exit is not None:
            _exit_now(_state.pending_exit)
        if _state.pending is not None:
            stop, _state.pending = _state.pending, None
            _state.raised = True
            raise stop


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGTERM:
        for process in _state.children:
            try:
                process.send_signal(signum)
            except OSError:  # that rank has already gone
                pass
    if _state.raised or _state.pending is not None:  # a stop is already on its way: end now
        if _state.deferring:
            _state.pending_exit = signum
            return
        _exit_now(signum)
    first = _state.requested is None
    if first:
        _state.requested = signum
    if first and _state.between_prompts:
        name = signal_name(signum)
        again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
        say(f"{name}: stopping after the prompt in flight ({again} stops at once)")
        return
    stop = RunInterrupted(signum, repeated=not first)
    if _state.deferring:
        _state.pending = stop
        return
    _state.raised = True
    raise stop


def _exit_now(signum: int) -> None:
    """A third signal (or one during the clean-up after a stop): leave at once, no clean-up, no traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a stream half-written by the interrupted code: the exit matters more
            pass
    say(f"{signal_name(signum)}: stopped at once")
    os._exit(128 + signum)


def say(line: str) -> None:
    """One line on stderr from rank 0, written straight to the file descriptor: safe inside a signal handler,
    where ``print`` could re-enter a stream the interrupted code was writing."""
    if is_rank_zero():
        try:
            os.write(2, (line + "\n").encode())
        except OSError:
            pass


def is_rank_zero() -> bool:
    lightning = sys.modules.get("lightning.pytorch.utilities.rank_zero")
    if lightning is not None:  # the strategy sets it once the process group is up
        return getattr(lightning.rank_zero_only, "rank", 0) == 0
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def resume_command(args: Sequence[str], resume: bool) -> str:
    """``python -m src`` with ``args``; with ``resume``, any ``--resume`` value replaced by ``--resume true``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif resume and arg == "--resume":
            skip = True
        elif not (resume and arg.startswith("--resume=")):
            kept.append(arg)
    return shlex.join(["python", "-m", "src", *kept, *(["--resume", "true"] if resume else [])])


def report(stop: RunInterrupted) -> int:
    """Print the stop's line on rank 0 (stderr) and return the exit status."""
    message = stop.message
    if message is None:  # stopped before the run's CLI could say more (imports, parsing)
        subcommand = _state.argv[0] if _state.argv else "the run"
        again = resume_command(_state.argv, resume=subcommand == "predict")
        message = f"stopped by {stop.what} before {subcommand} started; rerun with: {again}"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # see _exit_now
            pass
    say(message)
    return stop.exit_code
