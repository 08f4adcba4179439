"""Entry point of ``python -m src``; the CLI class lives in :mod:`src.cli` so ``class_path`` resolution works."""

from src.cli import cli_main

if __name__ == "__main__":
    cli_main()
