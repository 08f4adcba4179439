"""ResultsWriter: appends each record to the JSONL output as soon as its prompt is done; reads it back to resume.

Under a data-parallel strategy (``--trainer.devices N --trainer.strategy ddp``) every rank appends its records to
its own part file ``<output>.rank<R>.part`` next to the output; at the end of predict rank 0 merges the parts into
the output (in prompt order, each ``ok`` resume key once) and deletes them. Part files left by a killed run are
folded into the output by the next ``--resume true`` run before it starts, so their records are not redone.

A SIGINT / SIGTERM never cuts a line (src.lit.interrupts): the stop waits for the end of the prompt's records,
of a repair or of a merge.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from src.errors import OutputExistsError, OutputNotWritableError, UserInputError
from src.jsonl import repair_lines
from src.lit import interrupts
from src.lit.distributed import gather_from_ranks
from src.results.files import merge_parts, part_files, part_path, prompt_order, read_ok_records
from src.results.records import fingerprint_differences, fingerprint_id

log = logging.getLogger(__name__)


class ResultsWriter(L.Callback):
    """Writes records line by line and flushes each, so a killed run loses at most the prompt in flight (per rank).

    In ``setup`` (every rank, before the models load): rank 0 repairs lines cut by a killed run, folds part files
    left by a killed data-parallel run into the output (``--resume true``) and checks that the records already
    there were made with this run's configuration (its run fingerprint); the ok records are shared with every
    rank, as is rank 0's ``run_id``, so every record of one data-parallel run carries the same ``run_id``. With
    one process the records go straight to the output; with several, to this rank's part file, merged by rank 0
    in ``on_predict_end``. Files are created with their first record.

    ``written`` / ``ok`` count this run's records and ``prompts_done`` the prompts it went through (new records or
    not): after predict, over all ranks. ``stopped_by``: after predict, the signal that stopped it between
    prompts on any rank (None when it went through every prompt).

    Args:
        output: the results JSONL file.
        resume: continue ``output``: prompts already ``ok`` there (same configuration) are skipped.
        new_config: on resume, add this run's configuration next to different ones already in ``output`` (its
            records are keyed apart by their fingerprint) instead of refusing.
    """

    def __init__(self, output: str | Path, resume: bool = False, new_config: bool = False) -> None:
        self.output = Path(output)
        self.resume = resume
        self.new_config = new_config
        self.previous: dict[str, dict[str, Any]] = {}  # resume_key -> ok record of an earlier run
        # ok records of this run's configuration among them (the others, kept by --resume_as_new_config, are
        # not "already done" by this run)
        self.already_done = 0
        self.written = 0
        self.ok = 0
        self.prompts_done = 0
        self.stopped_by: int | None = None
        self.target = self.output  # the file this process appends to
        self.world_size = 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        strategy = trainer.strategy
        self.world_size = trainer.world_size
        self.written = self.ok = self.prompts_done = 0
        self.stopped_by = None
        problem, previous, already_done = None, {}, 0
        if trainer.is_global_zero:
            try:
                with interrupts.deferred():  # a repair or a fold rewrites the output
                    previous = self._prepare_output(prompt_order(trainer.datamodule))
                fingerprints = self._fingerprints(pl_module, trainer.datamodule) if previous else None
                self._check_configuration(previous, fingerprints)
                already_done = self._count_this_configuration(previous, fingerprints)
            except (OSError, ValueError) as error:  # raised on every rank alike below: no rank is left waiting
                problem = error
                if isinstance(error, OSError) and not isinstance(error, UserInputError):  # e.g. a disk still full
                    problem = OutputNotWritableError(
                        f"cannot prepare {self.output} for the resume ({error.strerror or error}): its records are "
                        "kept as they were; free space (or fix the location) and rerun with --resume true"
                    )
        problem, previous, already_done = strategy.broadcast((problem, previous, already_done), src=0)
        if problem is not None:
            raise problem
        self.previous = previous
        self.already_done = already_done
        if hasattr(pl_module, "previous_records"):
            pl_module.previous_records = self.previous
        if hasattr(pl_module, "run_id"):  # one run id for the records of every rank
            pl_module.run_id = strategy.broadcast(pl_module.run_id, src=0)
        self.target = part_path(self.output, trainer.global_rank) if self.world_size > 1 else self.output
        if self.world_size > 1 and self.target.exists():  # rank 0 folded or refused every leftover part
            raise OutputExistsError(f"part file {self.target} appeared during setup: is another run writing here?")
        strategy.barrier("results_writer_setup")

    def _prepare_output(self, order: dict[tuple[str, str], int] | None = None) -> dict[str, dict[str, Any]]:
        """Rank 0: repair cut lines and fold leftover part files into the output (resume only); read its ok records."""
        leftovers = part_files(self.output)
        if leftovers and not self.resume:
            raise OutputExistsError(f"part files of an earlier run of {self.output} exist: pass --resume true")
        if not self.resume:
            return {}
        for path in [self.output, *leftovers]:
            repair_lines(path)
        if leftovers:
            appended, ok = merge_parts(self.output, leftovers, order)
            log.warning(
                "folded %d records (%d ok) from %d part files of a killed run into %s",
                appended, ok, len(leftovers), self.output,
            )
        return read_ok_records(self.output)

    @staticmethod
    def _fingerprints(pl_module, datamodule) -> dict[str, dict[str, Any]] | None:
        """method key -> this run's fingerprint (None for a module without fingerprints)."""
        if not hasattr(pl_module, "fingerprints"):
            return None
        options = datamodule.prompt_options() if hasattr(datamodule, "prompt_options") else {}
        return pl_module.fingerprints(options)

    @staticmethod
    def _count_this_configuration(previous: dict[str, dict[str, Any]], fingerprints: dict | None) -> int:
        """The ok records a resume of this configuration reuses: its resume keys hold the fingerprint, so a
        record of another fingerprint (kept next to it by --resume_as_new_config) is never one of them."""
        if fingerprints is None:
            return len(previous)
        ids = {method_key: fingerprint_id(fingerprint) for method_key, fingerprint in fingerprints.items()}
        return sum(ids.get(record.get("method")) == record.get("fingerprint_id") for record in previous.values())

    def _check_configuration(self, previous: dict[str, dict[str, Any]], fingerprints: dict | None) -> None:
        """Refuse a resume whose configuration differs from the one the output's records were made with.

        Per method key: if the output holds ok records of it and none has this run's fingerprint, continuing
        would put two configurations under one name (e.g. a float32 and a bfloat16 target). ``new_config``
        adds this one next to them instead: the resume keys hold the fingerprint, so the records stay apart.
        """
        if not previous or self.new_config or fingerprints is None:
            return
        for method_key, fingerprint in fingerprints.items():
            theirs = [r for r in previous.values() if r.get("method") == method_key]
            if not theirs or any(r.get("fingerprint_id") == fingerprint_id(fingerprint) for r in theirs):
                continue
            differences = fingerprint_differences(theirs[-1].get("fingerprint"), fingerprint)
            more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
            raise OutputExistsError(
                f"--resume would mix configurations in {self.output}: its {method_key!r} records differ from this "
                f"run in {'; '.join(differences[:2])}{more}: pass --resume_as_new_config true to add this "
                "configuration next to them (keyed apart), or choose another --output"
            )

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        try:
            with interrupts.deferred():  # a prompt's records are all written or, when stopped before, none
                self.target.parent.mkdir(parents=True, exist_ok=True)
                with self.target.open("a", encoding="utf-8") as handle:
                    for record in outputs or []:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                        handle.flush()
                        self.written += 1
                        self.ok += record.get("status") == "ok"
                self.prompts_done += 1
        except OSError as error:
            raise OutputNotWritableError(
                f"cannot append to {self.target} ({error.strerror or error}): the {self.written} records written "
                "before are kept; free space (or fix the location) and rerun with --resume true"
            ) from error

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.world_size <= 1:
            self.stopped_by = interrupts.requested()
            return
        strategy = trainer.strategy
        strategy.barrier("results_writer_merge")  # every rank has finished its part
        progress = gather_from_ranks((self.prompts_done, interrupts.requested()))
        self.prompts_done = sum(done for done, _ in progress)
        self.stopped_by = next((signum for _, signum in progress if signum is not None), None)
        merged, problem = (0, 0), None
        if trainer.is_global_zero:
            parts = [p for p in (part_path(self.output, rank) for rank in range(self.world_size)) if p.exists()]
            try:
                with interrupts.deferred():
                    merged = merge_parts(self.output, parts, prompt_order(trainer.datamodule)) if parts else (0, 0)
            except (OSError, ValueError) as error:
                problem = OutputNotWritableError(f"cannot merge the part files into {self.output}: {error}")
        merged, problem = strategy.broadcast((merged, problem), src=0)
        if problem is not None:
            raise problem
        self.written, self.ok = merged  # the totals over all ranks
        self.target = self.output
