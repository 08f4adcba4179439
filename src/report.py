"""``python -m src.report``: the entry point of the results report (:mod:`src.results.report`, its docstring
says what it writes and how every figure is computed)."""

from src.results.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
