"""Entry point of ``python -m src``; the CLI class lives in :mod:`src.cli` so ``class_path`` resolution works.

    python -m src {fit,predict} --config configs/<name>.yaml [--key value ...]
    python -m src methods            # every decoding method and its parameters

A user's mistake (a bad value, a missing file, a results file that cannot be continued) prints one line on
stderr and exits with status 2; set ``SP_SAMP_TRACEBACK=1`` for the full traceback. Anything else is a bug and
keeps its traceback. SIGINT (Ctrl-C) and SIGTERM stop a run in one line too, with status 130 / 143 and the
command that continues it (:mod:`src.lit.interrupts`).
"""

import os
import sys

from src.lit import interrupts


def main(argv: list[str] | None = None) -> int:
    own_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    # Installed before the imports below (seconds of torch and Lightning) so a Ctrl-C there is one line too.
    with interrupts.handling(argv, restore=not own_command_line):
        try:
            return run(argv)
        except interrupts.RunInterrupted as stop:
            return interrupts.report(stop)
        except Exception as error:
            stopped_by = interrupts.requested()
            if stopped_by is not None and not os.environ.get("SP_SAMP_TRACEBACK"):
                # The consequence of a stop, e.g. a data-parallel rank whose peers left first: the stop explains it.
                return interrupts.report(interrupts.RunInterrupted(stopped_by))
            from src.cli_errors import one_line_error

            message = one_line_error(error)
            if message is None or os.environ.get("SP_SAMP_TRACEBACK"):
                raise
            print(f"error: {' '.join(message.split())}", file=sys.stderr)
            return 2


def run(argv: list[str]) -> int:
    # Imported here, not at the top: `methods` lists the methods without loading Lightning and its CLI.
    if argv[:1] == ["methods"]:
        extra = [arg for arg in argv[1:] if arg not in ("-h", "--help")]  # the listing is its own help
        if extra:
            from src.errors import InvalidParameterError

            raise InvalidParameterError(
                f"`methods` takes no arguments, got {' '.join(extra)}: run `python -m src methods` alone (it lists "
                "every method and its parameters)")
        from src.cli_help import methods_text

        print(methods_text())
        return 0
    from src.cli import cli_main

    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
