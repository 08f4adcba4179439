"""Entry point of ``python -m src``; the CLI class lives in :mod:`src.cli` so ``class_path`` resolution works.

    python -m src {fit,predict} --config configs/<name>.yaml [--key value ...]
    python -m src methods            # every decoding method and its parameters

A user's mistake (a bad value, a missing file, a results file that cannot be continued) prints one line on
stderr and exits with status 2; set ``SP_SAMP_TRACEBACK=1`` for the full traceback. Anything else is a bug and
keeps its traceback.
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Imported here, not at the top: `methods` lists the methods without loading Lightning and its CLI.
    if argv[:1] == ["methods"]:
        from src.cli_help import methods_text

        print(methods_text())
        return 0
    from src.cli import cli_main
    from src.cli_errors import one_line_error

    try:
        cli_main(argv)
    except Exception as error:
        message = one_line_error(error)
        if message is None or os.environ.get("SP_SAMP_TRACEBACK"):
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
