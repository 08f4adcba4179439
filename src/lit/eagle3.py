"""Training an EAGLE-3 head (Li et al. 2025, arXiv 2503.01840) with ``python -m src fit --config configs/eagle.yaml``.

The data module is EAGLE-1/2's (:class:`~src.lit.eagle.EagleDataModule`) with ``aux_layers`` set: the store then
keeps, per token, the inputs of three target layers a_t (3H) beside the final feature f_t (H). The module is
:class:`~src.lit.eagle.EagleModule` with EAGLE-3's head, loss and training-time test:

Row p of a sequence is the head's position p: it reads (its input state at p, embedding of x_{p+1}) and predicts
x_{p+2}, whose target distribution is p(. | f_{p+1}) restricted to the draft vocabulary (renormalized).

    step 1:  input g_p = fc(a_p)                      the exact pairs, as when the head reads verified tokens
    step j:  input h^{j-1}_{p-1}                      the head's own output one row up: a j-th draft step
    loss  =  sum_j step_weight^(j-1) * [ CE(q^j_p, p_p) + feature_loss_weight * SmoothL1(norm(h^j_p), f_{p+1}) ]

Masks of the training-time test: :func:`src.models.eagle3.ttt_mask` (exact, as at decoding time; a test checks
it against the drafter's own step-by-step chain). No feature regression by default (EAGLE-3 trains on tokens
only).

Validation reports what SpecForge and speculators do: per-step accuracy conditioned on the earlier steps
(``val_agree_step{j}``), unconditioned (``val_chain_step{j}``), and the simulated acceptance length
``val_accepted_length`` = sum_k prod_{i<=k} acc_i; the best epoch by it is exported in the speculators format
(:func:`src.models.eagle_formats.save_speculators`), a folder vLLM can serve.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from src.errors import IncompatibleModelsError, InvalidParameterError
from src.lit.eagle import EagleDataModule, EagleModule
from src.models.eagle3 import Eagle3Config, Eagle3Head, ttt_forward
from src.models.eagle_formats import save_speculators


class Eagle3Module(EagleModule):
    """An EagleModule that trains and exports an EAGLE-3 head (``predict`` is unchanged: EagleDrafter loads it).

    Args:
        head_path: the folder ``fit`` writes the head to, in the speculators format (``config.json`` +
            ``model.safetensors``); EagleDrafter methods without their own path load it.
        top_tokens: the draft vocabulary: the most frequent ids of the training data (FR-Spec), exported as
            ``d2t`` / ``t2d``; None: the whole vocabulary.
        feature_loss_weight: weight of EAGLE-1's feature regression, here of norm(h) on the target's f (0: tokens
            only, the EAGLE-3 recipe; > 0 for the A/B).
        token_loss_weight: weight of the cross-entropy against the target's distribution.
        unroll_steps: steps of the training-time test (SpecForge's ``ttt_length``).
        step_weight: step j's loss weighs step_weight^(j-1) (SpecForge: 0.8).
        learning_rate, weight_decay, eval_steps, **kwargs: as :class:`~src.lit.eagle.EagleModule`.
    """

    def __init__(
        self,
        head_path: str = "artifacts/eagle3/head",
        top_tokens: int | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        feature_loss_weight: float = 0.0,
        token_loss_weight: float = 1.0,
        unroll_steps: int = 3,
        step_weight: float = 0.8,
        eval_steps: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(head_path=head_path, top_tokens=top_tokens, learning_rate=learning_rate,
                         weight_decay=weight_decay, feature_loss_weight=feature_loss_weight,
                         token_loss_weight=token_loss_weight, unroll_steps=unroll_steps, eval_steps=eval_steps,
                         **kwargs)
        if isinstance(step_weight, bool) or not isinstance(step_weight, (int, float)) or not 0 < step_weight <= 1:
            raise InvalidParameterError(f"step_weight={step_weight!r} is invalid: use a value in (0, 1], e.g. 0.8")
        self.step_weight = float(step_weight)

    # ---- fit ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return super(EagleModule, self).setup(stage)
        pair = self.ensure_pair()
        data = self.trainer.datamodule
        if not isinstance(data, EagleDataModule):
            raise InvalidParameterError("fitting an EAGLE-3 head needs data: class_path src.lit.eagle.EagleDataModule")
        layers = data.resolved_aux_layers(self)
        if layers is None:
            raise InvalidParameterError("an EAGLE-3 head reads three target layers: set data.init_args.aux_layers: auto "
                                        "(or the layer ids), with a store_dir of its own")
        stored = data.store.aux_layers()
        if stored != layers:
            raise IncompatibleModelsError(f"feature store {data.store_dir} keeps target layers {stored} but the head "
                                          f"reads {list(layers)}: build an EAGLE-3 store (another store_dir)")
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
            config = Eagle3Config.for_target(target.config, draft_vocab_size=None if ids is None else len(ids),
                                             aux_layers=layers)
            self.head = Eagle3Head(config, draft_ids=ids).float()  # float32 master weights (see EagleModule)
            self.head.init_from_target(target)

    def ttt_passes(self, batch: dict[str, torch.Tensor], steps: int) -> list[torch.Tensor]:
        """h^j (B, n, H) for j = 1..steps over rows p = 0..n-1 (n = T - 1): :func:`src.models.eagle3.ttt_forward`."""
        with torch.no_grad():
            embedded = self.head.embedding(self.pair.target.model)(batch["input_ids"][:, 1:])  # x_{p+1}: (B, n, H)
        return ttt_forward(self.head, batch["aux_features"][:, :-1], embedded.to(self.head.fc.weight.dtype), steps)

    def _draft_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target lm_head's rows (V_d, H) and bias of the draft vocabulary."""
        _, weight, bias = self._frozen()
        ids = self.head.vocab_ids().to(weight.device)
        return weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids)

    def training_step(self, batch, batch_idx):
        features = batch["features"]  # (B, T, H)
        mask = (batch["loss_mask"] & batch["attention_mask"])[:, 1:]  # (B, n): x_{p+1}, x_{p+2} in the answer
        n = mask.shape[1]
        with torch.no_grad():  # the target's distribution over the draft vocabulary: once, shared by every step
            weight, bias = self._draft_rows()
            p = torch.softmax(F.linear(features[:, 1:].to(weight.dtype), weight, bias).float(), -1)  # (B, n, V_d)
        rows = torch.arange(n, device=mask.device)[None]
        loss = 0.0
        for j, hidden in enumerate(self.ttt_passes(batch, self.unroll_steps), start=1):
            valid = (mask & (rows >= j - 1)).float()  # a step-j chain needs j - 1 rows before it
            count = valid.sum().clamp_min(1.0)
            log_q = torch.log_softmax(self.head.logits(hidden).float(), -1)
            cross_entropy = (-(p * log_q).sum(-1) * valid).sum() / count
            step = self.token_loss_weight * cross_entropy
            if self.feature_loss_weight:
                regression = F.smooth_l1_loss(self.head.norm(hidden), features[:, 1:].to(hidden.dtype),
                                              reduction="none").mean(-1)
                step = step + self.feature_loss_weight * (regression * valid).sum() / count
            loss = loss + self.step_weight ** (j - 1) * step
            if j == 1:
                self.log("train_token_loss", cross_entropy, on_step=False, on_epoch=True, batch_size=len(mask))
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(mask))
        return loss

    def validation_step(self, batch, batch_idx):
        """Counts per conversation as :meth:`EagleModule.validation_step`: chain starts s (x_{s+1} in the answer,
        every step inside the conversation) and those whose steps 1..j all agree with the target's greedy token,
        the data's tokens following the target's choices (so the chain's inputs are what the drafts would be)."""
        _, weight, bias = self._frozen()
        ids = batch["input_ids"]
        mask = batch["loss_mask"] & batch["attention_mask"]  # (B, T)
        B, T = ids.shape
        J = self.eval_steps
        N = T - 1 - J  # chain starts s with every step inside the padded batch
        if N < 1:
            return
        outputs = self.ttt_passes(batch, J)
        # g_{p+2}: the target's greedy token after row p (from f_{p+1}), over the whole vocabulary
        choice = self.head_choice(batch["features"][:, 1:], weight, bias, None, full=True)  # (B, T - 1)
        vocab_ids = self.head.vocab_ids().to(ids.device)
        lengths = batch["attention_mask"].sum(1, keepdim=True)
        starts = torch.arange(N, device=ids.device)[None]
        valid = mask[:, 1 : 1 + N] & (starts < lengths - 1 - J)  # (B, N)
        chain = torch.ones_like(valid)
        counts = torch.zeros(B, J + 1, dtype=torch.float64)
        counts[:, 0] = valid.sum(1).double().cpu()
        for j, hidden in enumerate(outputs, start=1):
            rows = slice(j - 1, j - 1 + N)  # step j of the chain starting at s sits at row s + j - 1
            drafted = vocab_ids[self.head.logits(hidden[:, rows]).argmax(-1)]  # (B, N)
            agree = drafted == choice[:, rows]
            if j > 1:  # its input token x_{s+j} must be the target's greedy choice at row s + j - 2
                agree &= ids[:, j : j + N] == choice[:, j - 2 : j - 2 + N]
            chain &= agree & mask[:, j : j + N]
            counts[:, j] = (chain & valid).sum(1).double().cpu()
        keys = batch["item_index"].cpu()
        if bool((keys < 0).any()):
            raise InvalidParameterError("validation batches need item_index per conversation: serve them from "
                                        "src.data.features.FeatureDataset")
        self._val_keys.append(keys)
        self._val_counts.append(counts)

    def export_head(self, metadata: dict[str, Any]) -> tuple:
        """The speculators folder (``config.json`` with the verifier block, ``model.safetensors``)."""
        metadata = {**metadata, "step_weight": self.step_weight, "feature_loss_weight": self.feature_loss_weight}
        return save_speculators(self.head, self.head_path, self.pair.target.info,
                                self.pair.target.model.config, metadata)
