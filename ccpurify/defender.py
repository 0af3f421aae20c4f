"""What a defender has, turned into pass inputs: a run directory's defender subsets, or images from a
folder or zip (docs/protocol.md, "Defender resources").

- ``clean_data(source, ...)``: labelled clean images. A run directory gives its stored clean subset
  (or RNP's 1% subset with ``rnp=True``); an image folder/zip in the ``<class>/<image>`` layout of
  the model's dataset gives its images with those labels.
- ``unlabeled_data(source, ...)``: ``count`` images of a run directory's unlabelled pool (drawn at
  random with ``seed`` when fewer than the pool), or up to ``count`` images from any folder or zip,
  of any dataset (BCU works with out-of-distribution images), resized to the model's input and
  normalised the model's way. Labels are never read.

Everything here comes from training splits or the user's own files, never from a test split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ccpurify.data import DatasetSpec, Normalize, get_spec, load_dataset
from ccpurify.data.readers import IMAGE_SUFFIXES, DataFormatError, decode_image, read_member
from ccpurify.errors import InvalidInputError
from ccpurify.passes.data import LabeledData, UnlabeledData


def model_ready(images: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """uint8 NHWC images as the float NCHW tensor a ``spec`` model takes (scaled and normalised)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return Normalize(spec.mean, spec.std)(x)


def draw(n: int, count: int, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` of ``n`` images (all of them when ``count >= n``), drawn at random with
    ``seed``, in increasing order. Never the first ``count``: a run stores its subsets in
    training-index order, which is class order, so the first 1,000 images of a CIFAR-10 run's
    5,000-image pool hold two classes."""
    if count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


def _is_run(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file() and (path / "defender.json").is_file()


def _run_subset(path: Path, key: str, data_dir) -> tuple[np.ndarray, np.ndarray, DatasetSpec]:
    from ccpurify.train import open_run

    run = open_run(path)
    train = load_dataset(run.config.dataset, "train", data_dir)
    idx = np.asarray(getattr(run.defender, key), dtype=np.int64)
    return train.images[idx], train.labels[idx], get_spec(run.config.dataset)


def clean_data(source: str | os.PathLike, dataset: str, *, rnp: bool = False, data_dir=None) -> LabeledData:
    """Labelled clean images from a run directory or a labelled image folder/zip."""
    path = Path(source)
    spec = get_spec(dataset)
    if _is_run(path):
        images, labels, run_spec = _run_subset(path, "rnp_subset" if rnp else "clean_subset", data_dir)
        if run_spec.name != spec.name:
            raise InvalidInputError(f"{path} holds {run_spec.name} images but the model is a {spec.name} model")
        return LabeledData(model_ready(images, spec), torch.from_numpy(labels))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory, image folder or zip")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise InvalidInputError(
            f"{path}: a file that is not a zip; labelled clean data is a run directory, or an image folder or zip "
            f"in {spec.name}'s class layout (CLI: --clean-data)"
        )
    data = load_dataset(dataset, "train", path, verify=False)  # a user folder in the dataset's class layout
    return LabeledData(model_ready(data.images, spec), torch.from_numpy(data.labels))


def _is_test_split(parts: tuple[str, ...]) -> bool:
    return any(part.lower() in ("test", "val", "valid", "validation") for part in parts[:-1])


def image_pool(source: str | os.PathLike, count: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` seeded-random images (uint8 NHWC) from a folder or zip of any layout.

    Files under a ``test``/``val`` folder are skipped, so pointing at a dataset archive never draws
    its evaluation split."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image folder or zip")
    if path.is_file():
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise DataFormatError(f"{path}: not a readable zip archive") from exc
        names = sorted(
            n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES) and not _is_test_split(Path(n).parts)
        )
        read = lambda name: read_member(archive, name, str(path))  # noqa: E731
    else:
        archive = None
        names = sorted(
            str(p)
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not _is_test_split(p.relative_to(path).parts)
        )
        read = lambda name: Path(name).read_bytes()  # noqa: E731
    try:
        if not names:
            raise DataFormatError(f"{path}: no training images ({', '.join(IMAGE_SUFFIXES)}) outside test/val folders")
        pick = np.sort(np.random.default_rng(seed).choice(len(names), size=min(count, len(names)), replace=False))
        return np.stack([decode_image(read(names[j]), image_size, f"{path}:{names[j]}") for j in pick])
    finally:
        if archive is not None:
            archive.close()


def unlabeled_data(
    source: str | os.PathLike, dataset: str, *, count: int = 5000, seed: int = 0, data_dir=None
) -> UnlabeledData:
    """Unlabelled images for a ``dataset`` model: a run's unlabelled pool, or any folder/zip."""
    path = Path(source)
    spec = get_spec(dataset)
    if _is_run(path):
        images, _, _ = _run_subset(path, "unlabeled_pool", data_dir)
        return UnlabeledData(model_ready(images[draw(len(images), count, seed)], spec))
    return UnlabeledData(model_ready(image_pool(path, count, spec.image_size, seed), spec))
