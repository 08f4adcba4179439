"""MetricsReporter: updates the per-method torchmetrics during predict and reports them at its end.

``self.log`` is not available in predict hooks, so the computed metrics go straight to every logger in
``trainer.loggers`` (WandbLogger, CSVLogger, ...) at the end, plus a printed summary table; a WandbLogger
also receives the per-prompt records as a ``wandb.Table``.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from src.metrics import DecodingMetrics, summarize

TABLE_COLUMNS = (
    "method", "prompt_id", "category", "turn", "status", "new_tokens", "tokens_per_s", "speedup",
    "tokens_per_target_call", "acceptance_rate", "matches_baseline", "answer", "answer_correct", "judge_accepted",
    "text",
)


class MetricsReporter(L.Callback):
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}
        self.metrics: dict[str, DecodingMetrics] = {}
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, dict[str, Any]] = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        # One metric per method key, created up front so every process holds the same set (needed to reduce).
        for key in getattr(pl_module, "method_keys", []):
            self.metrics[key] = DecodingMetrics().to(pl_module.device)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for record in outputs or []:
            metric = self.metrics.setdefault(record["method"], DecodingMetrics().to(pl_module.device))
            metric.update(record)
            self.records.append(record)

    def on_predict_end(self, trainer, pl_module) -> None:
        # A method with no new record (all resumed) has nothing to compute.
        computed = {key: metric.compute() for key, metric in self.metrics.items() if metric.update_count}
        self.summary = summarize(computed)
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer) -> None:
        if not self.summary:
            return
        scalars = {
            f"{method}/{name}": value
            for method, values in self.summary.items()
            for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for logger in trainer.loggers:
            if self.config:
                logger.log_hyperparams(self.config)
            logger.log_metrics(scalars, step=0)
            self._log_wandb_extras(logger)
            logger.save()

    def _log_wandb_extras(self, logger) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        if not isinstance(logger, WandbLogger):
            return
        import wandb

        rows = [[_cell(r.get(c)) for c in TABLE_COLUMNS] for r in self.records]
        logger.experiment.log({"records": wandb.Table(columns=list(TABLE_COLUMNS), data=rows)})
        for method, values in self.summary.items():
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    logger.experiment.summary[f"{method}/{name}"] = value


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)
