"""Results: the record contract and everything that reads or writes results. No torch, no Lightning.

- ``schema.py``: every record field and every aggregate, defined once (``python -m src.results.schema``);
- ``records.py``: building a record (ok / error), run fingerprints and resume keys, the baseline comparison;
- ``files.py``: output-file safety (never an input, never another program's file), data-parallel part files;
- ``check.py``: the validator (``python -m src.tools.check_results``);
- ``summary.py``: the console summary table;
- ``report/``: the Markdown / HTML / PNG report (``python -m src.report``), cut along its sections.

JSONL reading, appending and repair live in :mod:`src.jsonl`, which the data stores share. The import rule
(tests/test_layers.py): this package imports nothing from decoding, models, data or lit, and nothing in decoding,
models or data imports it.
"""
