"""Datasets, samplers and loaders for training and evaluation.

Three kinds of data share one path: the bundled digits (scikit-learn's 1797 handwritten 8x8
digits, split 80/20 stratified with a fixed seed), an ImageFolder (``root/train/<class>/*.jpg``,
``root/val/<class>/*.jpg``), and any map-style dataset timm's ``create_dataset`` builds.

An image that cannot be read is never fatal: it is reported and counted. Training replaces it
with another image (batches keep their size, which DDP and mixup need); evaluation leaves it out
(so no image is counted twice).

Randomness is a function of position, not of history: the training order comes from
``(seed, epoch)`` and each sample's augmentation is seeded from ``(seed, epoch, position)``. So the
same images get the same augmentation whatever the number of processes, data workers or
where a resumed run restarts.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..images import open_rgb, to_rgb8
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..engine.loop import seed_all
from ..errors import UserError, UserValueError
from .config import DIGITS
from .._extras import require

_logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 10
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_STREAMING_PREFIXES = ("wds", "tfds", "hfids")

SampleKey = Union[int, Tuple[int, int]]  # a dataset index, or (index, augmentation seed) in training


# ---- image sources -----------------------------------------------------------------------------


class ImageSource:
    """Indexable images with integer labels. ``load`` may raise on an unreadable image."""

    classes: List[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Tuple[Image.Image, int]:
        raise NotImplementedError

    def name(self, index: int) -> str:
        return f"sample {index}"


def digits_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The digits ``train`` or ``val`` split: uint8 images (N, 8, 8) in 0..255 and labels (N,)."""
    require("sklearn", extra="train")  # one clear error when the extra is absent
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise UserValueError(f"got split={split!r} for the digits, expected 'train' or 'val'")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    train_x, val_x, train_y, val_y = train_test_split(
        images, digits.target, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    return (train_x, train_y) if split == "train" else (val_x, val_y)


class DigitsSource(ImageSource):
    def __init__(self, split: str) -> None:
        self.images, self.targets = digits_split(split)
        self.classes = [str(i) for i in range(10)]
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), int(self.targets[index])

    def name(self, index: int) -> str:
        return f"digits/{self.split}[{index}]"


class TimmReaderSource(ImageSource):
    """Images from a timm reader (ImageFolder, tar, Hugging Face datasets): decoded here, so a
    corrupt file surfaces as an exception we can count."""

    def __init__(self, dataset: Any) -> None:
        self.reader = dataset.reader
        self.empty_class_folders: List[str] = []
        class_to_idx = getattr(self.reader, "class_to_idx", None) or {}
        self.classes = [c for c, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]

    def __len__(self) -> int:
        return len(self.reader)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        img, target, *_ = self.reader[index]
        if isinstance(img, Image.Image):
            return to_rgb8(img), int(target)
        try:
            return open_rgb(img), int(target)  # decodes every pixel: truncated data raises here
        finally:
            if hasattr(img, "close"):
                img.close()

    def name(self, index: int) -> str:
        try:
            return str(self.reader.filename(index, absolute=True))
        except Exception:  # readers without file names
            return f"sample {index}"


class TorchDatasetSource(ImageSource):
    """A torchvision-style map dataset returning ``(PIL image, label)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.classes = [str(c) for c in getattr(dataset, "classes", [])]

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        img, target = self.dataset[index][:2]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb8(img), int(target)


def _folder_classes(split_dir: Path) -> List[str]:
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    classes = []
    for child in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if any(f.suffix.lower() in extensions for _, _, files in os.walk(child) for f in map(Path, files)):
            classes.append(child.name)
    return classes


def open_source(dataset: Optional[str], root: Optional[str], split: str,
                class_names: Optional[Sequence[str]] = None) -> ImageSource:
    """Build the images of one split.

    ``dataset``: None or '' for an ImageFolder at ``root/split``, 'digits', or a timm spec.
    ``class_names``: the training classes, so a val folder maps its folders to the same indices.
    """
    if dataset == DIGITS:
        return DigitsSource(split)
    if not dataset:
        if root is None:
            raise UserValueError("an ImageFolder needs --data DIR (with DIR/train/<class>/ and DIR/val/<class>/)")
        return _open_folder(Path(root), split, class_names)
    prefix = dataset.partition("/")[0].lower()
    if prefix in _STREAMING_PREFIXES:
        raise UserValueError(
            f"got dataset={dataset!r}: streaming datasets ({', '.join(p + '/' for p in _STREAMING_PREFIXES)}) "
            "cannot be resumed mid-epoch or sharded without padding; use an ImageFolder, torch/... or hfds/..."
        )
    if root is not None and not Path(root).exists():
        raise UserError(f"no dataset root at {root!r}")
    from timm.data import create_dataset

    try:
        ds = create_dataset(dataset, root=root, split=split, download=False)
    except (AssertionError, RuntimeError) as e:
        raise UserValueError(f"timm cannot open dataset {dataset!r} (root {root!r}, split {split!r}): {e}") from e
    if hasattr(ds, "reader"):
        source: ImageSource = TimmReaderSource(ds)
    else:
        source = TorchDatasetSource(ds)
    if len(source) == 0:
        raise UserValueError(f"dataset {dataset!r} split {split!r} at {root!r} has no images")
    return source


def _open_folder(root: Path, split: str, class_names: Optional[Sequence[str]]) -> ImageSource:
    from timm.data import ImageDataset

    if not root.is_dir():
        raise UserError(f"no dataset directory at {str(root)!r}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(
            f"no {split!r} folder in {str(root)!r}: expected {str(split_dir)}/<class>/<image> "
            f"(found: {sorted(p.name for p in root.iterdir())[:10]})"
        )
    classes = _folder_classes(split_dir)
    if not classes:
        raise UserValueError(f"no class folders with images in {str(split_dir)!r}: expected {str(split_dir)}/<class>/<image>")
    if class_names is not None:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise UserValueError(f"{str(split_dir)!r} has classes {unknown[:10]} that training does not have")
        classes = list(class_names)
    ds = ImageDataset(str(split_dir), class_map={c: i for i, c in enumerate(classes)})
    source = TimmReaderSource(ds)
    if class_names is None:  # class folders without images are left out: say which
        source.empty_class_folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
    return source


def class_counts(source: ImageSource) -> Optional[List[int]]:
    """Images per class index, where the source knows its labels without decoding images."""
    labels: Optional[Sequence[int]] = None
    if isinstance(source, DigitsSource):
        labels = source.targets.tolist()
    elif isinstance(source, TimmReaderSource) and isinstance(getattr(source.reader, "samples", None), list):
        labels = [int(target) for _, target in source.reader.samples]
    elif isinstance(source, TorchDatasetSource) and getattr(source.dataset, "targets", None) is not None:
        labels = [int(t) for t in source.dataset.targets]
    if labels is None:
        return None
    counts = [0] * len(source.classes)
    for label in labels:
        if 0 <= label < len(counts):
            counts[label] += 1
    return counts


# ---- dataset with per-sample seeding and bad-image handling ------------------------------------


class ImageSamples(Dataset):
    """Transformed images of a source. Items: ``(image or None, label, [skipped descriptions])``.

    A key ``(index, seed)`` seeds the global generators before the transform, so the sample's
    augmentation depends on nothing else. With ``replace_bad`` an unreadable image is replaced by
    another one drawn from the same seed; otherwise the item's image is None.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], Tensor], replace_bad: bool) -> None:
        self.source = source
        self.transform = transform
        self.replace_bad = replace_bad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey) -> Tuple[Optional[Tensor], int, List[str]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_all(seed)
        skipped: List[str] = []
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            try:
                img, target = self.source.load(index)
                break
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for damaged files
                skipped.append(f"{self.source.name(index)} ({type(e).__name__}: {e})")
                if not self.replace_bad:
                    return None, -1, skipped
                index = random.Random(f"{seed}:{index}").randrange(len(self.source))
        else:
            raise UserError(f"{MAX_CONSECUTIVE_FAILURES} images in a row could not be read; last: {skipped[-1]}")
        return self.transform(img), target, skipped


@dataclass
class Batch:
    images: Tensor  # (B, 3, H, W)
    targets: Tensor  # (B,)
    skipped: List[str]


def collate(items: Sequence[Tuple[Optional[Tensor], int, List[str]]]) -> Batch:
    kept = [(img, target) for img, target, _ in items if img is not None]
    skipped = [s for _, _, bad in items for s in bad]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([img for img, _ in kept]), torch.tensor([t for _, t in kept]), skipped)


# ---- samplers ----------------------------------------------------------------------------------


class TrainBatchSampler(Sampler[List[Tuple[int, int]]]):
    """This rank's micro-batches of ``(index, augmentation seed)`` for one epoch.

    The epoch's order is one permutation shared by all ranks (each index repeated ``repeats``
    times in a row for repeated augmentation, then cut back to the dataset length). It is split
    into global batches of ``world_size * accum_steps * batch_size`` (an incomplete last one is
    dropped). Slot ``k = micro_step * world_size + rank`` of a global batch takes every
    ``world_size * accum_steps``-th sample from position ``k``; so what one micro-batch holds does
    not depend on how the global batch is split into processes and accumulation steps, and the
    copies of a repeated image land in different slots, as timm's RepeatAugSampler does.
    """

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, repeats: int = 0, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.accum_steps = accum_steps
        self.repeats = max(repeats, 1)
        self.seed = seed
        self.global_batch = batch_size * world_size * accum_steps
        if num_samples < self.global_batch:
            raise UserValueError(
                f"the training set has {num_samples} images, fewer than one global batch of {self.global_batch} "
                f"({batch_size} per process x {world_size} processes x {accum_steps} accumulation steps)"
            )
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate ``epoch``'s order from global step ``start_step`` (to resume mid-epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"got start_step={start_step}, expected 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """All ranks' sample order for ``epoch`` and each position's augmentation seed."""
        rng = np.random.default_rng([self.seed, epoch])
        order = np.repeat(rng.permutation(self.num_samples), self.repeats)[: self.num_samples]
        seeds = rng.integers(0, 2**62, size=self.num_samples)
        return order, seeds

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        order, seeds = self.epoch_order(self.epoch)
        slots = self.world_size * self.accum_steps
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch
            for micro in range(self.accum_steps):
                first = start + micro * self.world_size + self.rank
                positions = range(first, start + self.global_batch, slots)
                yield [(int(order[p]), int(seeds[p])) for p in positions]


def shard_indices(num_samples: int, world_size: int, rank: int) -> List[int]:
    """Every ``world_size``-th index from ``rank``: no padding, so ranks together see each image once."""
    return list(range(rank, num_samples, world_size))


# ---- transforms and loaders --------------------------------------------------------------------


def build_transform(cfg: Any, data_cfg: dict, is_training: bool) -> Callable[[Image.Image], Tensor]:
    """timm's train or eval transform from the training config and the model's data config."""
    from timm.data import create_transform

    if not is_training:
        return eval_transform(data_cfg)
    return create_transform(
        input_size=data_cfg["input_size"],
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.aa,
        interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )


def eval_transform(data_cfg: dict) -> Callable[[Image.Image], Tensor]:
    """Resize, center-crop (``crop_pct``) and normalize, as the data config says."""
    from timm.data import create_transform

    return create_transform(
        input_size=data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"],
    )


def _loader_kwargs(num_workers: int, device: torch.device) -> dict:
    kwargs: dict = dict(num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda")
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return kwargs


def train_loader(samples: ImageSamples, sampler: TrainBatchSampler, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(samples, batch_sampler=sampler, **_loader_kwargs(num_workers, device))


def eval_loader(samples: ImageSamples, batch_size: int, num_workers: int, device: torch.device,
                world_size: int = 1, rank: int = 0) -> DataLoader:
    indices = shard_indices(len(samples), world_size, rank)
    return DataLoader(samples, batch_size=batch_size, sampler=indices, **_loader_kwargs(num_workers, device))


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


# ---- the digits as an ImageFolder (`biformer classify demo-data`) ------------------------------


def export_digits(root: Union[str, os.PathLike], num_train: Optional[int] = None,
                  num_val: Optional[int] = None) -> Dict[str, int]:
    """Write the digits split as 8x8 PNGs in ``root/{train,val}/<digit>/`` (an ImageFolder); at their
    native size, so a model sees them exactly as in training. ``num_train`` / ``num_val`` keep that
    many images of a split, taking the digits in turn (so 10 or more hold every digit, and the val
    classes are among the train ones); returns the images written per split."""
    root = Path(root)
    written: Dict[str, int] = {}
    for split, limit in (("train", num_train), ("val", num_val)):
        images, targets = digits_split(split)
        rank_in_class = np.zeros(len(targets), dtype=np.int64)  # the k-th image of its digit has rank k
        for digit in np.unique(targets):
            rank_in_class[targets == digit] = np.arange(int((targets == digit).sum()))
        kept = np.argsort(rank_in_class, kind="stable")[:limit]
        for i in sorted(kept.tolist()):
            folder = root / split / str(int(targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{split}_{i:04d}.png")
        written[split] = len(kept)
    return written
