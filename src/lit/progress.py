"""A predict progress bar over prompts that shows each method's running speedup against the baseline."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from src.results.schema import Totals


class RunningSpeedup:
    """Each method's ``speedup`` so far (src.results.schema's aggregate: geometric mean of per-prompt ratios) and errors."""

    def __init__(self) -> None:
        self.totals: dict[str, Totals] = defaultdict(Totals)

    def update(self, records: list[dict[str, Any]]) -> None:
        for record in records or []:
            self.totals[record["method"]].add(record)

    def postfix(self) -> str:
        """``speculative 1.21x, specexec 0.87x`` (baseline left out; ``!N`` marks N errors)."""
        parts = []
        for method in sorted(self.totals):
            values = self.totals[method].aggregate()
            if method == "baseline" and not values["errors"]:
                continue
            text = f"{method} {values['speedup']:.2f}x" if values["speedup"] else method
            parts.append(text + (f" !{values['errors']}" if values["errors"] else ""))
        return ", ".join(parts)


class SpeedupTQDMProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar; in predict its postfix is the running speedup of every method."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self.running = RunningSpeedup()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.running.update(outputs)
        if self.predict_progress_bar is not None:
            self.predict_progress_bar.set_postfix_str(self.running.postfix(), refresh=False)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


class SpeedupRichProgressBar(RichProgressBar):
    """Lightning's rich bar (its default when ``rich`` is installed); in predict the description carries the speedups."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, theme=None, console_kwargs=None) -> None:
        kwargs = {"theme": theme} if theme is not None else {}
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs, **kwargs)
        self.running = RunningSpeedup()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.running.update(outputs)
        postfix = self.running.postfix()
        if self.progress is not None and self.predict_progress_bar_id is not None and postfix:
            self.progress.update(self.predict_progress_bar_id, description=f"{self.predict_description} ({postfix})")
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def use_speedup_progress_bar(trainer) -> None:
    """Swap Lightning's default bar for its speedup-showing subclass; a bar the user configured is kept as is."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) is TQDMProgressBar:
            trainer.callbacks[index] = SpeedupTQDMProgressBar(callback.refresh_rate, callback.process_position)
        elif type(callback) is RichProgressBar:
            trainer.callbacks[index] = SpeedupRichProgressBar(
                callback.refresh_rate, callback._leave, callback.theme, callback._console_kwargs
            )
