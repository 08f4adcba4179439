"""Summarise results JSONL files into a Markdown and a self-contained HTML report with PNG plots.

    python -m src.report RESULTS.jsonl [MORE.jsonl ...] --out DIR [--seed 0] [--bootstrap 2000]
    python -m src.report RESULTS.jsonl --merge-configs --out DIR
    python -m src.report A.jsonl B.jsonl --compare --out DIR

Writes ``DIR/report.md`` (tables, links to the PNGs next to it), ``DIR/report.html`` (the same with the
plots embedded as data URIs: it opens without a server) and ``DIR/*.png``. Several files are merged into
one report; with ``--compare`` and exactly two files each file gets its own section (A, B) and a
comparison section gives B/A per method. Malformed lines (a run killed mid-write) and error records are
counted and listed, never dropped silently. A binary or non-UTF-8 input is refused (exit status 2).

Within a section (all files, or one side of ``--compare``):

- duplicates: a record with the same (run_id, resume_key, status) as an earlier one (a file appended twice,
  the same file passed twice) counts once; a warning on stderr and the Input list name their lines. Records
  without a run_id or resume_key are never dropped.
- configurations: records of one method whose settings differ are not pooled silently. The settings are the
  record's ``fingerprint`` (grouped by ``fingerprint_id``); a method with records written before fingerprints
  is compared on ``params`` and the target's and draft's name, dtype and quantization instead. A method with
  several configurations gets one row per configuration, ``<method> #1``, ``#2``... in file order, and a note
  under the summary table lists the fields that differ (dotted keys, ``target.dtype: float32 vs bfloat16``).
  ``--merge-configs`` pools them in one row as before, and the note says which fields differ. ``--compare``
  splits each side on its own and pairs rows by label.

Definitions (a "prompt" is one ``ok`` record: one (dataset, prompt_id, turn) of one method):

- every aggregate (tok/s = ``throughput``, x base = ``throughput_ratio``, speedup, tokens per call, acceptance,
  "= base", accuracy, time shares, predicted tok/s, what-if figures) is :func:`src.schema.aggregate`, the same
  code the console table and wandb use; ``python -m src.schema`` prints every definition. In short:
  tok/s = sum ``new_tokens`` / sum ``wall_s``; speedup = geometric mean over prompts of ``speedup`` (tokens/s
  over the baseline's on the same prompt+turn); x base = tok/s over the tok/s of the baseline of the same configuration (same
  fingerprint but for the method's own parts: same target, prompt formatting and sampling; without fingerprints the
  target's name, dtype, quantization and the sampling params) in the same category; "-" and a note where the input
  holds no such baseline.
- 95% confidence intervals are percentile bootstraps over prompts: ``rng = numpy.random.default_rng(seed)``,
  fresh for every statistic (a number does not depend on what else the report holds), one draw
  ``idx = rng.integers(0, n, size=(resamples, n))``, the statistic on every row of ``idx`` (speedup: the mean
  of the log speedups), then ``numpy.percentile(values, [2.5, 97.5])`` (linear interpolation), exponentiated
  for the speedup. No interval with fewer than 2 prompts.
- compare: per row (method or configuration), the B/A ratio of mean tokens/s and of tokens per target call.
  Records are paired by (dataset, prompt_id, turn) (the last ok record of a key wins); with >= 2 pairs only
  the pairs count and one index matrix resamples them, otherwise A and B are resampled independently (A's
  matrix drawn first, then B's, from the same generator). "within noise" when the ratio's CI contains 1.
"""
