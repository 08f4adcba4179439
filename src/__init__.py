"""sp-samp: speculative decoding trainer and evaluator (baseline, speculative sampling, SpecExec, AutoJudge).

Layout: ``src/decoding`` holds the algorithms (plain torch + transformers), ``src/models`` loads model
pairs, ``src/data`` reads prompt sets, ``src/lit`` adapts all of it to Lightning, ``src/cli.py`` is the
LightningCLI entry (``python -m src``).
"""

__version__ = "0.1.0"
