"""AutoJudge on the Lightning side: one module and one data module serve both subcommands of
``configs/autojudge.yaml``.

- ``fit``: :class:`JudgeDataModule` mines labels in ``prepare_data`` when its store is missing (reused
  otherwise) and splits them by prompt; :class:`AutoJudgeModule` trains the judge head on them (BCE, AUROC /
  AP / F1 / recall each epoch), keeps the epoch with the best validation AUROC, picks the threshold and exports
  the judge (:mod:`src.models.judge`).
- ``predict``: :class:`AutoJudgeModule` is a :class:`~src.lit.module.DecodingModule` whose ``autojudge``
  methods use that judge; the data module's prompt side (held-out problems) feeds it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryF1Score, BinaryRecall

from src.data.answers import extract_answer
from src.data.mining import LabelStore, mine_prompts
from src.data.progress import phase_progress, shows_progress
from src.decoding.autojudge import AutoJudge
from src.errors import InvalidParameterError, MalformedInputError, MissingInputError
from src.lit.data import PromptDataModule
from src.lit.distributed import gather_unique
from src.lit.module import DecodingModule
from src.models.judge import FeatureLayout, HeadType, Judge, JudgeHead, LabelSet, select_threshold
from src.models.judge_eval import evaluate_judges

log = logging.getLogger(__name__)

MINING_VERSION = "forks/2"  # src.data.mining's labelling: a store mined by another version is refused


def mining_group_size(mine_group: int, remaining_s: float, seconds_per_prompt: float) -> int:
    """Prompts to mine side by side next: ``mine_group``, fewer when the rest of the time budget would not hold
    them: a group cannot stop halfway (a budget checked only between groups of 16 overran 5 s by 99 s).
    ``seconds_per_prompt`` is the slowest per-prompt time a group has taken (0: none mined yet, so one prompt
    measures it); counting every prompt of a group at that rate overestimates a batched group, never under.
    At least one prompt while budget is left: the overrun is at most one prompt's time."""
    if seconds_per_prompt <= 0:
        return 1
    return max(1, min(mine_group, int(remaining_s / seconds_per_prompt)))


def prompt_seed(prompt_id: str, seed: int) -> int:
    """A per-prompt seed (for sampling its mismatches) that does not depend on the order prompts are mined in."""
    return int(hashlib.sha1(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16)


class JudgeDataModule(PromptDataModule):
    """Mined AutoJudge labels for ``fit``; held-out prompts (``path`` etc., see PromptDataModule) for ``predict``.

    Args:
        mine_path: prompts to mine from (a task with a checkable final answer): a GSM8K-format JSONL (the
            paper's choice; ``hub:openai/gsm8k:main`` with ``split: train``), or ``synthetic:arithmetic`` (built-in
            word problems, train split: no file needed).
        mine_split: the split of a ``hub:`` mine_path (``train``; ``split`` is the predict side's, ``test``).
        mine_prompts: how many of them to mine.
        mine_max_new_tokens: length of the target's answers while mining (a prompt whose answer does not end
            within it is skipped: its last number is not a final answer).
        mine_max_mismatches: labels per prompt at most (a seeded sample of its mismatches when it has more).
        mine_time_budget_s: wall-time budget of the whole mining (prompts left are skipped; rerun fit to go
            on). A group runs to its end, so groups are sized to fit what is left of it (the first is one prompt,
            to measure): the budget is overrun by at most about one prompt's time.
        mine_group: prompts whose answers are decoded side by side (:mod:`src.decoding.branches`).
        mine_fork_batch: mismatch continuations decoded side by side at most (one batch row and KV cache each:
            ~9 GB peak at 256 on the embedded pair; lower it for a bigger target).
        store_dir: the label store; mined once, reused by later fits (delete it to mine again).
        answer_extractor: how a final answer is read from a text (see ``src.data.answers.ANSWER_EXTRACTORS``).
        feature_layout: ``draft+target`` hidden states (the paper's default) or ``target`` only.
        val_fraction: share of *prompts* (never single tokens) that pick the epoch and the threshold.
        test_fraction: share of prompts held out from training and from every choice: the judge evaluation
            (AUROC with bootstrap CIs next to trivial judges, :mod:`src.models.judge_eval`) is computed on them.
        batch_size: training batch size.
    """

    def __init__(
        self,
        mine_path: str = "synthetic:arithmetic",
        mine_split: str = "train",
        mine_prompts: int = 48,
        mine_max_new_tokens: int = 256,
        mine_max_mismatches: int = 32,
        mine_time_budget_s: float = 900.0,
        mine_group: int = 16,
        mine_fork_batch: int = 128,
        store_dir: str = "artifacts/autojudge/labels",
        answer_extractor: str = "gsm8k",
        feature_layout: FeatureLayout = "draft+target",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise InvalidParameterError(f"{name}={value} is invalid: use a share in (0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise InvalidParameterError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training prompts: "
                "keep their sum below 1 (e.g. 0.2 + 0.2)")
        for name, value in (("mine_prompts", mine_prompts), ("mine_max_new_tokens", mine_max_new_tokens),
                            ("mine_max_mismatches", mine_max_mismatches), ("mine_group", mine_group),
                            ("mine_fork_batch", mine_fork_batch), ("batch_size", batch_size)):
            if value < 1:
                raise InvalidParameterError(f"{name}={value} is invalid: use a value >= 1")
        self.mine_path = mine_path
        self.mine_split = mine_split
        self.mine_prompts = mine_prompts
        self.mine_max_new_tokens = mine_max_new_tokens
        self.mine_max_mismatches = mine_max_mismatches
        self.mine_time_budget_s = mine_time_budget_s
        self.mine_group = mine_group
        self.mine_fork_batch = mine_fork_batch
        self.store = LabelStore(store_dir)
        self.answer_extractor = answer_extractor
        self.feature_layout = feature_layout
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def load_prompts(self):
        prompts = super().load_prompts()
        check_final_answers(prompts, self.path)
        return prompts

    # ---- mining ---------------------------------------------------------------------------------------------
    def mining_prompts(self):
        source = PromptDataModule(path=self.mine_path, split=self.mine_split, limit=self.mine_prompts, seed=self.seed,
                                  chat_template=self.chat_template, system_prompt=self.system_prompt)
        return check_final_answers(source.load_prompts(), self.mine_path)

    def mining_settings(self, module: DecodingModule) -> dict[str, Any]:
        return {
            "target": module.pair.target.info, "draft": module.pair.draft.info if module.pair.draft else None,
            "mine_path": self.mine_path, "mine_split": self.mine_split, "mine_max_new_tokens": self.mine_max_new_tokens,
            "mine_max_mismatches": self.mine_max_mismatches, "answer_extractor": self.answer_extractor,
            "chat_template": self.chat_template, "system_prompt": self.system_prompt, "seed": self.seed,
            "mining": MINING_VERSION,
        }

    def prepare_data(self) -> None:
        """Mine what the store lacks (all of it the first time); a finished store is only read. Only ``fit``
        mines: ``predict`` with the same config decodes held-out prompts and needs no labels."""
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return
        prompts = self.mining_prompts()
        done = self.store.finished_prompts()
        todo = [p for p in prompts if p.prompt_id not in done]
        if not todo:
            log.info("label store %s: %d prompts already mined", self.store.root, len(done))
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, DecodingModule) or module.draft_spec is None:
            raise InvalidParameterError("mining needs the model's target and draft: use AutoJudgeModule with a draft")
        module.ensure_pair(with_draft=True)
        self.store.open(self.mining_settings(module))
        self._mine(module, todo, len(prompts) - len(todo))

    def _mine(self, module: DecodingModule, prompts, already: int) -> None:
        """Mine ``prompts`` (those of the source not in the store yet; ``already`` of it are) group by group."""
        pair, tokenizer = module.pair, module.pair.tokenizer
        start = time.monotonic()

        def answer_of(tokens: list[int]) -> str | None:
            return extract_answer(tokenizer.decode(tokens, skip_special_tokens=True), self.answer_extractor)

        options = {"chat_template": self.chat_template, "system_prompt": self.system_prompt}

        def encode(prompt) -> list[int]:  # formatted as predict formats a first turn
            return module.first_turn_ids(options, prompt.turns[0])[0][0].tolist()

        labels = important = skipped = mined_prompts = 0
        seconds_per_prompt = 0.0  # the slowest a group has mined per prompt: what sizes the groups near the end
        with phase_progress("mining AutoJudge labels", already + len(prompts), already, "prompt",
                            shows_progress(self.trainer)) as bar:
            while mined_prompts < len(prompts):
                remaining = self.mine_time_budget_s - (time.monotonic() - start)
                if remaining <= 0:
                    break
                size = mining_group_size(self.mine_group, remaining, seconds_per_prompt)
                group = prompts[mined_prompts : mined_prompts + size]
                group_start = time.monotonic()
                mined = mine_prompts(
                    pair.target.model, pair.draft.model, [encode(p) for p in group], self.mine_max_new_tokens,
                    pair.eos_token_ids, answer_of, self.mine_max_mismatches,
                    seeds=[prompt_seed(p.prompt_id, self.seed) for p in group], fork_batch=self.mine_fork_batch,
                )
                seconds = (time.monotonic() - group_start) / len(group)
                seconds_per_prompt = max(seconds_per_prompt, seconds)
                for prompt, result in zip(group, mined):
                    self.store.add(prompt.prompt_id, result, seconds)
                    labels += len(result.mismatches)
                    important += sum(m.label for m in result.mismatches)
                    skipped += result.stopped_by in ("unfinished", "no_answer")
                mined_prompts += len(group)
                minutes = (time.monotonic() - start) / 60
                bar.set_postfix_str(f"{labels} labels ({labels / minutes:.0f}/min), {important} important, "
                                    f"{skipped} skipped", refresh=False)
                bar.update(len(group))
        left = len(prompts) - mined_prompts
        if left:  # after the bar's last line, not inside it
            spent = time.monotonic() - start
            log.warning("mining budget (%g s) spent: stopped after %.1f s, %.1f s over (the prompts in flight "
                        "finished first); %d prompts left; rerun fit to go on", self.mine_time_budget_s, spent,
                        max(0.0, spent - self.mine_time_budget_s), left)
        minutes = (time.monotonic() - start) / 60
        log.info("mined %d labels (%d important) from %d prompts (+%d earlier) in %.1f min (%.1f labels/min) into %s",
                 labels, important, mined_prompts, already, minutes, labels / max(minutes, 1e-9), self.store.root)

    # ---- training data --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return super().setup(stage)
        labels = self.store.load(show_progress=shows_progress(self.trainer))
        if len(labels) == 0:
            raise MissingInputError(
                f"label store {self.store.root} holds no labels: mine more prompts (mine_prompts, "
                "mine_time_budget_s) or use a draft that disagrees with the target more often"
            )
        train_rows, val_rows, test_rows = self.split_by_prompt(labels)
        check_classes(labels, {"train": train_rows, "validation": val_rows, "test": test_rows}, self.store.root)
        features = self.features_of(labels)
        self.labels, self.rows = labels, {"train": train_rows, "val": val_rows, "test": test_rows}
        self.features = features
        self.train_set = TensorDataset(features[train_rows], labels.labels[train_rows])
        # Validation rows carry their index: under DDP every rank scores a shard (padded with repeats to equal
        # sizes) and the epoch's metrics are computed on the gathered rows, each once.
        self.val_set = TensorDataset(features[val_rows], labels.labels[val_rows], torch.arange(len(val_rows)))
        train_labels = labels.labels[train_rows]
        self.feature_mean = features[train_rows].mean(0)
        self.feature_std = features[train_rows].std(0) if len(train_rows) > 1 else torch.ones(features.shape[1])
        self.important_share = float(train_labels.mean()) if len(train_rows) else 0.0
        self.pair_info = {k: self.store.meta().get(k) for k in ("target", "draft")}
        log.info("judge data: %d train / %d val / %d test mismatches, %.0f%% important", len(train_rows),
                 len(val_rows), len(test_rows), 100 * self.important_share)

    def features_of(self, labels: LabelSet) -> torch.Tensor:
        if self.feature_layout == "target":
            return labels.target_hidden
        return torch.cat([labels.draft_hidden, labels.target_hidden], dim=-1)

    def split_by_prompt(self, labels: LabelSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices of train, validation and test, split by prompt with ``seed`` (never across one prompt)."""
        prompts = sorted(set(labels.prompt_ids))
        random.Random(self.seed).shuffle(prompts)
        n_val = math.ceil(self.val_fraction * len(prompts)) if len(prompts) > 2 else 0
        n_test = math.ceil(self.test_fraction * len(prompts)) if len(prompts) > 2 else 0
        part = {p: "val" for p in prompts[:n_val]} | {p: "test" for p in prompts[n_val : n_val + n_test]}
        of_row = [part.get(p, "train") for p in labels.prompt_ids]
        return tuple(torch.tensor([i for i, name in enumerate(of_row) if name == wanted], dtype=torch.long)
                     for wanted in ("train", "val", "test"))

    @property
    def feature_dim(self) -> int:
        return self.train_set.tensors[0].shape[1]

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), shuffle=False)


def check_final_answers(prompts, source: str):
    """A GSM8K-format source whose reference answers carry no ``#### <number>`` is the wrong file: one line.
    (Only some rows without one: a warning; their gold answer is then their last number.)"""
    with_reference = [p for p in prompts if p.reference]
    missing = [p for p in with_reference if "####" not in p.reference[-1] or p.answer is None]
    if missing and len(missing) == len(with_reference):
        raise MalformedInputError(
            f"{source}: none of its {len(with_reference)} answers ends with a GSM8K final answer '#### <number>' "
            f"(prompt {missing[0].prompt_id} is one): AutoJudge labels and accuracy need it; use GSM8K's own files "
            "(hub:openai/gsm8k:main, or its train/test JSONL) or end each answer with '#### <number>'")
    if missing:
        log.warning("%s: %d of %d answers have no '#### <number>' final answer; their gold answer is their last number",
                    source, len(missing), len(with_reference))
    return prompts


MIN_LABELS_PER_CLASS = 5  # fewer important or unimportant labels in a split than this cannot train or rank


def check_classes(labels: LabelSet, splits: dict[str, torch.Tensor], store: Any) -> None:
    """One line naming the split and its counts when a split lacks one of the two classes."""
    for name, rows in splits.items():
        important = int(labels.labels[rows].sum())
        unimportant = len(rows) - important
        if min(important, unimportant) < MIN_LABELS_PER_CLASS:
            raise MissingInputError(
                f"label store {store}: the {name} split has {important} important and {unimportant} unimportant "
                f"labels (at least {MIN_LABELS_PER_CLASS} of each are needed): mine more prompts "
                "(raise data.mine_prompts and data.mine_time_budget_s, then rerun fit: mining resumes)"
            )


def gather_validation_rows(
    scores: list[torch.Tensor], labels: list[torch.Tensor], rows: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, labels) of every validation row once, in row order, from this rank's batches and (under DDP)
    every other rank's: the distributed sampler splits the rows and pads the shards with repeats."""
    local = [torch.cat(held) if held else torch.empty(0) for held in (rows, scores, labels)]
    return gather_unique(*local)


class AutoJudgeModule(DecodingModule):
    """A DecodingModule (``predict``) that also trains the AutoJudge judge (``fit``).

    Args:
        judge_path: where ``fit`` exports the judge and where ``autojudge`` methods without their own
            ``judge_path`` load it from (``<path>.safetensors`` + ``<path>.json``).
        head: ``logistic`` (a linear head, the paper's choice) or ``mlp``.
        mlp_hidden_size: width of the MLP's hidden layer.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        class_weighting: weight the BCE's important class by (#unimportant / #important) of the train split.
        recall_target: the threshold is the largest that keeps validation recall of important mismatches at
            least this high.
        **kwargs: the DecodingModule arguments (target, draft, methods, max_new_tokens, ...).
    """

    def __init__(
        self,
        judge_path: str = "artifacts/autojudge/judge",
        head: HeadType = "logistic",
        mlp_hidden_size: int = 256,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        class_weighting: bool = True,
        recall_target: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < recall_target <= 1.0:
            raise InvalidParameterError(f"recall_target={recall_target} is invalid: use a value in (0, 1]")
        self.judge_path = judge_path
        self.head_type = head
        self.mlp_hidden_size = mlp_hidden_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.class_weighting = class_weighting
        self.recall_target = recall_target
        for method in self.methods:
            if isinstance(method, AutoJudge) and method.judge_path is None:
                method.judge_path = judge_path
        self.head: JudgeHead | None = None
        # Updated once per epoch with the validation rows of every rank (gathered, each once), so no sync at compute.
        self.val_metrics = torch.nn.ModuleDict({
            "auroc": BinaryAUROC(sync_on_compute=False),
            "average_precision": BinaryAveragePrecision(sync_on_compute=False),
            "f1": BinaryF1Score(sync_on_compute=False),
        })
        self._val_scores: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_rows: list[torch.Tensor] = []
        self.best: dict[str, Any] | None = None

    # ---- fit ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return super().setup(stage)
        data = self.trainer.datamodule
        if not isinstance(data, JudgeDataModule):
            raise InvalidParameterError("fitting the judge needs data: class_path src.lit.judge.JudgeDataModule")
        if self.head is None:
            self.head = JudgeHead(data.feature_dim, self.head_type, self.mlp_hidden_size)
            self.head.set_standardization(data.feature_mean, data.feature_std)
        share = data.important_share
        self.pos_weight = (1 - share) / share if self.class_weighting and 0 < share < 1 else 1.0

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)

    def training_step(self, batch, batch_idx):
        features, labels = batch
        logits = self.head(features)
        weight = torch.tensor(self.pos_weight, device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=labels.numel())
        return loss

    def validation_step(self, batch, batch_idx):
        features, labels, rows = batch
        scores = torch.sigmoid(self.head(features))
        self._val_scores.append(scores.detach().cpu())
        self._val_labels.append(labels.detach().cpu())
        self._val_rows.append(rows.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        scores, labels = gather_validation_rows(self._val_scores, self._val_labels, self._val_rows)
        for held in (self._val_scores, self._val_labels, self._val_rows):
            held.clear()
        # Every rank now holds the same rows, so every rank computes (and keeps as best) the same figures.
        both_classes = 0 < float(labels.sum()) < labels.numel()
        # AUROC / AP need both classes; a one-class split logs NaN (the checkpoint callback ranks it last).
        values = {}
        for name, metric in self.val_metrics.items():
            metric.update(scores, labels.int())
            values[f"val_{name}"] = metric.compute() if both_classes else float("nan")
            metric.reset()
        threshold = select_threshold(scores, labels, self.recall_target)
        flagged = scores >= threshold
        values.update({
            "val_threshold": threshold,
            "val_recall_important": BinaryRecall()(flagged.float(), labels.int()),
            "val_pass_rate": 1.0 - float(flagged.float().mean()),  # share of mismatches the judge lets through
        })
        self.log_dict({k: float(v) for k, v in values.items()}, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        auroc, best = float(values["val_auroc"]), self.best["metrics"]["val_auroc"] if self.best else None
        if best is None or (not math.isnan(auroc) and (math.isnan(best) or auroc > best)):
            self.best = {"state": copy.deepcopy(self.head.state_dict()), "threshold": threshold,
                         "metrics": {k: float(v) for k, v in values.items()} | {"epoch": self.current_epoch}}

    def on_fit_end(self) -> None:
        """Export the judge of the best validation epoch (its threshold chosen on that epoch's scores), then
        evaluate it on the held-out test prompts next to trivial judges (:mod:`src.models.judge_eval`)."""
        if self.best is None or not self.trainer.is_global_zero:
            return
        self.head.load_state_dict(self.best["state"])
        data = self.trainer.datamodule
        head = self.head.cpu().eval()
        with torch.no_grad():
            test_scores = torch.sigmoid(head(data.features[data.rows["test"]]))
        recipe = {"head": self.head_type, "epochs": self.trainer.max_epochs or 60, "learning_rate": self.learning_rate,
                  "weight_decay": self.weight_decay, "batch_size": data.batch_size,
                  "class_weighting": self.class_weighting}
        evaluation = evaluate_judges(test_scores, data.labels, data.features, data.rows, recipe, seed=data.seed)
        trained = evaluation["judges"][0]
        test_metrics = {"test_auroc": trained["auroc"], "test_auroc_ci": trained["auroc_ci"],
                        "test_average_precision": trained["average_precision"],
                        "test_labels": evaluation["test_labels"]}
        judge = Judge(head, self.best["threshold"], data.feature_layout, data.pair_info["target"],
                      data.pair_info["draft"], metrics=self.best["metrics"] | test_metrics | {
                          "train_labels": len(data.train_set), "val_labels": len(data.val_set),
                          "recall_target": self.recall_target})
        weights, meta = judge.save(self.judge_path)
        report = Path(f"{self.judge_path}.evaluation.json")
        report.write_text(json.dumps({k: v for k, v in evaluation.items() if k != "table"}, indent=2) + "\n")
        for logger in self.trainer.loggers:
            logger.log_metrics({"test_auroc": trained["auroc"], "test_auroc_low": trained["auroc_ci"][0],
                                "test_auroc_high": trained["auroc_ci"][1]})
        shown = ", ".join(f"{k}={v:.3f}" for k, v in self.best["metrics"].items() if isinstance(v, float))
        print(f"exported judge to {weights} and {meta} ({shown})")
        print(evaluation["table"])
        print(f"(written to {report})")
