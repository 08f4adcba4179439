"""The command line: ``python -m src {fit,predict} --config configs/<name>.yaml [--config more.yaml] [--key value]``.

A thin ``LightningCLI`` subclass. Models and data modules are chosen in the YAML with
``class_path``/``init_args``; repeated ``--config`` files compose (later ones override earlier ones), which
is how the model presets under ``configs/models/`` are combined with a method config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from src.cli_help import subcommand_help
from src.errors import InvalidParameterError, MissingInputError, UserInputError
from src.lit import interrupts
from src.lit.distributed import release_process_group
from src.lit.interrupts import RunInterrupted
from src.lit.module import check_seed
from src.lit.progress import use_speedup_progress_bar
from src.lit.reporting import MetricsReporter
from src.lit.results import ResultsWriter
from src.results.files import OutputLock, check_output_path
from src.results.summary import format_summary_table

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_presets() -> list[str]:
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(str(p.relative_to(CONFIG_DIR.parent)) for p in CONFIG_DIR.rglob("*.yaml"))


def check_config_paths(args: list[str]) -> None:
    """An unknown preset is a one-line error that lists the presets that exist (before jsonargparse's own)."""
    for i, arg in enumerate(args):
        path = None
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path and not path.lstrip().startswith(("{", "model:", "data:", "trainer:")) and not Path(path).is_file():
            presets = ", ".join(available_presets()) or "(none found)"
            raise MissingInputError(f"config file {path!r} does not exist: use one of {presets}")


def check_headless() -> None:
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if display:
        raise InvalidParameterError(
            f"--require_headless is set but a display is attached (DISPLAY={display!r}): "
            "unset DISPLAY / WAYLAND_DISPLAY or drop --require_headless"
        )


def quiet_libraries(verbose: bool) -> None:
    """Keep the console to our own lines: Lightning's tips and accelerator lines, wandb's ~90 lines per run and
    transformers' weight-loading bars only with ``--verbose``. Warnings and errors always show."""
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def group_wandb_runs(trainer, experiment: str) -> None:
    """Put this run's wandb run in group ``experiment`` with job_type ``compare`` (set before the run starts)."""
    for logger in trainer.loggers:
        init = getattr(logger, "_wandb_init", None) if type(logger).__name__ == "WandbLogger" else None
        if init is not None and getattr(logger, "_experiment", None) is None:
            if init.get("anonymous") is None:  # Lightning always passes it; wandb then warns it has no effect
                init.pop("anonymous", None)
            init["group"] = init.get("group") or experiment
            init["job_type"] = init.get("job_type") or "compare"


def finish_wandb_runs(trainer) -> None:
    """Close the wandb runs now: an offline run writes its final summary when it finishes."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if type(logger).__name__ == "WandbLogger" else None
        if run is not None and hasattr(run, "finish"):
            run.finish()


class StopOnSignal(L.Callback):
    """SIGINT / SIGTERM during a run (src.lit.interrupts): predict stops between prompts, everything else at once.

    Lightning installs its own SIGTERM handler just before the loops start; the loop-start hooks put ours back.
    """

    def __init__(self) -> None:
        self.decoding = False  # inside predict's loop over prompts
        self.decoded = False  # the loop has ended (stopped or not)
        self.interrupted_in_loop = False  # a stop at once ended the loop between its start and its end

    def setup(self, trainer, pl_module, stage: str) -> None:
        interrupts.forward_sigterm_to(getattr(trainer.strategy.launcher, "procs", None) or [])

    def on_predict_start(self, trainer, pl_module) -> None:
        interrupts.take_over()
        self.decoding = True
        interrupts.stop_between_prompts(True)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if interrupts.requested() is not None:
            # Lightning's predict loop has no should_stop; it ends on StopIteration, also raised by the hooks of a
            # step, and then runs on_predict_end as after the last prompt: the summary, the wandb runs and the
            # part-file merge happen as in a complete run.
            raise StopIteration

    def on_predict_end(self, trainer, pl_module) -> None:
        self._leave_loop()

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        interrupts.take_over()

    def on_train_start(self, trainer, pl_module) -> None:
        interrupts.take_over()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.interrupted_in_loop = self.decoding
        self._leave_loop()

    def _leave_loop(self) -> None:
        self.decoded = self.decoded or self.decoding
        self.decoding = False
        interrupts.stop_between_prompts(False)


# The options of ours next to LightningCLI's: name -> (type, default, help). ``--help`` lists them first.
RUN_OPTIONS: dict[str, tuple[object, object, str]] = {
    "output": (str, "datasets/results.jsonl", "predict: the JSONL results file (created with its first record)"),
    "resume": (bool, False, "predict: continue an existing results file (prompts already ok there with this "
                            "configuration are skipped; a different configuration is refused)"),
    "resume_as_new_config": (bool, False, "predict: with --resume, add this configuration next to different ones "
                                          "already in the file (its records are keyed apart by their fingerprint)"),
    "experiment": (str | None, None, "predict: wandb group of the run (default: the first config's file name)"),
    "verbose": (bool, False, "show Lightning's, wandb's and transformers' own messages and progress bars"),
    "require_headless": (bool, False, "refuse to run when a display is attached"),
}


class SpSampCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only the two jobs of this tool: ``fit`` (train the AutoJudge judge or an EAGLE draft head, as the config says)
        and ``predict`` (decode and measure)."""
        return {key: value for key, value in LightningCLI.subcommands().items() if key in ("fit", "predict")}

    def add_arguments_to_parser(self, parser) -> None:
        for name, (type_, default, help_text) in RUN_OPTIONS.items():
            parser.add_argument(f"--{name}", type=type_, default=default, help=help_text)

    def instantiate_trainer(self, **kwargs):
        """A ``--trainer.*`` value Lightning refuses (``--trainer.devices abc``) is the user's mistake: one line."""
        if self.subcommand == "fit":
            self.check_model_trains()
        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError) as error:
            if isinstance(error, UserInputError):
                raise
            raise InvalidParameterError(
                f"{error} (a --trainer.* value: `python -m src predict --help-all` lists them)"
            ) from error

    def check_model_trains(self) -> None:
        """Fit with a predict config (a decoding module has no training_step): say so before Lightning's own
        error, which blames a --trainer.* value."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if is_overridden("training_step", self.model, L.LightningModule):
            return
        configs = " ".join(str(path) for path in self.config[self.subcommand].get("config") or []) or "this config"
        raise InvalidParameterError(
            f"{configs} is not a training config ({type(self.model).__name__} trains nothing): run it with "
            "`python -m src predict`, or fit with a training config, e.g. configs/autojudge.yaml or configs/eagle.yaml"
        )

    def init_parser(self, **kwargs):
        """Parse errors raise (``python -m src`` prints them as one line) instead of a 70-line usage dump."""
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        quiet_libraries(verbose=bool(config.get("verbose")))

    def _run_subcommand(self, subcommand: str) -> None:
        self.stop_on_signal = StopOnSignal()
        self.trainer.callbacks.append(self.stop_on_signal)
        try:
            super()._run_subcommand(subcommand)
        except RunInterrupted as stop:
            if stop.message is None:  # stopped at once (not between prompts): say what is kept
                stop.message = self.fit_stop_message(stop) if subcommand == "fit" else self.stopped_predict(stop)
            raise
        finally:
            if getattr(self, "output_lock", None) is not None:
                self.output_lock.release()
                self.output_lock = None

    def _set_seed(self) -> None:
        """Seed with ``--model.seed`` when ``--seed_everything`` is left at its default, so the one seed a user
        sets is the one used (and a --verbose "Seed set to" line names it)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        model_seed = config.get("model.init_args.seed") if config.get("model.init_args") else None
        if config.get("seed_everything") == self.seed_everything_default and isinstance(model_seed, int):
            check_seed(model_seed)  # the module's own check, before Lightning's seed_everything raises
            config["seed_everything"] = model_seed
        super()._set_seed()

    def before_predict(self) -> None:
        config = self.config[self.subcommand]
        if config.require_headless:
            check_headless()
        # Fail fast on bad data or an unwritable output before any model weights load.
        prompts = self.datamodule.load_prompts() if hasattr(self.datamodule, "load_prompts") else None
        world_size = self.trainer.world_size
        if isinstance(getattr(self.trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            raise InvalidParameterError(
                "a spawning strategy (ddp_spawn, ddp_notebook, ...) is not supported by predict: "
                "use --trainer.strategy ddp for data-parallel predict"
            )
        if self.trainer.limit_predict_batches == 0:
            raise InvalidParameterError(
                "--trainer.limit_predict_batches 0 decodes no prompt (and writes no file): drop it, or give the "
                "number of prompts to run (--data.limit N does the same)"
            )
        if prompts is not None and 0 < len(prompts) < world_size:
            raise InvalidParameterError(
                f"{len(prompts)} prompts cannot be shared by {world_size} processes (each needs one): "
                f"use --trainer.devices {len(prompts)} or fewer, or more prompts"
            )
        # Under data parallelism every rank runs this; rank 0 alone checks (and creates) the output: a rank
        # started after it would find the file it created. The writer agrees on the rest in its ``setup``.
        output = Path(config.output)
        if self.trainer.is_global_zero:
            output = check_output_path(output, config.resume, self.input_paths())
            self.output_lock = OutputLock.acquire(output)  # released when the run ends (by the kernel on kill -9)
        self.results_writer = ResultsWriter(output, resume=config.resume, new_config=config.resume_as_new_config)
        self.trainer.callbacks.append(self.results_writer)
        experiment = config.experiment or self.config_stem()
        group_wandb_runs(self.trainer, experiment)
        self.reporter = MetricsReporter(config=self.config_dict(), experiment=experiment)
        self.trainer.callbacks.append(self.reporter)
        use_speedup_progress_bar(self.trainer)

    def input_paths(self) -> list[str]:
        """Every file this run reads: the configs, the prompt file, the judges and heads of the methods."""
        paths = [str(path) for path in self.config[self.subcommand].get("config") or []]
        for holder in (self.datamodule, self.model):
            if hasattr(holder, "input_files"):
                paths += holder.input_files()
        return paths

    def config_stem(self) -> str:
        paths = self.config[self.subcommand].get("config") or []
        return Path(str(paths[0])).stem if paths else "sp-samp"

    def config_dict(self) -> dict:
        """The resolved configuration of this run (JSON-safe), for the loggers."""
        return json.loads(json.dumps(self.config[self.subcommand].as_dict(), default=str))

    def after_predict(self) -> None:
        """Rank 0 prints the summary and the record counts (totals over every rank); every rank exits non-zero
        when every record failed, with 128 + the signal's number when a signal stopped it between prompts."""
        writer = self.results_writer
        if self.trainer.is_global_zero:
            if self.reporter.summary:
                print("\n" + format_summary_table(self.reporter.summary))
            self.print_record_counts()
        finish_wandb_runs(self.trainer)
        release_process_group()
        if writer.stopped_by is not None:
            stop = RunInterrupted(writer.stopped_by)
            stop.message = self.predict_stop_message(stop, f"after {writer.prompts_done} of {self.prompt_count()} prompts")
            raise stop
        if writer.written and not writer.ok:
            raise SystemExit(f"error: every record failed; see the 'error' fields in {writer.output}")

    def print_record_counts(self) -> None:
        writer = self.results_writer
        if not writer.output.exists():
            print(f"wrote 0 records: no file created ({writer.output})", flush=True)
            return
        skipped = f", {writer.already_done} already done" if writer.already_done else ""
        print(f"wrote {writer.written} records ({writer.ok} ok{skipped}) to {writer.output}", flush=True)

    def prompt_count(self) -> int:
        return len(getattr(self.datamodule, "prompts", None) or [])

    def predict_stop_message(self, stop: RunInterrupted, where: str, left: str = "") -> str:
        writer = getattr(self, "results_writer", None)
        left = left or f"{self.prompt_count() - (writer.prompts_done if writer is not None else 0)} prompts left"
        command = interrupts.resume_command(interrupts.argv() or sys.argv[1:], resume=True)
        return f"stopped by {stop.what} {where}, {left}; resume with: {command}"

    def stopped_predict(self, stop: RunInterrupted) -> str:
        """A predict stopped at once: rank 0 prints the counts so far; the wandb runs are closed."""
        writer = getattr(self, "results_writer", None)
        callback = self.stop_on_signal
        left, started = "", writer is not None and (callback.decoding or callback.decoded)
        if not started:
            where = "before the first prompt"
        elif self.trainer.world_size > 1:  # each rank knows its own prompts only
            where = "while the ranks decoded"
            left = "the ranks' part files are folded into the output by the resume"
        elif callback.interrupted_in_loop:
            where = f"after {writer.prompts_done} of {self.prompt_count()} prompts (the one in flight is not written)"
        else:
            where = f"after {writer.prompts_done} of {self.prompt_count()} prompts"
        if started and self.trainer.is_global_zero and self.trainer.world_size == 1:
            self.print_record_counts()
        try:
            finish_wandb_runs(self.trainer)
        except Exception:  # a wandb run that cannot finish must not hide why the run stopped
            pass
        return self.predict_stop_message(stop, where, left)

    def fit_stop_message(self, stop: RunInterrupted) -> str:
        """What a stopped fit keeps: the label / feature store continues on the next fit; so may a checkpoint."""
        store = getattr(self.datamodule, "store", None)
        kind = getattr(store, "kind", None)  # the stores name themselves (src.data.mining, src.data.features)
        root = getattr(store, "root", None)
        if kind and root is not None:
            kept = f"the {kind} {root} keeps what was done and the same command continues it (training starts over)"
        else:
            kept = "nothing is kept (training starts over)"
        last = [Path(c.dirpath) / "last.ckpt" for c in self.trainer.checkpoint_callbacks
                if getattr(c, "save_last", False) and getattr(c, "dirpath", None)]
        if any(path.is_file() for path in last):
            kept += f"; add --ckpt_path last to continue training from {next(p for p in last if p.is_file())}"
        command = interrupts.resume_command(interrupts.argv() or sys.argv[1:], resume=False)
        return f"stopped by {stop.what} during fit: {kept}; rerun: {command}"

    def before_fit(self) -> None:
        if self.config[self.subcommand].require_headless:
            check_headless()

    def after_fit(self) -> None:
        release_process_group()


def cli_main(args: list[str] | None = None, run: bool = True) -> SpSampCLI:
    """Parse ``args`` (default: the command line), build model, data and trainer, and run the subcommand.

    ``run=False`` only builds them (tests use it to check that every shipped config instantiates); ``args``
    then omit the subcommand. ``predict --help`` / ``fit --help`` print our short help (exit 0);
    ``--help-all`` is LightningCLI's full one.
    """
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # lightning's own, not actionable here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # --help-all rewrites
    argv = sys.argv[1:] if args is None else list(args)
    check_config_paths(argv)
    if argv and argv[0] in ("predict", "fit") and {"--help", "-h"} & set(argv):
        print(subcommand_help(argv[0], argv, {name: option[2] for name, option in RUN_OPTIONS.items()}))
        raise SystemExit(0)
    argv = ["--help" if arg == "--help-all" else arg for arg in argv]
    return SpSampCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        seed_everything_default=0,
        trainer_defaults={"logger": False, "enable_checkpointing": False, "devices": 1},
        args=argv,
        run=run,
    )
