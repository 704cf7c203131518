"""PCTrainer: transformers.Trainer training with IVON, IVON-PCM or alpha-SVRG.

Changing ``Trainer``/``TrainingArguments`` to ``PCTrainer``/``PCTrainingArguments`` is the whole
change. What it does lives in ``PCTrainerMixin``, whose methods each call ``super()``: it goes
first over any ``Trainer`` subclass whose batches come from its dataset, as in
``PCTrainer(PCTrainerMixin, Trainer)`` and TRL's trainers in :mod:`hf_ivonpc.trl`. Trainers that
make their batches inside the training step (TRL's GRPO, RLOO, online DPO) are refused when the
class is defined. Per micro-batch, ``training_step`` runs Trainer's own step (same loss, same gradient-
accumulation scaling, same backward) inside ``sampled_params``: at theta_in, and from
``pc_start_step`` on also at theta_out with the random state replayed, so that dropout is the
same in both passes. Before the first micro-batch of a step that needs it, the outer statistics
are refreshed from ``pc_megabatch_factor`` mini-batches drawn at random from the training set by
a seeded sampler of its own.

Several processes with DDP (``accelerate launch --multi_gpu``): every rank draws its own noise and
pairs it with its own gradients; DDP's gradient all-reduce is switched off and the optimizer
averages the paired statistics over ranks (``sync=True``), so all ranks take the same step.

FSDP2 (``fsdp_version: 2``): the optimizer's state covers each rank's shards and every rank draws
the noise of its shards, so all ranks evaluate the same theta and FSDP's reduce-scatter averages
gradients made at that one draw (the "shared noise" option); the gradients of every micro-batch
are reduced at once, also inside Trainer's ``no_sync`` of gradient accumulation, because each
micro-batch has its own draw. The posterior is gathered from the shards when it is saved.
FSDP1 and DeepSpeed are refused with a clear error.

``max_grad_norm`` is applied inside the optimizer to each micro-batch's gradient at its share
(Trainer's own clipping comes after ``training_step``, when the optimizer has consumed the
gradients); the theta_out pass of a micro-batch is scaled by the factor of its theta_in pass, so
that their difference cancels where the two gradients agree.

At ``logging_steps`` the IVON methods log what the optimizer measured (``pc_log_diagnostics``):
``pc/clipped_share`` (updates at the clip radius) and, for IVON-PCM, ``pc/grad_var_ratio`` and
``pc/hess_var_ratio`` (variance of the corrected estimate over the plain one: below 1 the
correction removes noise, above 1 it adds some) and ``pc/h_out_negative_share``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.data import Dataset
from transformers import Trainer

from .args import PCArgsMixin
from .optim import IVON, IVONPC, AlphaSVRG, MegaBatchSampler
from .optim.hparams import DEFAULT_SIGMA0, beta2_for_horizon, optimizer_kwargs
from .optim._base import FlatStateOptimizer


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.random.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@contextlib.contextmanager
def _gradient_sync(model):
    """FSDP2: reduce-scatter the gradients of this block's backward, then restore no-sync."""
    model.set_requires_gradient_sync(True)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(False)


def _global_stats(opt: FlatStateOptimizer, tensors: list[torch.Tensor]) -> dict[str, float]:
    """sum, sum of squares, count and min over the elements of ``tensors``, over all shards
    (accumulated in fp64 tensor by tensor: no model-sized temporary)."""
    f64 = dict(dtype=torch.float64, device=tensors[0].device)
    sums, low = torch.zeros(3, **f64), torch.tensor(math.inf, **f64)
    for t in tensors:
        if t.numel():
            sums += torch.stack([t.sum(dtype=torch.float64),
                                 torch.linalg.vector_norm(t, dtype=torch.float64).square(),
                                 torch.tensor(float(t.numel()), **f64)])
            low = torch.minimum(low, t.min().double())
    if opt.sharded:
        torch.distributed.all_reduce(sums, group=opt.process_group)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=opt.process_group)
    s, sq, n = sums.tolist()
    return {"sum": s, "sumsq": sq, "count": n, "min": low.item()}


#: trainers that make their own batches inside the training step (generation from the current
#: weights) without overriding ``_prepare_inputs``; their subclasses are refused too
ONLINE_TRAINERS = ("OnlineDPOTrainer", "GKDTrainer", "AsyncGRPOTrainer", "AsyncDistillationTrainer",
                   "PPOTrainer")
#: where the mixin is supported
SUPPORTED = ("transformers.Trainer (PCTrainer) and TRL's SFTTrainer and DPOTrainer "
             "(hf_ivonpc.trl.PCSFTTrainer, PCDPOTrainer), or a Trainer subclass that changes only "
             "the loss")


def _online_base(cls: type) -> type | None:
    """The class in ``cls``'s bases that builds its batches inside the training step: it replaces
    Trainer's ``_prepare_inputs`` (GRPO, RLOO, the distillation trainers) or is a known online
    trainer."""
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] in ("hf_ivonpc", "transformers", "builtins"):
            continue
        if base.__name__ in ONLINE_TRAINERS or "_prepare_inputs" in vars(base):
            return base
    return None


class PCTrainerMixin:
    """What ``PCTrainer`` adds to a ``Trainer``: the optimizer (IVON, IVON-PCM or alpha-SVRG,
    ``args.pc_method``), the two-pass step, the mega-batch, the logs, the posterior predictive in
    evaluation, the posterior beside every saved model and its model card. Mixed in first, over a
    ``Trainer`` subclass, with arguments that mix in ``PCArgsMixin``."""

    args: PCArgsMixin
    #: the arguments class to name in errors
    args_class_name = "PCTrainingArguments"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = _online_base(cls)
        if base is not None:
            raise TypeError(
                f"{cls.__name__} mixes PCTrainerMixin into {base.__name__}, whose data flow the "
                "two-pass step cannot follow: it generates its training batches inside the training "
                "step (rollouts or completions from the current weights), so the theta_out pass would "
                "be evaluated on other samples than theta_in, a mega-batch refresh would generate "
                "rollouts of its own, and generation would sample at noisy weights. Supported: "
                f"{SUPPORTED}.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PCArgsMixin):
            raise ValueError(f"args is a {type(self.args).__name__}: {type(self).__name__} needs "
                             f"{self.args_class_name}")
        self._check_distributed()
        self._mega_sampler: MegaBatchSampler | None = None
        self._pc_logs: dict[str, float] = {}
        if self.args.corrects and self.train_dataset is not None:
            self._check_megabatch(self.train_dataset)
        self._answer_ids = self._encode_answer_tokens(self.args.eval_answer_tokens)
        self._count_shifted_labels()

    def _count_shifted_labels(self) -> None:
        """Trainer divides a causal LM's summed token loss by the label tokens it counts
        (``num_items_in_batch``, in training and evaluation), over ``labels[..., 1:]`` only when
        the model's ``loss_type`` attribute names the causal-LM loss. GPT-2 leaves it None and
        still computes that shifted loss (transformers 5.24), so every row's first label was
        counted as well: the losses of a window of T tokens read (T - 1) / T of their value
        (5.657 for 5.702 on the offline GPT-2's validation windows) and the gradients were scaled
        alike. The count follows the loss the model computes."""
        from transformers.loss.loss_utils import ForCausalLMLoss

        if not hasattr(self, "_loss_shifts_labels") or self._loss_shifts_labels:
            return
        if not self._is_causal_lm(self.model):   # (loss_function defaults to it for every model)
            return
        model = self.accelerator.unwrap_model(self.model)
        base = getattr(model, "get_base_model", lambda: model)()
        try:
            shifted = getattr(base, "loss_function", None) is ForCausalLMLoss
        except (AttributeError, KeyError, ValueError):
            shifted = False
        if shifted and not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
            self._loss_shifts_labels = True

    @property
    def is_fsdp2(self) -> bool:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) == 2

    def _check_distributed(self) -> None:
        if self.args.pc_method == "none":
            return
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.is_fsdp2):
            raise ValueError(f"pc_method={self.args.pc_method!r} does not support "
                             f"{'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP1'}: use FSDP2 "
                             "(fsdp_version: 2 in the Accelerate config or fsdp_config), DDP "
                             "(`accelerate launch --multi_gpu`), or pc_method='none'")

    # ------------------------------------------------------------------ optimizer
    def _micro_batches_per_step(self) -> int:
        """Micro-batches of per_device_train_batch_size in one optimizer step, over all ranks."""
        return self.args.gradient_accumulation_steps * self.args.world_size

    def _check_megabatch(self, dataset) -> None:
        if not hasattr(dataset, "__len__"):
            raise ValueError("pc_method needs a mega-batch sampled from the training set, but the "
                             "train_dataset has no length (an iterable dataset): use a map-style "
                             "dataset or pc_method='ivon'")
        per_step = self.args.per_device_train_batch_size * self._micro_batches_per_step()
        need = self.args.pc_megabatch_factor * per_step
        if need > len(dataset):
            raise ValueError(f"pc_megabatch_factor={self.args.pc_megabatch_factor} is invalid: the "
                             f"mega-batch ({need} examples) exceeds the {len(dataset)} training "
                             f"examples; accepted range is [1, {len(dataset) // per_step}]")

    def create_optimizer(self, model=None):
        args = self.args
        if self.optimizer is not None or args.pc_method == "none":
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        sync = args.world_size > 1 and not self.is_fsdp_enabled
        kw = optimizer_kwargs(args, args.pc_method)
        if args.pc_method == "alpha_svrg":
            base = "sgd" if str(getattr(args.optim, "value", args.optim)).startswith("sgd") else "adamw"
            self.optimizer = AlphaSVRG(groups, lr=args.learning_rate, base=base, seed=args.seed,
                                       betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                       **kw)
            # the optimizer consumes each micro-batch's gradient: it averages them over ranks
            # (FSDP's reduce-scatter does it under FSDP)
            self.optimizer.sync = sync
            return self.optimizer
        # Several processes: each rank draws its own noise (seed + rank) and pairs it with its own
        # gradients; the optimizer averages g and noise x g over ranks at step time (sync=True),
        # and DDP's own all-reduce of gradients made with different noise is switched off.
        kw.update(lr=args.learning_rate, ess=self.resolved_ess(), seed=args.seed, sync=sync)
        cls = IVON if args.pc_method == "ivon" else IVONPC
        self.optimizer = cls(groups, **kw)
        return self.optimizer

    def _rebind_sharded_params(self) -> None:
        """Accelerate's FSDP2 preparation swaps the optimizer's parameters for their shards after
        the optimizer was built: rebuild its state over the shards."""
        opt = self.pc_optimizer
        if opt is not None and any(p not in opt.state for g in opt.param_groups for p in g["params"]):
            opt.rebind_params()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Trainer creates the scheduler right after accelerator.prepare, before loading a checkpoint
        # and before the first step: the run's length is known here
        self._rebind_sharded_params()
        opt = self.pc_optimizer
        if opt is not None and opt.corrects:
            opt.start_step = self.args.start_step(num_training_steps)
        if opt is not None and "beta2" in opt.defaults and self.args.ivon_beta2 is None:
            for group in opt.param_groups:
                group["beta2"] = beta2_for_horizon(num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def resolved_ess(self) -> float:
        """IVON's effective sample size for this run: ``ivon_ess``, or ``default_ess()`` when unset
        (resolved once, then read by the optimizer and the model card)."""
        if getattr(self, "_ess", None) is None:
            self._ess = self.args.ivon_ess if self.args.ivon_ess is not None else self.default_ess()
        return self._ess

    def default_ess(self) -> float:
        """IVON's effective sample size when ``ivon_ess`` is unset: the number of likelihood terms
        in the training set, and at least ``1 / (ivon_hess_init * DEFAULT_SIGMA0^2)``.

        Every predicted token is a term for language models (examples x label tokens of the first
        example, or x its length when labels are made by the collator); every example otherwise.
        The floor keeps the initial posterior std at most 1e-3, well below the scale of
        transformer weights (~2e-2 at initialisation): with ess = 1,400 examples and
        hess_init = 1e-3 a small BERT gets sigma = 0.85 and stays at chance."""
        floor = 1.0 / (self.args.ivon_hess_init * DEFAULT_SIGMA0 ** 2)
        return max(floor, self.likelihood_terms())

    def likelihood_terms(self) -> float:
        """Examples, or predicted tokens for language models, in the training set."""
        ds = self.train_dataset
        n = len(ds)
        try:
            first = ds[0]
        except Exception:  # an unusual dataset: count examples
            return float(n)
        if not isinstance(first, dict):
            return float(n)
        labels = first.get("labels")
        if labels is not None:
            t = torch.as_tensor(labels)
            return float(n * max(1, int((t != -100).sum()))) if t.ndim >= 1 else float(n)
        ids = first.get("input_ids")
        if ids is not None and self._is_causal_lm(self.model):
            return float(n * len(ids))
        return float(n)

    @property
    def pc_optimizer(self) -> FlatStateOptimizer | None:
        """Our optimizer, unwrapped from Accelerate's ``AcceleratedOptimizer``."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        return opt if isinstance(opt, FlatStateOptimizer) else None

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's ``train``, resuming only from a complete checkpoint (``hf_ivonpc.checkpoints``):
        ``True`` skips, with a warning saying what each lacks, newer checkpoint folders that a
        killed process left half-written; an incomplete folder given by path is refused."""
        from .checkpoints import resolve_resume
        resume_from_checkpoint = resolve_resume(
            resume_from_checkpoint, self.args.output_dir, world_size=self.args.world_size,
            posterior=self.args.pc_method in ("ivon", "ivon_pcm"), model_only=self.args.save_only_model)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.pc_optimizer
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # Trainer scales each micro-batch's loss for accumulation: the parts add up
        opt.grad_reduction = "sum"
        opt.max_skipped_steps = self.args.pc_max_skipped_steps
        if opt.collected == 0 and hasattr(opt, "diagnostics"):
            opt.track_diagnostics = self._diagnostics_due(opt)
        if opt.collected == 0 and opt.needs_refresh:
            # mega-batch micro-batches are whole (unscaled) estimates: the full max_grad_norm
            opt.max_grad_norm = self.args.max_grad_norm or None
            self._refresh(model, opt)
        # Trainer clips after training_step, when the gradients are consumed: clip each part
        # inside the optimizer instead, at the part's share of max_grad_norm
        ga = self.args.gradient_accumulation_steps
        opt.max_grad_norm = self.args.max_grad_norm / ga if self.args.max_grad_norm else None
        state = _rng_state()
        with self._local_gradients(model, opt), opt.sampled_params(train=True):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if opt.correction_active:
            _set_rng_state(state)
            with (self._local_gradients(model, opt), opt.sampled_params(train=True, at="out"),
                  self._uncounted_pass()):
                super().training_step(model, inputs, num_items_in_batch)
        return loss

    def _uncounted_pass(self):
        """Around the passes that are not a new micro-batch (theta_out, the mega-batch): a base
        trainer that counts its metrics in ``compute_loss`` (TRL's) undoes what they counted."""
        return contextlib.nullcontext()

    def _diagnostics_due(self, opt) -> bool:
        """Whether this step measures the diagnostics: about 8 steps per logging window (in high
        dimension one step's variance estimate is already precise) and every refresh."""
        if not self.args.pc_log_diagnostics:
            return False
        window = getattr(self.state, "logging_steps", None) or self.args.logging_steps
        stride = max(1, int(window) // 8) if window and window >= 1 else 1
        return self.state.global_step % stride == 0 or opt.needs_refresh

    def _local_gradients(self, model, opt: FlatStateOptimizer):
        """No DDP all-reduce where the optimizer reduces its paired statistics itself; under FSDP2,
        a reduce-scatter after every micro-batch (each has its own draw), also where Trainer
        accumulates gradients unreduced."""
        if opt.sync:
            return self.accelerator.no_sync(model)
        if opt.sharded and hasattr(model, "set_requires_gradient_sync"):
            return _gradient_sync(model)
        return contextlib.nullcontext()

    def _train_examples(self) -> Dataset:
        ds = self.train_dataset
        try:
            import datasets
            if isinstance(ds, datasets.Dataset):
                ds = self._remove_unused_columns(ds, description="mega-batch")
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass
        return ds

    def _refresh(self, model, opt: FlatStateOptimizer) -> None:
        """Outer statistics from a mega-batch (Alg. 4 lines 3-5): each micro-batch its own draw."""
        ds = self._train_examples()
        if self._mega_sampler is None:
            self._check_megabatch(ds)
            self._mega_sampler = MegaBatchSampler(
                len(ds), self.args.per_device_train_batch_size,
                self.args.pc_megabatch_factor * self._micro_batches_per_step(), seed=self.args.seed)
        model.train()
        losses = []
        with opt.refreshing(), self._uncounted_pass():
            # the optimizer's count of refreshes made and discarded (in its state_dict) picks the
            # mega-batch: a resumed run draws the same ones, and a refresh discarded for a
            # non-finite micro-batch is not retried on the same examples
            # each rank evaluates its share of the mega-batch's micro-batches
            parts = self._mega_sampler.sample(index=opt.refreshes + opt.counters["skipped_refreshes"])
            for idx in parts[self.args.process_index::self.args.world_size]:
                batch = self._prepare_inputs(self.data_collator([ds[int(i)] for i in idx]))
                with self._local_gradients(model, opt), opt.sampled_params(train=True, at="mega"):
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, batch)
                    self.accelerator.backward(loss)
                losses.append(loss.detach().float())
        flat = opt.flat_state()
        g_out = _global_stats(opt, [f["g_out"] for f in flat])
        # every rank evaluated an equal share of the mega-batch
        megabatch_loss = self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
        self._pc_logs = {"pc/megabatch_loss": megabatch_loss.item(),
                         "pc/g_out_norm": math.sqrt(g_out["sumsq"])}
        if "h_out" in flat[0]:
            h_out = _global_stats(opt, [f["h_out"] for f in flat])
            self._pc_logs["pc/h_out_mean"] = h_out["sum"] / h_out["count"]

    # ------------------------------------------------------------------ evaluation
    def _is_causal_lm(self, model) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        model = self.accelerator.unwrap_model(model)
        base = getattr(model, "get_base_model", lambda: model)()   # peft
        return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """With ``eval_mc_samples = k > 0``: the posterior predictive. Output probabilities are
        averaged over k draws; the loss is its negative log-likelihood (per token for causal LMs,
        so ``exp(eval_loss)`` is the predictive perplexity) and the returned logits are its log
        probabilities. The draws come from a generator of their own, seeded per evaluation, so
        evaluating does not change the training noise."""
        k = self.args.eval_mc_samples
        opt = self.pc_optimizer
        if k == 0 or opt is None or not hasattr(opt, "posterior_std"):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        logp = self._predictive_log_probs(model, {n: v for n, v in inputs.items() if n != "labels"}, k)
        loss = None
        if labels is not None:
            lp, lab = logp, labels
            if self._is_causal_lm(model):
                lp, lab = logp[..., :-1, :], labels[..., 1:]
            loss = torch.nn.functional.nll_loss(lp.reshape(-1, lp.shape[-1]), lab.reshape(-1),
                                                ignore_index=-100)
            self._predictive_metrics(lp, lab)
        if prediction_loss_only:
            return loss, None, None
        return loss, logp, labels

    @contextlib.contextmanager
    def _evaluation_draws(self):
        """The optimizer's noise comes from a generator of its own for the block, seeded by the
        step (every batch of an evaluation gets the same draws), so evaluating does not change
        the training noise."""
        opt = self.pc_optimizer
        train_generator = opt.generator
        opt.generator = torch.Generator(device=train_generator.device).manual_seed(
            self.args.seed + 7919 * (self.state.global_step + 1) + self.args.process_index)
        try:
            with torch.no_grad():
                yield opt
        finally:
            opt.generator = train_generator

    def _predictive_log_probs(self, model, feed: dict, k: int) -> torch.Tensor:
        """log of the output probabilities averaged over ``k`` draws from the posterior."""
        with self._evaluation_draws() as opt:
            probs = None
            for _ in range(k):
                with opt.sampled_params():
                    out = model(**feed)
                logits = out["logits"] if isinstance(out, dict) else out[0]
                p = logits.float().softmax(-1)
                probs = p if probs is None else probs.add_(p)
        return probs.div_(k).clamp_min_(1e-30).log_()

    # ------------------------------------------------------------------ multiple-choice answers
    def _encode_answer_tokens(self, tokens) -> torch.Tensor | None:
        """``eval_answer_tokens`` as token ids of the processing class (each exactly one token)."""
        if tokens is None:
            return None
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)   # a processor's
        if tok is None or not callable(getattr(tok, "encode", None)):
            raise ValueError(f"eval_answer_tokens={list(tokens)!r} needs a tokenizer: pass "
                             "processing_class=tokenizer to the trainer")
        ids = []
        for t in tokens:
            enc = tok.encode(t, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"eval_answer_tokens={list(tokens)!r} is invalid: {t!r} is {len(enc)} "
                                 f"tokens {enc} of the tokenizer; accepted are strings of one token each "
                                 "(for SmolLM2 and Llama tokenizers ' A', with its leading space)")
            ids.append(enc[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"eval_answer_tokens={list(tokens)!r} is invalid: they encode to the token "
                             f"ids {ids}, not all distinct")
        return torch.tensor(ids)

    def _answer_labels(self, batch: dict) -> torch.Tensor:
        labels = batch.get("labels")
        c = len(self._answer_ids)
        if labels is None or labels.dtype.is_floating_point or labels.numel() != batch["input_ids"].shape[0] \
                or bool(((labels < 0) | (labels >= c)).any()):
            shape = None if labels is None else tuple(labels.shape)
            raise ValueError(f"eval_answer_tokens is set, so every eval row's 'labels' must be the index of "
                             f"its gold answer, an integer in [0, {c - 1}]; got labels of shape {shape}"
                             + ("" if labels is None else f" with values in [{int(labels.min())}, "
                                                          f"{int(labels.max())}]"))
        return labels.reshape(-1)

    def _evaluate_answers(self, eval_dataset, metric_key_prefix: str) -> dict[str, float]:
        """Evaluation with ``eval_answer_tokens``: the answer distribution (a softmax over the
        answer tokens at the last position) at the mean and, with ``eval_mc_samples = k > 0``, at
        k posterior draws; metrics from :func:`hf_ivonpc.uncertainty.question_metrics`."""
        import time

        from . import uncertainty as U
        from .posterior import selected_logits

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, ds in dataset.items():
                metrics.update(self._evaluate_answers(ds, f"{metric_key_prefix}_{name}"))
            return metrics
        start = time.time()
        dataloader = self.get_eval_dataloader(dataset)
        model, ids = self.model, self._answer_ids
        opt = self.pc_optimizer
        k = self.args.eval_mc_samples if opt is not None and hasattr(opt, "posterior_std") else 0
        means, draws, labels = [], [], []
        seconds = {"mean": 0.0, "draws": 0.0}
        was_training = model.training
        model.eval()
        try:
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                lab = self._answer_labels(batch)
                feed = {n: v for n, v in batch.items() if n != "labels"}
                t = time.perf_counter()
                with torch.no_grad(), self.compute_loss_context_manager():
                    mean = selected_logits(model, feed, ids).float().softmax(-1)
                seconds["mean"] += time.perf_counter() - t
                t = time.perf_counter()
                per = []
                if k:
                    with self._evaluation_draws() as o:
                        for _ in range(k):
                            with o.sampled_params(), self.compute_loss_context_manager():
                                per.append(selected_logits(model, feed, ids).float().softmax(-1))
                    seconds["draws"] += time.perf_counter() - t
                per = torch.stack(per, 1) if per else mean[:, None]     # [B, S, C]
                mean, per, lab = self.accelerator.gather_for_metrics((mean, per, lab))
                means.append(mean.cpu().double())
                draws.append(per.cpu().double())
                labels.append(lab.cpu())
        finally:
            model.train(was_training)
        result = {"mean": torch.cat(means).numpy(), "labels": torch.cat(labels).numpy(), "seconds": seconds,
                  "draws": torch.cat(draws, 0).transpose(0, 1).numpy() if k else None}
        metrics, _ = U.question_metrics({"": result}, None, metric_key_prefix)
        best = "pred" if k else "mean"
        metrics[f"{metric_key_prefix}_loss"] = metrics[f"{metric_key_prefix}_{best}_nll"]
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _predictive_metrics(self, log_probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Called with the predictive's log probabilities and the labels they predict (aligned):
        a base trainer that computes metrics of its own in ``compute_loss`` records them here."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation (with ``eval_mc_samples = k > 0`` of the predictive), or with
        ``eval_answer_tokens`` the mean's and the predictive's answer distributions side by side."""
        if self._answer_ids is not None:
            return self._evaluate_answers(eval_dataset, metric_key_prefix)
        # Trainer logs the metrics dict it returns: log() adds the perplexity to it in place
        return self._add_perplexity(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix))

    def _loss_is_token_nll(self) -> bool:
        """Whether the evaluation loss is a mean negative log-likelihood per token (its exp a
        perplexity): for causal language models, unless it is the NLL of a multiple-choice answer."""
        return self._answer_ids is None and self._is_causal_lm(self.model)

    def _add_perplexity(self, metrics: dict) -> dict:
        """``<prefix>_perplexity = exp(<prefix>_loss)`` beside every evaluation loss that is a
        per-token negative log-likelihood."""
        keys = [k for k in metrics if k.endswith("_loss") and k not in ("loss", "train_loss")]
        if keys and self._loss_is_token_nll():
            for k in keys:
                metrics[f"{k[:-5]}_perplexity"] = math.exp(min(metrics[k], 700.0))
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        opt = self.pc_optimizer
        self._add_perplexity(logs)
        if opt is not None:
            # Trainer's grad_norm is measured after training_step, when our optimizer has already
            # consumed the gradients: it would read 0
            logs.pop("grad_norm", None)
        if opt is not None and "loss" in logs:
            counts = opt.counters   # skipped for non-finite gradients, since the start
            logs["pc/skipped_steps"] = counts["skipped_steps"]
            if opt.corrects:
                logs["pc/skipped_refreshes"] = counts["skipped_refreshes"]
            if opt.last_grad_norm is not None:   # the last micro-batch's, at the window's scale
                logs["pc/grad_norm"] = opt.last_grad_norm.item() * self.args.gradient_accumulation_steps
            if "hess" in opt.flat_state()[0]:
                h = _global_stats(opt, [f["hess"] for f in opt.flat_state()])
                sigma = _global_stats(opt, opt.posterior_std())
                logs.update({"pc/h_mean": h["sum"] / h["count"], "pc/h_min": h["min"],
                             "pc/sigma_mean": sigma["sum"] / sigma["count"]})
            if hasattr(opt, "diagnostics"):
                logs.update({f"pc/{k}": v for k, v in opt.diagnostics().items()})
            logs.update(self._pc_logs)
            self._pc_logs = {}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ posterior, card, Hub
    def posterior(self):
        """The current posterior (an ``hf_ivonpc.Posterior``, tensors copied to the CPU), or None
        for methods without one ("alpha_svrg", "none") and before the optimizer exists. Under
        FSDP it is gathered from the shards: every rank must call it."""
        from .posterior import Posterior
        opt = self.pc_optimizer
        if opt is None or not hasattr(opt, "posterior_std"):
            return None
        return Posterior.from_optimizer(opt, self.model, method=self.args.pc_method,
                                        step=self.state.global_step)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save; under FSDP the posterior is gathered from the shards on every rank first
        (Trainer saves FSDP weights without ``_save``) and written by the main process."""
        opt = self.pc_optimizer
        if opt is None or not opt.sharded:
            return super().save_model(output_dir, _internal_call)
        gathered = self._posterior_and_match()
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._save_posterior(output_dir if output_dir is not None else self.args.output_dir, gathered)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save (the weights: the posterior mean), then ``posterior.safetensors`` beside
        them, on the main process. Checkpoints and ``save_model`` (hence ``push_to_hub``) both come
        through here (under FSDP, through ``save_model``)."""
        super()._save(output_dir, state_dict)
        opt = self.pc_optimizer
        if self.args.should_save and (opt is None or not opt.sharded):
            self._save_posterior(output_dir if output_dir is not None else self.args.output_dir,
                                 self._posterior_and_match())

    def _posterior_and_match(self):
        """(the posterior or None, whether the weights are still its mean); collective under FSDP."""
        from .optim._base import local
        opt, post = self.pc_optimizer, self.posterior()
        if post is None:
            return None, True
        match = all(torch.equal(local(opt.state[p]["mean"]).to(p.dtype), local(p).detach())
                    for g in opt.param_groups for p in g["params"])
        if opt.sharded:
            flag = torch.tensor(int(match), device=opt.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=opt.process_group)
            match = bool(flag.item())
        return post, match

    def _save_posterior(self, output_dir: str, gathered) -> None:
        import os

        from transformers.utils import logging

        from .posterior import copy_posterior, find_posterior, remove_posterior
        post, match = gathered
        if post is not None and not match:
            # the weights were replaced after the last step (load_best_model_at_end): the
            # posterior that belongs to them is the one saved with them
            best = self.state.best_model_checkpoint
            src = find_posterior(best) if best else None
            if src is not None and os.path.abspath(best) != os.path.abspath(output_dir):
                copy_posterior(best, output_dir)
                return
            logging.get_logger(__name__).warning(
                "posterior.safetensors not written to %s: the weights differ from the optimizer's "
                "posterior mean and no saved posterior belongs to them", output_dir)
            post = None
        if post is None:
            remove_posterior(output_dir)   # a stale posterior would describe other weights
            return
        post.save(output_dir)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None,
                          finetuned_from=None, tasks=None, dataset_tags=None, dataset=None,
                          dataset_args=None) -> None:
        """Write ``README.md`` into ``output_dir`` from ``hf_ivonpc/model_cards/posterior_model_card.md``.

        Unlike Trainer's card (which names ``args.optim``) it says which method trained the model,
        with every hyperparameter of it, the data, the final metrics, sigma per layer type and a
        snippet that samples from the posterior saved in ``output_dir``."""
        self._write_model_card(self.args.output_dir, language=language, license=license, tags=tags,
                               model_name=model_name, finetuned_from=finetuned_from, tasks=tasks,
                               dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args)

    def _write_model_card(self, posterior_dir: str, **card) -> None:
        """``README.md`` in ``output_dir``, describing the posterior saved in ``posterior_dir``."""
        if not self.is_world_process_zero():
            return
        import os
        from pathlib import Path

        from .model_card import render_model_card
        from .posterior import Posterior, atomic_write, find_posterior
        file = find_posterior(posterior_dir)
        posterior = Posterior.from_pretrained(file) if file is not None else None
        text = render_model_card(self, posterior, **card)
        atomic_write(os.path.join(self.args.output_dir, "README.md"),
                     lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer copies only the model's files from the checkpoint into ``output_dir`` and then
        uploads ``output_dir``: copy the checkpoint's posterior too and write the card first, so
        that model, posterior and card are pushed together."""
        from transformers.trainer_utils import HubStrategy

        from .posterior import copy_posterior, find_posterior, remove_posterior
        args, in_progress = self.args, getattr(self, "push_in_progress", None)
        if (self.is_world_process_zero() and args.hub_strategy != HubStrategy.END
                and (args.hub_always_push or in_progress is None or in_progress.is_done())):
            if find_posterior(checkpoint_folder) is not None:
                copy_posterior(checkpoint_folder, args.output_dir)
            else:
                remove_posterior(args.output_dir)
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)


class PCTrainer(PCTrainerMixin, Trainer):
    """A ``Trainer`` whose optimizer is IVON, IVON-PCM or alpha-SVRG (``args.pc_method``)."""
