"""A predict progress bar over prompts that shows each method's running speedup against the baseline."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class RunningSpeedup:
    """Geometric mean of the per-prompt ``speedup`` of each method so far, and its error count."""

    def __init__(self) -> None:
        self.log_sum: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)

    def update(self, records: list[dict[str, Any]]) -> None:
        for record in records or []:
            method = record["method"]
            if record.get("status") != "ok":
                self.errors[method] += 1
            elif record.get("speedup"):
                self.log_sum[method] += math.log(record["speedup"])
                self.count[method] += 1

    def postfix(self) -> str:
        """``speculative 1.21x, specexec 0.87x`` (baseline left out; ``!N`` marks N errors)."""
        parts = []
        for method in sorted(set(self.count) | set(self.errors)):
            if method == "baseline" and not self.errors[method]:
                continue
            text = f"{method} {math.exp(self.log_sum[method] / self.count[method]):.2f}x" if self.count[method] else method
            parts.append(text + (f" !{self.errors[method]}" if self.errors[method] else ""))
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
