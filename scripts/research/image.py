"""The ``image`` regime: a small CNN (2 conv layers, 106k parameters) on Fashion-MNIST, batch 64,
the learning rate annealed to a quarter of its start value (the paper's CIFAR-10 setting, Fig. 5),
where the paper sees gains per example; ``digits``: the same code path on scikit-learn's digits
(8x8), for tests."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_HOW = "apt-get install dataset-fashion-mnist (Debian)"
#: training images held out as the selection split (never trained on)
SELECT = {"image": 5000, "digits": 200}

#: ``steps`` x ``batch`` is the base budget (gradient evaluations) the campaign's budgets multiply
SPEC = dict(steps=1500, batch=64, evals=10, start_ratio=0.2, refresh=10, factor=10,
            scheduler="cosine_with_min_lr", warmup_ratio=0.0,
            ivon=dict(weight_decay=1e-4, ivon_ess=60000.0, ivon_hess_init=0.1),
            adamw=dict(weight_decay=0.01),
            grids={"adamw": [1e-3, 3e-3, 1e-2], "ivon": [0.1, 0.3, 1.0]})
DIGITS = {**SPEC, "steps": 40, "batch": 32, "evals": 4,
          "ivon": dict(weight_decay=1e-4, ivon_ess=1500.0, ivon_hess_init=0.1)}


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def images(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y), images as float (N, 1, H, W), standardised."""
    if name == "image":
        if not FASHION_MNIST.is_dir():
            raise FileNotFoundError(f"{FASHION_MNIST} is missing: {FASHION_HOW}")
        x, y = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
        xt, yt = _idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.images[:1500].astype(np.float32), d.target[:1500]
        xt, yt = d.images[1500:].astype(np.float32), d.target[1500:]
    x, xt = (torch.tensor(np.asarray(a, dtype=np.float32)).unsqueeze(1) for a in (x, xt))
    mean, std = x.mean(), x.std()
    return (x - mean) / std, torch.tensor(np.asarray(y), dtype=torch.int64), (xt - mean) / std, \
        torch.tensor(np.asarray(yt), dtype=torch.int64)


class Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class SmallCNN(torch.nn.Module):
    """conv(16) - pool - conv(32) - pool - 64 - 10, for 28x28 (or 8x8) grey images."""

    def __init__(self, side: int = 28):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}



def model_and_data(name: str, seed: int):
    """A fresh CNN (seeded); the training images but the last ``select`` of them, which are the
    selection split hyperparameters are chosen by; the test images, which results are read on."""
    torch.manual_seed(seed)
    x, y, xt, yt = images(name)
    k = len(y) - SELECT[name]
    return SmallCNN(side=x.shape[-1]), Images(x[:k], y[:k]), Images(x[k:], y[k:]), Images(xt, yt)
