"""The ``continual`` regime: the paper's continual-pretraining claim (Sec. 4.4: GPT-2 continued from
an IVON checkpoint on a new corpus, "IVON-PCM improves over IVON" per second) at CPU scale.

A character-level GPT-2 (the ``lm`` regime's shape, over the characters of both corpora) is
pretrained once with IVON on Shakespeare's plays (:func:`pretrained`: weights and posterior saved
as safetensors, cached by the code version), then continued on the ACL papers (ACLSum's bodies;
its validation papers split alternately into a selection and a report half). IVON and IVON-PCM
continue the pretraining posterior (h and momentum, ``Posterior.load_into_optimizer``), AdamW
starts fresh from the same weights. The paper's continual settings, scaled down: alpha 0.7, a
mega-batch of K = 40 mini-batches refreshed every m = 40 steps, rho (0.3, 0.05), the correction
after an uncorrected 10% of the run, the learning rate annealed to zero (cosine).

Budgets are CPU seconds: each method's steps are its budget over its measured CPU time per step
(``calibration``), so that every run's schedule ends at the same cost.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .lm import CharWindows

#: ``cpu_s`` is the base budget (CPU seconds of one thread) the campaign's budgets multiply
SPEC = dict(budget_unit="cpu_s", cpu_s=120.0, batch=16, evals=10, block=64, start_ratio=0.1,
            refresh=40, factor=40, scheduler="cosine", warmup_ratio=0.0,
            ivon=dict(weight_decay=1e-6), adamw=dict(weight_decay=0.1, adam_beta2=0.95),
            grids={"adamw": [1e-3, 3e-3, 1e-2], "ivon": [0.1, 0.3, 1.0]},
            methods=("adamw", "ivon", "ivon_pcm"), alpha=0.7, rho=(0.3, 0.05),
            pretrain=dict(steps=1000, lr=1.0, seed=0))
#: a tiny version for the tests (seconds)
TINY = {**SPEC, "cpu_s": 0.5, "batch": 8, "evals": 2, "block": 32, "refresh": 4, "factor": 4,
        "pretrain": dict(steps=6, lr=1.0, seed=0), "windows": 400}


@lru_cache(maxsize=1)
def texts() -> tuple[str, str, str]:
    """(Shakespeare's plays, the ACL papers' training bodies, their validation bodies)."""
    from hf_ivonpc.data.corpora import aclsum_papers, shakespeare_plays

    plays = "\n\n".join(shakespeare_plays().values())
    return plays, "\n\n".join(p["body"] for p in aclsum_papers("train")), \
        "\n\n".join(p["body"] for p in aclsum_papers("val"))


@lru_cache(maxsize=1)
def vocabulary() -> list[str]:
    return sorted(set("".join(texts())))


@lru_cache(maxsize=1)
def corpus_ids() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`texts` as character ids of :func:`vocabulary`."""
    import numpy as np

    table = np.zeros(0x110000, dtype=np.int64)
    table[[ord(c) for c in vocabulary()]] = np.arange(len(vocabulary()))
    return tuple(torch.from_numpy(table[np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)]) for t in texts())


def _model(spec: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(vocabulary()), n_positions=spec["block"], n_embd=128, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def pretrained(folder: Path, spec: dict = SPEC) -> Path:
    """The IVON-pretrained model (``model.safetensors`` + ``posterior.safetensors``) in
    ``folder``, trained once: a folder whose ``spec.json`` names these settings and this code is
    reused."""
    import json
    import tempfile

    from hf_ivonpc import PCTrainer, PCTrainingArguments

    from .campaign import code_version

    key = {"pretrain": spec["pretrain"], "block": spec["block"], "batch": spec["batch"],
           "windows": spec.get("windows"), "code": code_version()}
    marker = folder / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == key and (folder / "posterior.safetensors").is_file():
        return folder
    p = spec["pretrain"]
    torch.manual_seed(p["seed"])
    model = _model(spec)
    train = CharWindows(corpus_ids()[0], spec["block"], spec.get("windows"))
    with tempfile.TemporaryDirectory() as tmp:
        args = PCTrainingArguments(output_dir=tmp, pc_method="ivon", max_steps=p["steps"], learning_rate=p["lr"],
                                   per_device_train_batch_size=spec["batch"], lr_scheduler_type="cosine",
                                   warmup_steps=0.05, max_grad_norm=1.0, save_strategy="no", report_to=[],
                                   disable_tqdm=True, use_cpu=True, seed=p["seed"], logging_steps=max(1, p["steps"] // 10),
                                   dataloader_num_workers=0, **spec["ivon"])
        trainer = PCTrainer(model=model, args=args, train_dataset=train)
        trainer.train()
        folder.mkdir(parents=True, exist_ok=True)
        trainer.save_model(str(folder))
    marker.write_text(json.dumps(key))
    return folder


def model_and_data(seed: int, spec: dict, folder: Path):
    """The pretrained model (its weights; the posterior is loaded into the optimizer by the
    runner), the ACL training windows, and the ACL validation windows split alternately into a
    selection and a report half."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(str(pretrained(folder, spec)))
    _, train, val = corpus_ids()
    n_val = spec.get("windows") and max(2, spec["windows"] // 4)
    held_out = CharWindows(val, spec["block"], n_val or 512)
    select, report = (torch.utils.data.Subset(held_out, range(i, len(held_out), 2)) for i in (0, 1))
    return model, CharWindows(train, spec["block"], spec.get("windows")), select, report
