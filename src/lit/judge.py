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
import logging
import math
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryF1Score, BinaryRecall

from src.data.mining import LabelSet, LabelStore, mine_prompt
from src.data.prompts import encode_messages
from src.decoding.autojudge import AutoJudge
from src.errors import InvalidParameterError, MissingInputError
from src.lit.data import PromptDataModule
from src.lit.distributed import gather_from_ranks
from src.lit.module import DecodingModule
from src.models.judge import FeatureLayout, HeadType, Judge, JudgeHead, select_threshold

log = logging.getLogger(__name__)


class JudgeDataModule(PromptDataModule):
    """Mined AutoJudge labels for ``fit``; held-out prompts (``path`` etc., see PromptDataModule) for ``predict``.

    Args:
        mine_path: prompts to mine from (a task with a checkable final answer): ``synthetic:arithmetic`` (built-in
            word problems, train split) or a GSM8K-format JSONL.
        mine_prompts: how many of them to mine.
        mine_max_new_tokens: length of the target's answers while mining (a prompt whose answer does not end
            within it is skipped: its last number is not a final answer).
        mine_max_mismatches: labels per prompt at most.
        mine_time_budget_s: wall-time budget of the whole mining (prompts left are skipped; rerun to go on).
        store_dir: the label store; mined once, reused by later fits (delete it to mine again).
        answer_extractor: how a final answer is read from a text (see ``src.data.answers.ANSWER_EXTRACTORS``).
        feature_layout: ``draft+target`` hidden states (the paper's default) or ``target`` only.
        val_fraction: share of *prompts* (never single tokens) held out for validation.
        batch_size: training batch size.
    """

    def __init__(
        self,
        mine_path: str = "synthetic:arithmetic",
        mine_prompts: int = 48,
        mine_max_new_tokens: int = 128,
        mine_max_mismatches: int = 4,
        mine_time_budget_s: float = 900.0,
        store_dir: str = "artifacts/autojudge/labels",
        answer_extractor: str = "gsm8k",
        feature_layout: FeatureLayout = "draft+target",
        val_fraction: float = 0.25,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < val_fraction < 1.0:
            raise InvalidParameterError(f"val_fraction={val_fraction} is invalid: use a share in (0, 1)")
        for name, value in (("mine_prompts", mine_prompts), ("mine_max_new_tokens", mine_max_new_tokens),
                            ("mine_max_mismatches", mine_max_mismatches), ("batch_size", batch_size)):
            if value < 1:
                raise InvalidParameterError(f"{name}={value} is invalid: use a value >= 1")
        self.mine_path = mine_path
        self.mine_prompts = mine_prompts
        self.mine_max_new_tokens = mine_max_new_tokens
        self.mine_max_mismatches = mine_max_mismatches
        self.mine_time_budget_s = mine_time_budget_s
        self.store = LabelStore(store_dir)
        self.answer_extractor = answer_extractor
        self.feature_layout = feature_layout
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    # ---- mining ---------------------------------------------------------------------------------------------
    def mining_prompts(self):
        source = PromptDataModule(path=self.mine_path, limit=self.mine_prompts, seed=self.seed,
                                  chat_template=self.chat_template, system_prompt=self.system_prompt)
        return source.load_prompts()

    def mining_settings(self, module: DecodingModule) -> dict[str, Any]:
        return {
            "target": module.pair.target.info, "draft": module.pair.draft.info if module.pair.draft else None,
            "mine_path": self.mine_path, "mine_max_new_tokens": self.mine_max_new_tokens,
            "mine_max_mismatches": self.mine_max_mismatches, "answer_extractor": self.answer_extractor,
            "chat_template": self.chat_template, "system_prompt": self.system_prompt, "seed": self.seed,
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
        self._mine(module, todo, len(done))

    def _mine(self, module: DecodingModule, prompts, already: int) -> None:
        from src.data.answers import extract_answer

        pair, tokenizer = module.pair, module.pair.tokenizer
        deadline = time.monotonic() + self.mine_time_budget_s

        def answer_of(tokens: list[int]) -> str | None:
            return extract_answer(tokenizer.decode(tokens, skip_special_tokens=True), self.answer_extractor)

        progress = _progress(len(prompts), "mining AutoJudge labels")
        labels = important = skipped = 0
        for prompt in prompts:
            if time.monotonic() > deadline:
                log.warning("mining budget (%.0f s) spent: %d prompts left; rerun fit to go on", self.mine_time_budget_s,
                            len(prompts) - progress.n)
                break
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
                {"role": "user", "content": prompt.turns[0]}]
            ids = encode_messages(tokenizer, messages, self.chat_template)[0].tolist()
            start = time.monotonic()
            mined = mine_prompt(pair.target.model, pair.draft.model, ids, self.mine_max_new_tokens, pair.eos_token_ids,
                                answer_of, self.mine_max_mismatches, deadline, skip_unfinished=True)
            self.store.add(prompt.prompt_id, mined, time.monotonic() - start)
            labels += len(mined.mismatches)
            important += sum(m.label for m in mined.mismatches)
            progress.update(1)
            skipped += mined.stopped_by in ("unfinished", "no_answer")
            progress.set_postfix_str(f"{labels} labels, {important} important, {skipped} skipped")
        progress.close()
        log.info("mined %d labels (%d important) from %d prompts (+%d earlier) into %s", labels, important,
                 progress.n, already, self.store.root)

    # ---- training data --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return super().setup(stage)
        labels = self.store.load()
        if len(labels) == 0:
            raise MissingInputError(
                f"label store {self.store.root} holds no labels: mine more prompts (mine_prompts, "
                "mine_time_budget_s) or use a draft that disagrees with the target more often"
            )
        train_rows, val_rows = self.split_by_prompt(labels)
        features = self.features_of(labels)
        self.train_set = TensorDataset(features[train_rows], labels.labels[train_rows])
        # Validation rows carry their index: under DDP every rank scores a shard (padded with repeats to equal
        # sizes) and the epoch's metrics are computed on the gathered rows, each once.
        self.val_set = TensorDataset(features[val_rows], labels.labels[val_rows], torch.arange(len(val_rows)))
        train_labels = labels.labels[train_rows]
        self.feature_mean = features[train_rows].mean(0)
        self.feature_std = features[train_rows].std(0) if len(train_rows) > 1 else torch.ones(features.shape[1])
        self.important_share = float(train_labels.mean()) if len(train_rows) else 0.0
        self.pair_info = {k: self.store.meta().get(k) for k in ("target", "draft")}
        log.info("judge data: %d train / %d val mismatches, %.0f%% important", len(train_rows), len(val_rows),
                 100 * self.important_share)

    def features_of(self, labels: LabelSet) -> torch.Tensor:
        if self.feature_layout == "target":
            return labels.target_hidden
        return torch.cat([labels.draft_hidden, labels.target_hidden], dim=-1)

    def split_by_prompt(self, labels: LabelSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of train and validation, split by prompt with ``seed`` (never across one prompt)."""
        prompts = sorted(set(labels.prompt_ids))
        random.Random(self.seed).shuffle(prompts)
        n_val = max(1, math.ceil(self.val_fraction * len(prompts))) if len(prompts) > 1 else 0
        val_prompts = set(prompts[:n_val])
        is_val = torch.tensor([p in val_prompts for p in labels.prompt_ids])
        return (~is_val).nonzero().squeeze(-1), is_val.nonzero().squeeze(-1)

    @property
    def feature_dim(self) -> int:
        return self.train_set.tensors[0].shape[1]

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), shuffle=False)


def gather_validation_rows(
    scores: list[torch.Tensor], labels: list[torch.Tensor], rows: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, labels) of every validation row once, in row order, from this rank's batches and (under DDP)
    every other rank's: the distributed sampler splits the rows and pads the shards with repeats."""
    local = tuple(torch.cat(held) if held else torch.empty(0) for held in (scores, labels, rows))
    parts = gather_from_ranks(local)
    all_scores, all_labels, all_rows = (torch.cat([part[i] for part in parts]) for i in range(3))
    order = torch.argsort(all_rows, stable=True)
    all_rows = all_rows[order]
    first = torch.ones_like(all_rows, dtype=torch.bool)
    first[1:] = all_rows[1:] != all_rows[:-1]  # a padded repeat follows its original: keep the first
    keep = order[first]
    return all_scores[keep], all_labels[keep]


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="prompt")


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
        """Export the judge of the best validation epoch (its threshold chosen on that epoch's scores)."""
        if self.best is None or not self.trainer.is_global_zero:
            return
        self.head.load_state_dict(self.best["state"])
        data = self.trainer.datamodule
        judge = Judge(self.head.cpu(), self.best["threshold"], data.feature_layout, data.pair_info["target"],
                      data.pair_info["draft"], metrics=self.best["metrics"] | {
                          "train_labels": len(data.train_set), "val_labels": len(data.val_set),
                          "recall_target": self.recall_target})
        weights, meta = judge.save(self.judge_path)
        shown = ", ".join(f"{k}={v:.3f}" for k, v in self.best["metrics"].items() if isinstance(v, float))
        print(f"exported judge to {weights} and {meta} ({shown})")
