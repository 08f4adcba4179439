"""MetricsReporter: updates the per-method torchmetrics during predict and reports them at its end.

``self.log`` is not available in predict hooks, so the computed metrics go straight to every logger in
``trainer.loggers`` (WandbLogger, CSVLogger, ...) at the end, plus a printed summary table; a WandbLogger
also receives the per-prompt records as a ``wandb.Table``.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from src.lit.distributed import gather_from_ranks
from src.lit.metrics import DecodingMetrics
from src.results.report.plots import plot_blocks
from src.results.report.stats import stats_by_method_category
from src.results.summary import summarize

TABLE_COLUMNS = (
    "method", "prompt_id", "category", "turn", "status", "new_tokens", "tokens_per_s", "speedup",
    "tokens_per_target_call", "acceptance_rate", "matches_baseline", "answer", "answer_correct", "judge_accepted",
    "text",
)


class MetricsReporter(L.Callback):
    def __init__(self, config: dict[str, Any] | None = None, experiment: str = "sp-samp") -> None:
        self.config = config or {}
        self.experiment = experiment  # the wandb group of this run's per-method runs
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
        # ``compute()`` reduces the states over all processes, so every rank computes every metric, in the same
        # order (a rank whose shard had no record of a method still takes part); a method with no new record on
        # any rank (all resumed) is then left out.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*called before the.*update.*")
            computed = {key: metric.compute() for key, metric in self.metrics.items()}
        self.summary = summarize({key: values for key, values in computed.items() if values["records"]})
        profile = getattr(pl_module, "profile", None)  # the run's cost profile goes into the logged config
        if profile is not None:
            self.config = {**self.config, "cost_profile": profile.to_json()}
        if trainer.world_size > 1 and trainer.loggers:  # the records table covers every rank's prompts
            self.records = [record for part in gather_from_ranks(self.records) for record in part]
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
        """The run of a WandbLogger (job_type ``compare``) gets the records table, the per-method summary and the
        report's plots; each method also gets its own run in the same group (job_type = the method), so the
        standard wandb run table compares methods column by column."""
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        if not isinstance(logger, WandbLogger):
            return
        import wandb

        run = logger.experiment
        rows = [[_cell(r.get(c)) for c in TABLE_COLUMNS] for r in self.records]
        run.log({"records": wandb.Table(columns=list(TABLE_COLUMNS), data=rows)})
        for method, values in self.summary.items():
            run.summary.update({f"{method}/{name}": value for name, value in _scalars(values).items()})
        images = {f"plots/{name}": wandb.Image(png_image(png), caption=title) for name, title, png in report_plots(self.records)}
        if images:
            run.log(images)
        self._log_method_runs(logger)

    def _log_method_runs(self, logger) -> None:
        import wandb

        init = getattr(logger, "_wandb_init", {})  # the logger's own wandb.init arguments (project, dir, ...)
        group = init.get("group") or self.experiment
        for method, values in self.summary.items():
            params = next((r.get("params") for r in self.records if r["method"] == method), {}) or {}
            method_run = wandb.init(
                project=init.get("project"), dir=init.get("dir"), group=group, job_type=method.split("[")[0],
                name=f"{group}/{method}", config={"method": method, **params, "experiment": group},
                reinit="create_new",
            )
            method_run.summary.update(_scalars(values))
            method_run.finish()


def _scalars(values: dict[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def report_plots(records: list[dict[str, Any]]) -> list[tuple[str, str, bytes]]:
    """(name, title, PNG bytes) of the comparison report's plots over these records (those with data)."""
    stats = stats_by_method_category(records, seed=0, resamples=200)
    return [(b[1].name.removesuffix(".png"), b[1].title, b[1].png) for b in plot_blocks(records, stats, 2, "") if b[0] == "img"]


def png_image(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png))


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)
