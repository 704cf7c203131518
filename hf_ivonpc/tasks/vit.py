"""The paper's ViT fine-tuning (App. D.4) with PCTrainer: a CLIP's vision encoder trained with the
text encoder's class-name embeddings as a frozen classifier head (IVON-PCM by default).

    hf-ivonpc vit                  # offline default: a tiny CLIP, textiles, CPU
    accelerate launch -m hf_ivonpc vit --config vit_paper_ivon_pcm --dataset dtd
    hf-ivonpc vit --pc_method none --learning_rate 1e-3 --output_dir results/vit-adamw

Without ``--model_name_or_path`` a tiny CLIP is built first (contrastive pretraining on the
scikit-learn digits, about a minute, cached; see ``hf_ivonpc/data/tiny_clip.py``) and loaded with
``from_pretrained`` exactly as ``openai/clip-vit-base-patch32`` would be. The prompts
(``--prompt_template``) of every class name are embedded once; only the vision encoder and its
projection are trained. Zero-shot metrics (accuracy, NLL, ECE) are measured before training and
reported as ``zeroshot_*`` beside the final ``eval_*`` ones (the posterior predictive when
``eval_mc_samples`` > 0, and ``eval_mean_*`` at the posterior mean). Writes ``all_results.json``,
``log_history.json``, ``training_curves.png`` and the fine-tuned CLIP (a plain CLIP checkpoint with
its processor) to ``--output_dir``.

The ViT fine-tuning workload of the paper (App. D.4): a CLIP's vision encoder is fine-tuned with
its text encoder's class-name embeddings as a frozen classifier head.

The paper fine-tunes OpenCLIP ViT-B/32 on Cars, DTD, GTSRB and RESISC45 (``DATASETS``: Hub copies
with images and labels). Nothing installable offline ships CLIP weights, so the offline default
builds a tiny CLIP first (``tiny_clip``): a small ``CLIPModel`` with GPT-2's BPE tokenizer,
trained contrastively for a few hundred steps on scikit-learn's 8x8 digits with captions made
from the class names ("a photo of the digit three."), and saved with ``save_pretrained`` in the
cache beside its processor. It is then fine-tuned on *another* image set, the simulated textiles of
``conformal-clip-data`` (a DTD-like texture task: flawless fabric, a global or a local defect),
through the same ``from_pretrained`` path as ``openai/clip-vit-base-patch32``. Zero-shot, its
text encoder has never seen the textile words, so it starts near chance; at 32 x 32 pixels the
small local defects are mostly invisible, which bounds what fine-tuning can reach (half the images
are flawless).

The classifier (``CLIPZeroShotClassifier``) is a ``CLIPModel`` whose ``forward(pixel_values,
labels)`` returns the loss and logits of zero-shot classification: the normalised image embedding
times the normalised, prompt-averaged text embedding of every class, times the logit scale. The
text side and the logit scale are frozen, so only the vision encoder and its projection are
trained (and get a posterior); it saves as a plain CLIP checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor, default_data_collator
from transformers.modeling_outputs import ImageClassifierOutput

from ..args import PCTrainingArguments
from ..data import images
from ..data.tiny_clip import DEFAULT_TEMPLATE, class_embeddings, tiny_clip
from ..metrics import classification_metrics
from ..trainer import PCTrainer
from ..data.models import load_pretrained
from .cli import run_workload
from .lm import attn_implementation

#: CLIP's usual single prompt for the paper's data sets (any other set gets DEFAULT_TEMPLATE)
DATASET_TEMPLATES = {
    "cars": "a photo of a {}, a type of car.",
    "dtd": "a photo of a {} texture.",
    "gtsrb": 'a zoomed in photo of a "{}" traffic sign.',
    "resisc45": "satellite photo of {}.",
}


def split_templates(prompt_template: str) -> list[str]:
    """One template, or several separated by ``|`` (prompt ensembling); each holds ``{}``."""
    templates = [t.strip() for t in prompt_template.split("|") if t.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"prompt_template={prompt_template!r} is invalid: every template needs "
                         "one '{}' for the class name (several are separated by '|')")
    return templates



class CLIPZeroShotClassifier(CLIPModel):
    """A ``CLIPModel`` that classifies images against frozen class-prompt embeddings.

    After ``set_classes(tokenizer, class_names, templates)``, ``forward(pixel_values, labels=None)``
    returns ``ImageClassifierOutput(loss, logits)`` with ``logits = exp(logit_scale) *
    normalize(image_embeds) @ class_embeds.T``. ``set_classes`` freezes the text encoder, its
    projection and the logit scale; the class embeddings are a non-persistent buffer, so the
    model saves and loads as a plain CLIP checkpoint."""

    def set_classes(self, tokenizer, class_names, templates=(DEFAULT_TEMPLATE,)) -> None:
        for module in (self.text_model, self.text_projection):
            module.requires_grad_(False)
        self.logit_scale.requires_grad_(False)
        self.register_buffer("class_embeds", class_embeddings(self, tokenizer, class_names, templates),
                             persistent=False)
        self.class_names = list(class_names)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        if getattr(self, "class_embeds", None) is None:
            raise RuntimeError("call set_classes(tokenizer, class_names) before classifying images")
        img = self.get_image_features(pixel_values=pixel_values).pooler_output
        img = F.normalize(img, dim=-1)
        logits = self.logit_scale.exp() * img @ self.class_embeds.to(img.dtype).T
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)





@dataclass
class ViTArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "CLIP model: a Hub id (openai/clip-vit-base-patch32) or local folder with its "
                "processor. None: the tiny CLIP built and cached locally (pretrained on digits)"})
    dataset: str = field(default="textiles", metadata={
        "help": "cars, dtd, gtsrb, resisc45 (the paper's, from the Hub), textiles or digits "
                "(offline), or any Hub id / local image folder that datasets.load_dataset reads"})
    train_split: str = field(default="train", metadata={"help": "training split of a Hub data set"})
    eval_split: str = field(default="test", metadata={
        "help": "evaluation split of a Hub data set (missing: eval_fraction of the training split)"})
    eval_fraction: float = field(default=0.2, metadata={
        "help": "share held out for evaluation when there is no eval_split (stratified offline)"})
    image_column: str = field(default="image", metadata={"help": "image column of the data set"})
    label_column: str = field(default="label", metadata={
        "help": "label column (a ClassLabel: its names make the prompts)"})
    prompt_template: str | None = field(default=None, metadata={
        "help": "prompt per class, '{}' standing for the class name; several separated by '|' "
                "are averaged (prompt ensembling). None: CLIP's prompt for cars, dtd, gtsrb and "
                f"resisc45, {DEFAULT_TEMPLATE!r} for any other set"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "keep N training examples (drawn with the seed)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "keep N evaluation examples (drawn with seed 0, the same for every run)"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (flash_attention_2 on a GPU with flash-attn installed, else sdpa), sdpa, eager, ..."})
    zero_shot_eval: bool = field(default=True, metadata={
        "help": "evaluate the model before training (zeroshot_* metrics)"})
    tiny_clip_dataset: str = field(default="digits", metadata={
        "help": "offline image set the tiny CLIP is pretrained on (digits or textiles), when "
                "model_name_or_path is None"})
    tiny_clip_steps: int = field(default=400, metadata={
        "help": "contrastive pretraining steps of the tiny CLIP (when model_name_or_path is None)"})
    tiny_clip_image_size: int = field(default=32, metadata={
        "help": "image size of the tiny CLIP (4x4 patches of image_size/4 pixels)"})


def build_trainer(args: ViTArguments, targs: PCTrainingArguments) -> tuple[PCTrainer, dict]:
    """The CLIP classifier (the tiny CLIP built on first use when no model is named), the data
    and its PCTrainer; the dict holds what :func:`train_and_report` needs to finish the run."""
    name = args.model_name_or_path
    if name is None:
        with targs.main_process_first(desc="build the tiny CLIP"):
            name = str(tiny_clip(args.tiny_clip_dataset, args.tiny_clip_steps, args.tiny_clip_image_size,
                                 seed=0, log=print if targs.process_index == 0 else None))
    processor = load_pretrained(CLIPProcessor, name, what="CLIP processor")
    model = load_pretrained(CLIPZeroShotClassifier, name, what="CLIP model",
                            attn_implementation=attn_implementation(args.attn_implementation))
    with targs.main_process_first(desc="load the data set"):
        train_hf, eval_hf, class_names = images.load_image_dataset(
            args.dataset, args.train_split, args.eval_split, args.eval_fraction,
            args.image_column, args.label_column)   # a fixed split: seed 0
    train_hf = images.take(train_hf, args.max_train_samples, targs.seed)
    eval_hf = images.take(eval_hf, args.max_eval_samples, seed=0)   # the same for every run
    columns = dict(image_column=args.image_column, label_column=args.label_column)
    train = images.ProcessedImages(train_hf, processor.image_processor, **columns)
    evals = images.ProcessedImages(eval_hf, processor.image_processor, **columns)
    templates = split_templates(args.prompt_template or DATASET_TEMPLATES.get(args.dataset, DEFAULT_TEMPLATE))
    model.set_classes(processor.tokenizer, class_names, templates)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if targs.process_index == 0:
        print(f"CLIP {name}: {n_trained / 1e6:.2f}M of {model.num_parameters() / 1e6:.2f}M parameters "
              f"trained (vision encoder + projection); {args.dataset}: {len(class_names)} classes, "
              f"{len(train)} training / {len(evals)} evaluation images; pc_method={targs.pc_method}")

    trainer = PCTrainer(model=model, args=targs, train_dataset=train, eval_dataset=evals,
                        processing_class=processor, data_collator=default_data_collator,
                        compute_metrics=classification_metrics)

    def evaluate(prefix: str) -> dict:
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        if prefix == "eval" and targs.eval_mc_samples > 0:   # the posterior mean too, beside the predictive
            mc, targs.eval_mc_samples = targs.eval_mc_samples, 0
            metrics.update(trainer.evaluate(metric_key_prefix="eval_mean"))
            targs.eval_mc_samples = mc
        return metrics

    return trainer, dict(dataset=args.dataset, tags=("clip",),
                         metrics={"n_trained_params": n_trained, "n_classes": len(class_names)},
                         evaluate=evaluate, before="zeroshot" if args.zero_shot_eval else None,
                         plot_keys=("loss", "eval_loss", "eval_accuracy"))


def main(argv=None) -> dict:
    return run_workload(ViTArguments, "vit_offline", build_trainer, argv)

