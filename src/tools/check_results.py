"""``python -m src.tools.check_results FILE [--strict]``: the entry point of the results validator
(:mod:`src.results.check`)."""

from src.results.check import main

if __name__ == "__main__":
    raise SystemExit(main())
