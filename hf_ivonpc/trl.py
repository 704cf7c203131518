"""PCTrainer inside TRL: ``PCSFTConfig`` / ``PCSFTTrainer`` and ``PCDPOConfig`` / ``PCDPOTrainer``.

Imported on demand only (``pip install "hf_ivonpc[trl]"``). Each configuration is
``PCArgsMixin`` over TRL's own (every TRL default kept; ``learning_rate`` unset is IVON's 1.0 for
the IVON methods, TRL's otherwise), each trainer ``PCTrainerMixin`` over TRL's, with what TRL needs
on top (``_TRLMixin``):

- TRL counts its training metrics (tokens, entropy, token accuracy, rewards) in ``compute_loss``;
  the theta_out pass and the mega-batch go through it too, and what they count is undone, so the
  logs count each real micro-batch once;
- TRL writes its model card when a checkpoint starts, before the checkpoint's posterior exists:
  the card is written again after it (and by ``save_model`` into ``output_dir``), naming the
  method, TRL's trainer and the posterior; TRL's ``create_model_card(model_name,
  dataset_name, tags)`` arguments are accepted;
- evaluation with ``eval_mc_samples = k > 0``: for SFT the loss is the negative log-likelihood
  per token of the posterior predictive (token probabilities averaged over k draws), and SFT's
  entropy and token accuracy are those of the predictive; DPO refuses it (a DPO loss of a
  predictive distribution is not defined), and adds no perplexity to its loss.

DPO's reference: an explicit ``ref_model``, a LoRA model's disabled adapters, or reference
log-probabilities precomputed once (``precompute_ref_log_probs=True``, recommended: otherwise the
theta_out pass repeats the reference forwards). Its effective sample size counts preference pairs.

Trainers that generate their batches inside the training step (GRPO, RLOO, online DPO) cannot be
combined: ``PCTrainerMixin`` refuses them when such a class is defined.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('hf_ivonpc.trl needs TRL: pip install "hf_ivonpc[trl]"') from e

from .args import PCArgsMixin
from .trainer import PCTrainerMixin

__all__ = ["PCSFTConfig", "PCSFTTrainer", "PCDPOConfig", "PCDPOTrainer"]


@dataclass
class PCSFTConfig(PCArgsMixin, SFTConfig):
    """TRL's ``SFTConfig`` plus the variational and correction settings (for ``PCSFTTrainer``)."""


@dataclass
class PCDPOConfig(PCArgsMixin, DPOConfig):
    """TRL's ``DPOConfig`` plus the variational and correction settings (for ``PCDPOTrainer``)."""

    def __post_init__(self):
        if isinstance(self.eval_mc_samples, int) and self.eval_mc_samples > 0:   # < 0: the table's error
            raise ValueError(
                f"eval_mc_samples={self.eval_mc_samples!r} is invalid with DPO: accepted range is 0 "
                "(the DPO loss is defined for one policy against its reference, not for a posterior "
                "predictive; evaluate at the posterior mean, or sample with hf_ivonpc.Posterior)")
        super().__post_init__()


class _TRLMixin(PCTrainerMixin):
    """What TRL's trainers need on top of ``PCTrainerMixin`` (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        self._card: dict = {}   # the card's arguments, kept for the cards written later
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _uncounted_pass(self):
        """Undo what TRL's ``compute_loss`` counted in this block (``_metrics``, the token count)."""
        kept = {mode: {k: list(v) for k, v in m.items()} for mode, m in self._metrics.items()}
        tokens = self._total_train_tokens
        try:
            yield
        finally:
            for mode, m in self._metrics.items():
                m.clear()
                m.update(kept[mode])
            self._total_train_tokens = tokens

    # ------------------------------------------------------------------ the model card
    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **card) -> None:
        """TRL's arguments (``model_name``, ``dataset_name``, ``tags``) and Trainer's (``language``,
        ``license``, ``finetuned_from``, ``dataset``, ...): hf_ivonpc's card, which names the method,
        TRL's trainer and the posterior saved in ``output_dir``."""
        if dataset_name is not None:
            card.setdefault("dataset", dataset_name)
        card.update(model_name=model_name, tags=tags)
        self._card.update({k: v for k, v in card.items() if v is not None})
        self._write_model_card(self.args.output_dir, **self._card)

    def _save_checkpoint(self, model, trial):
        """TRL writes its card before the checkpoint (and its posterior) exists: write it again
        after, describing the checkpoint's posterior."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._write_model_card(folder, **self._card)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save, then the card, when the model is saved into ``output_dir`` (TRL keeps a
        card there): it describes the posterior now beside the weights."""
        super().save_model(output_dir, _internal_call)
        target = self.args.output_dir if output_dir is None else output_dir
        if not _internal_call and os.path.abspath(target) == os.path.abspath(self.args.output_dir):
            self._write_model_card(self.args.output_dir, **self._card)


class PCSFTTrainer(_TRLMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training with IVON, IVON-PCM or alpha-SVRG (``args.pc_method``)."""

    args: PCSFTConfig
    args_class_name = "PCSFTConfig"

    def _loss_is_token_nll(self) -> bool:
        return ((self.args.eval_mc_samples > 0 or self.args.loss_type == "nll")
                and super()._loss_is_token_nll())

    def _predictive_metrics(self, log_probs, labels) -> None:
        """SFT's evaluation metrics, of the predictive: entropy and top-1 accuracy per predicted token."""
        gather = self.accelerator.gather_for_metrics
        mask = labels != -100
        n = gather(mask.sum()).sum()
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy_sum = gather(entropy[mask].sum()).sum()
        correct = gather((log_probs.argmax(-1) == labels)[mask].sum()).sum()
        metrics = self._metrics["eval"]
        metrics["entropy"].append((entropy_sum / n).item() if n > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
        metrics["num_tokens"] = [self._total_train_tokens]


class PCDPOTrainer(_TRLMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` training with IVON, IVON-PCM or alpha-SVRG (``args.pc_method``)."""

    args: PCDPOConfig
    args_class_name = "PCDPOConfig"

    def likelihood_terms(self) -> float:
        """Preference pairs in the training set: the DPO loss has one term per pair."""
        return float(len(self.train_dataset))

    def _loss_is_token_nll(self) -> bool:
        return False
