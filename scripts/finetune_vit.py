"""The paper's ViT fine-tuning (App. D.4) with PCTrainer: a CLIP's vision encoder trained with the
text encoder's class-name embeddings as a frozen classifier head (IVON-PCM by default).

    python scripts/finetune_vit.py                  # offline default: a tiny CLIP, textiles, CPU
    accelerate launch scripts/finetune_vit.py --config vit_paper_ivon_pcm --dataset dtd
    python scripts/finetune_vit.py --pc_method none --learning_rate 1e-3 --output_dir results/vit-adamw

Without ``--model_name_or_path`` a tiny CLIP is built first (contrastive pretraining on the
scikit-learn digits, about a minute, cached; see ``hf_ivonpc/tasks/vision.py``) and loaded with
``from_pretrained`` exactly as ``openai/clip-vit-base-patch32`` would be. The prompts
(``--prompt_template``) of every class name are embedded once; only the vision encoder and its
projection are trained. Zero-shot metrics (accuracy, NLL, ECE) are measured before training and
reported as ``zeroshot_*`` beside the final ``eval_*`` ones (the posterior predictive when
``eval_mc_samples`` > 0, and ``eval_mean_*`` at the posterior mean). Writes ``all_results.json``,
``log_history.json``, ``training_curves.png`` and the fine-tuned CLIP (a plain CLIP checkpoint with
its processor) to ``--output_dir``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import CLIPProcessor, default_data_collator

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_ivonpc import PCTrainer, PCTrainingArguments  # noqa: E402
from hf_ivonpc.metrics import classification_metrics  # noqa: E402
from hf_ivonpc.tasks import vision  # noqa: E402
from hf_ivonpc.tasks.cli import CONFIGS, load_pretrained, parse_args, train_and_report  # noqa: E402


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
                f"resisc45, {vision.DEFAULT_TEMPLATE!r} for any other set"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "keep N training examples (drawn with the seed)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "keep N evaluation examples (drawn with seed 0, the same for every run)"})
    zero_shot_eval: bool = field(default=True, metadata={
        "help": "evaluate the model before training (zeroshot_* metrics)"})
    tiny_clip_dataset: str = field(default="digits", metadata={
        "help": "offline image set the tiny CLIP is pretrained on (digits or textiles), when "
                "model_name_or_path is None"})
    tiny_clip_steps: int = field(default=400, metadata={
        "help": "contrastive pretraining steps of the tiny CLIP (when model_name_or_path is None)"})
    tiny_clip_image_size: int = field(default=32, metadata={
        "help": "image size of the tiny CLIP (4x4 patches of image_size/4 pixels)"})


def main(argv=None) -> dict:
    args, targs = parse_args((ViTArguments, PCTrainingArguments), CONFIGS / "vit_offline.yaml", argv)
    name = args.model_name_or_path
    if name is None:
        with targs.main_process_first(desc="build the tiny CLIP"):
            name = str(vision.tiny_clip(args.tiny_clip_dataset, args.tiny_clip_steps,
                                        args.tiny_clip_image_size, seed=0,
                                        log=print if targs.process_index == 0 else None))
    processor = load_pretrained(CLIPProcessor, name, what="CLIP processor")
    model = load_pretrained(vision.CLIPZeroShotClassifier, name, what="CLIP model")
    with targs.main_process_first(desc="load the data set"):
        train_hf, eval_hf, class_names = vision.load_image_dataset(
            args.dataset, args.train_split, args.eval_split, args.eval_fraction,
            args.image_column, args.label_column)   # a fixed split: seed 0
    train_hf = vision.take(train_hf, args.max_train_samples, targs.seed)
    eval_hf = vision.take(eval_hf, args.max_eval_samples, seed=0)   # the same for every run
    columns = dict(image_column=args.image_column, label_column=args.label_column)
    train = vision.ProcessedImages(train_hf, processor.image_processor, **columns)
    evals = vision.ProcessedImages(eval_hf, processor.image_processor, **columns)
    templates = vision.split_templates(args.prompt_template
                                       or vision.DATASET_TEMPLATES.get(args.dataset, vision.DEFAULT_TEMPLATE))
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

    return train_and_report(trainer, dataset=args.dataset, tags=("clip",),
                            metrics={"n_trained_params": n_trained, "n_classes": len(class_names)},
                            evaluate=evaluate, before="zeroshot" if args.zero_shot_eval else None,
                            plot_keys=("loss", "eval_loss", "eval_accuracy"))


if __name__ == "__main__":
    main()
