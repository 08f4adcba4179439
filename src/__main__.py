"""Entry point of ``python -m src``; the CLI class lives in :mod:`src.cli` so ``class_path`` resolution works."""

import os
import sys

from src.cli import cli_main
from src.errors import UserInputError

if __name__ == "__main__":
    try:
        cli_main()
    except UserInputError as error:
        if os.environ.get("SP_SAMP_TRACEBACK"):
            raise
        sys.exit(f"error: {error}")
