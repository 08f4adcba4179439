"""The EAGLE draft head on the Lightning side: one module and one data module serve both subcommands of
``configs/eagle1.yaml``.

- ``fit``: :class:`EagleDataModule` builds the training data in ``prepare_data`` (the target's features over
  conversations: reference answers read by teacher forcing, and optionally the target's own answers,
  :mod:`src.data.features`; resumable) and serves whole sequences; :class:`EagleModule` trains the head
  (:mod:`src.models.eagle`) with EAGLE's loss and exports the epoch with the longest expected accepted chain.
- ``predict``: :class:`EagleModule` is a :class:`~src.lit.module.DecodingModule`; its ``speculative`` methods
  with an ``EagleDrafter`` load that head.

Training pairs (EAGLE-1): at position t the head reads (f_t, embedding of x_{t+1}) and predicts f̂_{t+1}:

    loss = feature_loss_weight * SmoothL1(f̂_{t+1}, f_{t+1}) + token_loss_weight * CE(q(. | f̂_{t+1}), p(. | f_{t+1}))

with p = softmax(lm_head(f)) of the target and q the head's, both over the head's vocabulary (the most frequent
``top_tokens`` ids of the training data, or all). With ``unroll_steps`` > 1 the head is also trained on its own
predicted features as input (pass j reads pass j - 1's f̂), as at decoding time from the second draft token on
(the idea of HASS / EAGLE-3's training-time test, simplified: every earlier position of pass j is a prediction
too, where decoding would have exact features).

Validation, each epoch: the head's top-1 agreement with the target's greedy token at draft steps 1..
``eval_steps`` (step j via the unrolled passes, conditioned on steps < j agreeing) and the expected accepted
length of an ``eval_steps``-chain, ``val_accepted_length`` = mean over positions of sum_j prod_{i<=j} agree_i.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from src.data import features
from src.data.features import FeatureDataset, FeatureStore, collate_sequences
from src.data.progress import QUICK_PHASE_DELAY_S, phase_progress, shows_progress
from src.decoding.drafters import Drafter
from src.decoding.eagle import EagleDrafter
from src.errors import InvalidParameterError, UserInputError, check_positive_int, is_positive_int
from src.lit.data import PromptDataModule
from src.lit.distributed import gather_unique
from src.lit.module import DecodingModule
from src.models.eagle import EagleHead
from src.models.eagle3 import default_aux_layers

log = logging.getLogger(__name__)


class EagleDataModule(PromptDataModule):
    """The target's features for ``fit``; evaluation prompts (``path`` etc., see PromptDataModule) for ``predict``.

    Args:
        train_sources: conversations read by teacher forcing: GSM8K-format JSONL (question + reference answer),
            MT-Bench-format JSONL with ``reference`` answers, or JSONL of ``{"messages": [...]}``.
        train_limit: conversations per source at most (default: all).
        self_distill_path: prompts the target answers itself (greedy, batched) before the feature pass; their
            answers are the target's own text, the best match for what the head drafts at decoding time.
        self_distill_categories: keep only these categories of ``self_distill_path`` (default: all).
        self_distill_split: the split of a ``hub:`` self_distill_path (e.g. ``train_sft`` for
            HuggingFaceH4/ultrachat_200k); its rows' ``prompt`` field is the instruction.
        self_distill_prompts: how many of those prompts.
        self_distill_max_new_tokens: answer length when self-distilling.
        store_dir: the feature store (built once, resumed when a run was killed; delete it to build again).
        max_length: tokens per conversation at most.
        feature_batch_size: conversations per batched generation / target forward while building features
            (self-distillation on 2 CPU cores: 111 answer tok/s at 16, 159 at 48).
        token_budget: stop building after this many tokens (default: all sources).
        time_budget_s: stop building after this many seconds (rerun to go on).
        val_fraction: share of conversations held out for validation (split by conversation).
        batch_size: sequences per training batch (small batches pad less and take more steps: on the default
            CPU data 2 beat 8 in validation agreement, 0.395 vs 0.379, and in time, 6.2 vs 8 min for 3 epochs).
        aux_layers: also store the inputs of these target layers (EAGLE-3's low / middle / high states);
            ``auto``: EAGLE-3's (2, L // 2, L - 3) of an L-layer target; None: the final features only (EAGLE-1/2).
            An EAGLE-1/2 fit reads such a store too (same data for both recipes).
    """

    def __init__(
        self,
        train_sources: list[str] | None = None,
        train_limit: int | None = None,
        self_distill_path: str | None = None,
        self_distill_categories: list[str] | None = None,
        self_distill_split: str = "train",
        self_distill_prompts: int = 0,
        self_distill_max_new_tokens: int = 256,
        store_dir: str = "artifacts/eagle/features",
        max_length: int = 1024,
        feature_batch_size: int = 8,
        token_budget: int | None = None,
        time_budget_s: float | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 8,
        aux_layers: list[int] | Literal["auto"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if aux_layers is not None and aux_layers != "auto" and (
                not isinstance(aux_layers, list) or not aux_layers
                or not all(is_positive_int(i, minimum=0) for i in aux_layers)):
            raise InvalidParameterError(f"aux_layers={aux_layers!r} is invalid: use target layer ids, e.g. [2, 15, 27], "
                                        "'auto' (EAGLE-3's), or null")
        self.aux_layers = aux_layers
        if not 0.0 < val_fraction < 1.0:
            raise InvalidParameterError(f"val_fraction={val_fraction} is invalid: use a value in (0, 1), e.g. 0.05")
        if self_distill_prompts and not self_distill_path:
            raise InvalidParameterError("self_distill_prompts is set without self_distill_path: set both or neither")
        self.train_sources = list(train_sources or [])
        if not self.train_sources and not self_distill_path:
            raise InvalidParameterError(
                "no training data: set train_sources (e.g. [../shared/datasets/gsm8k_train.jsonl]) or self_distill_path"
            )
        self.train_limit = train_limit
        self.self_distill_path = self_distill_path
        self.self_distill_categories = list(self_distill_categories) if self_distill_categories else None
        self.self_distill_split = self_distill_split
        self.self_distill_prompts = self_distill_prompts
        self.self_distill_max_new_tokens = self_distill_max_new_tokens
        self.store_dir = store_dir
        self.max_length = max_length
        self.feature_batch_size = feature_batch_size
        self.token_budget = token_budget
        self.time_budget_s = time_budget_s
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.train_set = self.val_set = None

    # ---- building the features ------------------------------------------------------------------------------
    def resolved_aux_layers(self, module: DecodingModule) -> tuple[int, ...] | None:
        """The aux layers this store keeps, ``auto`` resolved against the target's depth (refused beyond it)."""
        if self.aux_layers is None:
            return None
        depth = module.pair.target.model.config.num_hidden_layers
        layers = default_aux_layers(depth) if self.aux_layers == "auto" else tuple(self.aux_layers)
        if max(layers) >= depth:
            raise InvalidParameterError(f"aux_layers={list(layers)} reach beyond the target's {depth} layers (ids 0.."
                                        f"{depth - 1}): use smaller ids, or 'auto'")
        return layers

    def store_meta(self, module: DecodingModule) -> dict[str, Any]:
        layers = self.resolved_aux_layers(module)
        return {
            "target": module.pair.target.info, "train_sources": self.train_sources, "train_limit": self.train_limit,
            "self_distill_path": self.self_distill_path, "self_distill_categories": self.self_distill_categories,
            "self_distill_prompts": self.self_distill_prompts,
            # only hub sources have splits; leaving it out elsewhere keeps stores built before the option valid
            **({"self_distill_split": self.self_distill_split} if str(self.self_distill_path).startswith("hub:") else {}),
            "self_distill_max_new_tokens": self.self_distill_max_new_tokens, "max_length": self.max_length,
            "feature_dtype": "bfloat16",
            # only EAGLE-3 stores carry it: stores built before keep their meta (and an EAGLE-1 fit reads either)
            **({"aux_layers": list(layers)} if layers is not None else {}),
        }

    def conversations(self, module: DecodingModule):
        """Every training conversation: teacher-forced sources, then the target's own answers (generated once)."""
        items = [item for path in self.train_sources for item in features.read_conversations(path, self.train_limit)]
        if self.self_distill_path and self.self_distill_prompts:
            source = PromptDataModule(path=self.self_distill_path, categories=self.self_distill_categories,
                                      split=self.self_distill_split, limit=self.self_distill_prompts, seed=self.seed,
                                      chat_template=self.chat_template, shuffle=True)
            prompts = [(f"self:{p.prompt_id}", p.turns[0]) for p in source.load_prompts()]
            items += features.generate_answers(
                module.pair.target.model, module.pair.tokenizer, prompts, self.self_distill_max_new_tokens,
                self.feature_batch_size, store=self.store, show_progress=shows_progress(self.trainer))
        return items

    @property
    def store(self):
        return FeatureStore(self.store_dir)

    def prepare_data(self) -> None:
        """Build what the store lacks; a finished store is only read. ``predict`` builds nothing."""
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, DecodingModule):
            raise InvalidParameterError("building EAGLE features needs the target: use src.lit.eagle.EagleModule")
        module.ensure_pair()
        store = self.store
        store.open(self.store_meta(module))
        items = self.conversations(module)
        warning = features.overlap_warning(items, self.evaluation_texts())
        if warning:
            log.warning(warning)
        done = store.finished_items()
        if all(item[0] in done for item in items):
            log.info("feature store %s: %d conversations already built", store.root, len(done))
            return
        # every conversation, the stored ones too: build_features skips them, and its bar starts at their count
        report = features.build_features(
            module.pair.target.model, module.pair.tokenizer, items, store, batch_size=self.feature_batch_size,
            max_length=self.max_length, token_budget=self.token_budget, time_budget_s=self.time_budget_s,
            show_progress=shows_progress(self.trainer))
        log.info("EAGLE features: %s", report)

    def evaluation_texts(self) -> list[str]:
        """The first turns ``predict`` decodes (training on them would flatter the head); none when that file is
        not there (a fit needs no evaluation prompts)."""
        try:
            return [p.turns[0] for p in self.load_prompts()]
        except UserInputError:
            return []

    # ---- training data --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return super().setup(stage)
        with_aux = self.aux_layers is not None
        self.train_set = FeatureDataset(self.store_dir, "train", self.val_fraction, self.max_length, with_aux)
        self.val_set = FeatureDataset(self.store_dir, "val", self.val_fraction, self.max_length, with_aux)
        self.target_info = self.store.meta().get("target") if hasattr(self.store, "meta") else None
        log.info("EAGLE data: %d train / %d val conversations", len(self.train_set), len(self.val_set))

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each id occurs in the training sequences (ranks the head's vocabulary subset)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        # one shard read per conversation: quick for a few hundred, so a bar only once it takes a while
        with phase_progress("draft vocabulary: counting tokens", len(self.train_set), unit="conversation",
                            enabled=shows_progress(self.trainer), delay_s=QUICK_PHASE_DELAY_S) as bar:
            for ids in self.train_set.token_ids():
                counts += torch.bincount(ids[ids < vocab_size], minlength=vocab_size)
                bar.update()
        return counts

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=collate_sequences)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=collate_sequences)


class EagleModule(DecodingModule):
    """A DecodingModule (``predict``) that also trains the EAGLE head (``fit``).

    Args:
        head_path: where ``fit`` exports the head and where ``EagleDrafter`` methods without their own path load
            it (``<path>.safetensors`` + ``<path>.json``).
        top_tokens: score only the most frequent ids of the training data (FR-Spec; the lm_head is most of a
            small head's cost on a CPU); None: the whole vocabulary.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        feature_loss_weight: weight of the SmoothL1 feature regression (EAGLE: 1.0).
        token_loss_weight: weight of the cross-entropy against the target's distribution (EAGLE: 0.1).
        unroll_steps: passes trained on the head's own features (1: teacher forcing only).
        eval_steps: draft steps the validation agreement and expected accepted length cover.
        **kwargs: the DecodingModule arguments (target, methods, max_new_tokens, ...).
    """

    def __init__(
        self,
        head_path: str = "artifacts/eagle/head",
        top_tokens: int | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        feature_loss_weight: float = 1.0,
        token_loss_weight: float = 0.1,
        unroll_steps: int = 2,
        eval_steps: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int("unroll_steps", unroll_steps)
        check_positive_int("eval_steps", eval_steps)
        if top_tokens is not None:
            check_positive_int("top_tokens", top_tokens, "use an integer >= 1, or null for all")
        self.head_path = head_path
        self.top_tokens = top_tokens
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.feature_loss_weight = feature_loss_weight
        self.token_loss_weight = token_loss_weight
        self.unroll_steps = unroll_steps
        self.eval_steps = eval_steps
        for method in self.methods:
            drafter: Drafter | None = getattr(method, "drafter", None)
            if isinstance(drafter, EagleDrafter) and drafter.head_path is None:
                drafter.head_path = head_path
        self.head = None
        self.best: dict[str, Any] | None = None
        self.val_history: list[dict[str, float]] = []  # every validation's figures, the sanity check's included
        self._val_keys: list[torch.Tensor] = []  # this validation's conversations (item_index), per batch
        self._val_counts: list[torch.Tensor] = []  # and their counts (B, 1 + eval_steps)

    # ---- fit ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return super().setup(stage)
        pair = self.ensure_pair()
        data = self.trainer.datamodule
        if not isinstance(data, EagleDataModule):
            raise InvalidParameterError("fitting the EAGLE head needs data: class_path src.lit.eagle.EagleDataModule")
        target = pair.target.model
        for param in target.parameters():
            param.requires_grad_(False)
        vocab = target.get_output_embeddings().weight.shape[0]
        if self.top_tokens is not None and self.top_tokens > vocab:
            raise InvalidParameterError(f"top_tokens={self.top_tokens} exceeds the target's {vocab} ids: use <= {vocab}")
        if self.head is None:
            ids = None
            if self.top_tokens is not None:
                ids = data.token_counts(vocab).argsort(descending=True, stable=True)[: self.top_tokens].sort().values
            # float32 master weights also for a bf16/fp16 target (AdamW steps vanish in bf16); the trainer's
            # precision (bf16-mixed on a GPU) sets the compute dtype, and the drafter casts to the target's at load
            self.head = EagleHead(target.config, top_token_ids=ids).float()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)

    def _frozen(self):
        target = self.pair.target.model
        head = target.get_output_embeddings()
        return target.get_input_embeddings(), head.weight, getattr(head, "bias", None)

    def passes(self, batch: dict[str, torch.Tensor], steps: int) -> list[dict[str, torch.Tensor]]:
        """Pass j = 1..steps: input (f or f̂ of pass j - 1 at index t, x_{t+j}) -> f̂_{t+j} with its target f_{t+j},
        both over indices t = 0 .. T - 1 - j; returns each pass's predictions, targets and valid mask."""
        embed, _, _ = self._frozen()
        features = batch["features"].to(self.head.fc.weight.dtype)  # (B, T, H)
        ids, mask = batch["input_ids"], batch["loss_mask"] & batch["attention_mask"]  # (B, T)
        T = ids.shape[1]
        inputs = features[:, :-1]  # pass 1 reads the exact f_t
        out = []
        for j in range(1, steps + 1):
            if T - j < 1:
                break
            n = T - j
            with torch.no_grad():
                embedded = embed(ids[:, j : j + n]).to(features.dtype)  # x_{t+j}: (B, n, H)
            predicted = self.head(inputs[:, :n], embedded)  # f̂_{t+j}: (B, n, H)
            out.append({"predicted": predicted, "target": features[:, j : j + n], "mask": mask[:, j : j + n],
                        "ids": ids, "j": j})
            inputs = predicted  # the next pass reads its own predictions
        return out

    def pass_loss(self, one: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        _, weight, bias = self._frozen()
        mask = one["mask"].float()
        count = mask.sum().clamp_min(1.0)
        regression = F.smooth_l1_loss(one["predicted"], one["target"], reduction="none").mean(-1)  # (B, n)
        with torch.no_grad():
            p = torch.softmax(self.head.logits(one["target"], weight, bias).float(), -1)  # (B, n, N)
        log_q = torch.log_softmax(self.head.logits(one["predicted"], weight, bias).float(), -1)
        cross_entropy = -(p * log_q).sum(-1)  # (B, n)
        return (regression * mask).sum() / count, (cross_entropy * mask).sum() / count

    def training_step(self, batch, batch_idx):
        loss = 0.0
        for one in self.passes(batch, self.unroll_steps):
            regression, cross_entropy = self.pass_loss(one)
            loss = loss + self.feature_loss_weight * regression + self.token_loss_weight * cross_entropy
            if one["j"] == 1:
                self.log("train_feature_loss", regression, on_step=False, on_epoch=True, batch_size=len(batch["input_ids"]))
                self.log("train_token_loss", cross_entropy, on_step=False, on_epoch=True, batch_size=len(batch["input_ids"]))
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch, batch_idx):
        """Counts per conversation and step j: chain starts t where steps 1..j all agree with the target's greedy
        token (and the data's tokens follow the target, so the chain's inputs are what the drafts would be), and
        the chain starts scored (index 0). A start t is scored when x_{t+1} is in the answer and all ``eval_steps``
        steps lie inside the conversation, whatever the batch's padding, so the figures do not depend on batching
        and a data-parallel run's match one process's."""
        _, weight, bias = self._frozen()
        ids = batch["input_ids"]
        mask = batch["loss_mask"] & batch["attention_mask"]  # (B, T)
        passes = self.passes(batch, self.eval_steps)
        B, T = ids.shape
        n = T - 1 - self.eval_steps  # chain starts t with every step inside the padded batch
        if n < 1 or len(passes) < self.eval_steps:
            return
        vocab_ids = self.head.vocab_ids()
        lengths = batch["attention_mask"].sum(1, keepdim=True)  # (B, 1)
        starts = torch.arange(n, device=ids.device)[None, :]  # (1, n)
        valid = mask[:, 1 : 1 + n] & (starts < lengths - 1 - self.eval_steps)  # (B, n)
        chain = torch.ones_like(valid)
        counts = torch.zeros(B, self.eval_steps + 1, dtype=torch.float64)  # (B, 1 + eval_steps)
        counts[:, 0] = valid.sum(1).double().cpu()
        previous_choice = None  # g_{t+j-1}, the target's choice one step earlier
        for one in passes:
            j = one["j"]
            target_choice = self.head_choice(one["target"][:, :n], weight, bias, vocab_ids, full=True)  # g_{t+j}
            head_choice = self.head_choice(one["predicted"][:, :n], weight, bias, vocab_ids)  # y_j at t
            agree = head_choice == target_choice
            if j > 1:  # the chain's input token x_{t+j} must be the target's greedy choice g_{t+j-1}
                agree &= ids[:, j : j + n] == previous_choice
            previous_choice = target_choice
            chain &= agree & mask[:, j : j + n]
            counts[:, j] = (chain & valid).sum(1).double().cpu()
        keys = batch["item_index"].cpu()  # (B,)
        if bool((keys < 0).any()):
            raise InvalidParameterError("validation batches need item_index per conversation: serve them from "
                                        "src.data.features.FeatureDataset")
        self._val_keys.append(keys)
        self._val_counts.append(counts)

    def head_choice(self, features, weight, bias, vocab_ids, full: bool = False) -> torch.Tensor:
        """argmax token of lm_head(features): over every id (the target's choice) or over the head's subset."""
        if full:  # over the whole vocabulary, a few hundred positions at a time (B x T x V floats is GBs)
            flat = features.reshape(-1, features.shape[-1])
            choice = torch.cat([F.linear(part.to(weight.dtype), weight, bias).argmax(-1) for part in flat.split(512)])
            return choice.reshape(features.shape[:-1])
        choice = self.head.logits(features, weight, bias).argmax(-1)
        return vocab_ids.to(choice.device)[choice] if vocab_ids is not None else choice

    def on_validation_epoch_end(self) -> None:
        keys = torch.cat(self._val_keys) if self._val_keys else torch.empty(0, dtype=torch.long)
        counts = torch.cat(self._val_counts) if self._val_counts else torch.zeros(0, self.eval_steps + 1, dtype=torch.float64)
        self._val_keys, self._val_counts = [], []
        (counts,) = gather_unique(keys, counts)  # every rank's conversations, a padded-in repeat once
        sums = counts.sum(0)  # (1 + eval_steps,)
        positions = float(sums[0])
        values: dict[str, float] = {"val_positions": positions}
        for j in range(1, self.eval_steps + 1):  # agreement at step j given steps < j agreed, and unconditioned
            values[f"val_agree_step{j}"] = float(sums[j] / sums[j - 1]) if sums[j - 1] > 0 else float("nan")
            values[f"val_chain_step{j}"] = float(sums[j] / positions) if positions else float("nan")
        values["val_accepted_length"] = float(sums[1:].sum() / positions) if positions else float("nan")
        self.log_dict(values, prog_bar=True)
        self.val_history.append(values)
        if self.trainer.sanity_checking:
            return
        best = self.best["metrics"]["val_accepted_length"] if self.best else None
        length = values["val_accepted_length"]
        if best is None or (not math.isnan(length) and (math.isnan(best) or length > best)):
            self.best = {"state": copy.deepcopy(self.head.state_dict()),
                         "metrics": values | {"epoch": self.current_epoch}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The best epoch's head and every validation's figures travel with a checkpoint, so a fit resumed with
        ``--ckpt_path last`` (configs/eagle-long.yaml) still exports the best epoch of the whole run."""
        checkpoint["eagle"] = {"best": self.best, "val_history": self.val_history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("eagle") or {}
        self.best = state.get("best")
        self.val_history = list(state.get("val_history") or [])

    def on_fit_end(self) -> None:
        """Export the head of the best validation epoch."""
        if not self.trainer.is_global_zero:
            return
        if self.best is None:  # e.g. --trainer.max_epochs 0: only the features were built
            print(f"no training epoch ran: nothing exported to {self.head_path}")
            return
        self.head.load_state_dict(self.best["state"])
        data = self.trainer.datamodule
        metadata = {"target": self.pair.target.info, "training_data": data.store_meta(self),
                    "train_conversations": len(data.train_set), "val_conversations": len(data.val_set),
                    "metrics": self.best["metrics"], "unroll_steps": self.unroll_steps}
        written = self.export_head(metadata)
        shown = ", ".join(f"{k}={v:.3f}" for k, v in self.best["metrics"].items() if isinstance(v, float))
        print(f"exported EAGLE head to {' and '.join(str(p) for p in written)} ({shown})")

    def export_head(self, metadata: dict[str, Any]) -> tuple:
        """Write the head where ``head_path`` says (EAGLE-1/2: ``<path>.safetensors`` + ``<path>.json``)."""
        return self.head.save(self.head_path, metadata)
