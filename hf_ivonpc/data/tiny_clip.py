"""A tiny CLIP built offline: a small ``CLIPModel`` with GPT-2's BPE tokenizer, trained
contrastively for a few hundred steps on scikit-learn's 8x8 digits (captions from the class names,
"a photo of the digit three.") and saved with ``save_pretrained`` in the data cache beside its
processor, so that the ViT workload loads it through the same ``from_pretrained`` path as
``openai/clip-vit-base-patch32``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from .cache import cache_dir, publish_dir
from .images import ProcessedImages, load_image_dataset

#: captions of the tiny CLIP's contrastive pretraining (one drawn per image and step)
PRETRAIN_TEMPLATES = {
    "digits": ("a photo of the digit {}.", "a photo of a {}.", "a handwritten {}.", "the number {}.",
               "a blurry image of the digit {}.", "a small {}."),
    "textiles": ("a photo of a {}.", "a close-up photo of a {}.", "an image of a {}.",
                 "a grey {}.", "a texture of a {}.", "a scan of a {}."),
}
DEFAULT_TEMPLATE = "a photo of a {}."

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


def tiny_clip_processor(image_size: int = 32):
    """A ``CLIPProcessor`` of GPT-2's tokenizer (end-of-text appended, and used as padding) and a
    CLIP image processor at ``image_size``."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .models import gpt2_tokenizer

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
