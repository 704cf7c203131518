"""The ViT workload (hf_ivonpc.tasks.vit): the tiny CLIP is built, its vision encoder fine-tuned with a frozen
text head, and PCTrainer's classifier evaluation (mean and posterior predictive) works on it."""

import json
import math

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, default_data_collator

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.data import MissingDataError
from hf_ivonpc.metrics import classification_metrics
from hf_ivonpc.data import images
from hf_ivonpc.tasks import vit

from conftest import use_eager_kernels


TINY = ["--tiny_clip_steps", "3", "--max_train_samples", "48", "--max_eval_samples", "24",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "12",
        "--max_steps", "4", "--warmup_steps", "1", "--pc_start_step", "1", "--pc_refresh_steps", "2",
        "--pc_megabatch_factor", "2", "--ivon_ess", "1e4", "--eval_mc_samples", "2",
        "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The script once, on tiny sizes, with a cache of its own (the tiny CLIP is built in it),
    with the eager kernels (see conftest's ``use_eager_kernels``)."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("vit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_IVONPC_CACHE", str(cache))
        use_eager_kernels(mp)
        metrics = vit.main(TINY + ["--output_dir", str(out)])
    (clip_dir,) = cache.glob("tiny-clip-*")
    return metrics, out, clip_dir


def test_builds_the_tiny_clip_and_writes_results(run):
    metrics, out, clip_dir = run
    report = json.loads((clip_dir / "pretraining.json").read_text())
    assert report["steps"] == 3 and report["pretraining_set"] == "digits"
    assert 0 <= report["zero_shot_accuracy"] <= 1
    saved = json.loads((out / "all_results.json").read_text())
    assert saved == pytest.approx(metrics)
    for prefix in ("zeroshot", "eval", "eval_mean"):
        assert 0 <= saved[f"{prefix}_accuracy"] <= 1, prefix
        assert 0 <= saved[f"{prefix}_ece"] <= 1, prefix
        assert math.isfinite(saved[f"{prefix}_nll"]) and saved[f"{prefix}_nll"] > 0, prefix
        # the loss Trainer reports is the NLL of the logits the metrics read
        assert saved[f"{prefix}_nll"] == pytest.approx(saved[f"{prefix}_loss"], rel=1e-4), prefix
    assert saved["n_classes"] == 3 and saved["epoch"] > 0
    history = json.loads((out / "log_history.json").read_text())
    assert any("pc/g_out_norm" in r for r in history)          # the correction ran
    assert (out / "training_curves.png").stat().st_size > 1000
    # the output is a plain CLIP checkpoint with its processor, as is the tiny CLIP
    clip = CLIPModel.from_pretrained(out)
    assert clip.config.vision_config.image_size == 32
    CLIPProcessor.from_pretrained(out)


def test_text_side_is_frozen_and_vision_is_trained(run):
    _, out, clip_dir = run
    before = CLIPModel.from_pretrained(clip_dir).state_dict()
    after = CLIPModel.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith(("vision_model.", "visual_projection."))]
    assert any(k.startswith("text_model.") for k in frozen) and "logit_scale" in frozen
    for k in frozen:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    moved = [k for k in before if k not in frozen and not torch.equal(before[k], after[k])]
    assert "visual_projection.weight" in moved and len(moved) > 10


@pytest.fixture(scope="module")
def classifier(run):
    _, _, clip_dir = run
    processor = CLIPProcessor.from_pretrained(clip_dir)
    model = vit.CLIPZeroShotClassifier.from_pretrained(clip_dir)
    train, evals, names = images.load_image_dataset("textiles")
    train = images.ProcessedImages(images.take(train, 32), processor.image_processor)
    evals = images.ProcessedImages(images.take(evals, 16), processor.image_processor)
    model.set_classes(processor.tokenizer, names, ["a photo of a {}."])
    return model, train, evals, names


def test_only_the_vision_side_gets_a_posterior(classifier, tmp_path, eager_kernels):
    model, train, _, _ = classifier
    args = PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon_pcm", max_steps=1,
                               per_device_train_batch_size=8, pc_megabatch_factor=2,
                               report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = PCTrainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    trainer.create_optimizer()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    vision_side = {id(p) for m in (model.vision_model, model.visual_projection) for p in m.parameters()}
    assert in_optimizer == vision_side
    assert not any(p.requires_grad for p in model.text_model.parameters())
    assert not model.text_projection.weight.requires_grad and not model.logit_scale.requires_grad


def test_classifier_evaluation_at_the_mean_and_predictive(classifier, tmp_path, eager_kernels):
    model, train, evals, names = classifier
    assert model(pixel_values=evals[0]["pixel_values"][None]).logits.shape == (1, len(names))
    args = PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon", max_steps=2,
                               per_device_train_batch_size=8, per_device_eval_batch_size=8,
                               learning_rate=0.3, ivon_hess_init=0.1, ivon_ess=1e3,
                               eval_mc_samples=3, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = PCTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                        data_collator=default_data_collator, compute_metrics=classification_metrics)
    trainer.train()
    predictive = trainer.evaluate()
    args.eval_mc_samples = 0
    mean = trainer.evaluate()
    for m in (predictive, mean):
        assert {"eval_accuracy", "eval_nll", "eval_ece"} <= m.keys()
        assert m["eval_nll"] == pytest.approx(m["eval_loss"], rel=1e-4)
    # posterior draws (sigma ~ 0.1 with ess 1e3, h0 0.1) change the averaged probabilities
    assert predictive["eval_nll"] != pytest.approx(mean["eval_nll"], rel=1e-6)


def test_hub_data_set_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MissingDataError, match="could not load the image data set 'dtd'.*tanganke/dtd"):
        images.load_image_dataset("dtd")
