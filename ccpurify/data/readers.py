"""Readers for the on-disk dataset formats: image-folder zip, image-folder directory, and the
CIFAR-10 "python version" pickle folder. Each returns uint8 NHWC images and int64 labels.

All of these inputs may come from someone else, so:
- JPEG/PNG decoding goes through PIL with its decompression-bomb guard on;
- the CIFAR pickle is read with an unpickler that only admits the numpy array constructors it needs,
  never arbitrary callables.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ccpurify.errors import InvalidInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


class DataFormatError(InvalidInputError):
    """The data exists but is not in a layout or encoding we can read."""


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """An encoded image as (size, size, 3) uint8 RGB; bilinear resize of the whole image, as the
    shipped GTSRB copy was made (shared/data/README.md)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataFormatError(
                    f"{name}: {img.mode} pixels (16-bit or float) are not 8-bit images; convert them to 8-bit first"
                )
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataFormatError(f"{name}: cannot decode the image ({exc}); the file is damaged or not an image") from exc


def _decode_zip_members(zip_path: str, members: Sequence[str], size: int) -> np.ndarray:
    out = np.empty((len(members), size, size, 3), dtype=np.uint8)
    with zipfile.ZipFile(zip_path) as zf:
        for i, name in enumerate(members):
            out[i] = decode_image(read_member(zf, name, zip_path), size, f"{zip_path}:{name}")
    return out


MAX_IMAGE_BYTES = 64 << 20  # an archive member declaring more than this is not one image (zip bomb)


def read_member(zf: zipfile.ZipFile, name: str, zip_path: str) -> bytes:
    """One member's bytes; a declared size over ``MAX_IMAGE_BYTES`` or a damaged stream is a ``DataFormatError``."""
    declared = zf.getinfo(name).file_size
    if declared > MAX_IMAGE_BYTES:
        raise DataFormatError(
            f"{zip_path}:{name}: declares {declared:,} bytes, more than an image may ({MAX_IMAGE_BYTES:,})"
        )
    try:
        return zf.read(name)
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        NotImplementedError,
        RuntimeError,
    ) as exc:  # RuntimeError: encrypted
        raise DataFormatError(f"{zip_path}:{name}: damaged in the archive ({exc}); re-copy the file") from exc


def _decode_files(paths: Sequence[str], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode_image(Path(p).read_bytes(), size, p)
    return out


def _split_members(names: Sequence[str], split: str) -> list[tuple[str, str]]:
    """(class_name, member) for every image under ``.../<split>/<class>/<file>``."""
    found = []
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if parts[-3] == split:
            found.append((parts[-2], name))
    return found


def _parallel(fn, source: str, items: list[str], size: int, workers: int) -> np.ndarray:
    if not items:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    workers = max(1, min(workers, len(items) // 2000 + 1))
    if workers == 1:
        return fn(source, items, size) if source else fn(items, size)
    chunks = np.array_split(np.arange(len(items)), workers)
    with ProcessPoolExecutor(workers) as pool:
        futures = [
            pool.submit(fn, source, [items[i] for i in c], size)
            if source
            else pool.submit(fn, [items[i] for i in c], size)
            for c in chunks
        ]
        return np.concatenate([f.result() for f in futures])


def _labels_for(classes_found: list[str], class_names: Sequence[str] | None, where: str) -> dict[str, int]:
    present = sorted(set(classes_found))
    if class_names is None:
        return {c: i for i, c in enumerate(present)}
    unknown = [c for c in present if c not in class_names]
    if unknown:
        raise DataFormatError(
            f"{where}: class folders {unknown[:5]} are not classes of this dataset "
            f"(expected folder names {list(class_names)[:5]}...)"
        )
    return {c: i for i, c in enumerate(class_names)}


def read_image_folder_zip(
    path: Path, split: str, image_size: int, class_names: Sequence[str] | None, workers: int = 2
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``<split>/<class>/<image>`` members of a zip archive (any prefix folder allowed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable zip archive ({exc}); re-copy the file") from exc
    members = _split_members(names, split)
    if not members:
        raise DataFormatError(f"{path}: no images under '{split}/<class>/' in the archive")
    mapping = _labels_for([c for c, _ in members], class_names, str(path))
    members.sort(key=lambda cm: (mapping[cm[0]], cm[1]))
    labels = np.array([mapping[c] for c, _ in members], dtype=np.int64)
    images = _parallel(_decode_zip_members, os.fspath(path), [m for _, m in members], image_size, workers)
    classes = list(class_names) if class_names is not None else sorted(mapping, key=mapping.get)
    return images, labels, classes


def read_image_folder_dir(
    root: Path, split: str, image_size: int, class_names: Sequence[str] | None, workers: int = 2
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/<split>/<class>/<image>`` files."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataFormatError(f"{root}: no '{split}' folder (expected {split}/<class>/<image>)")
    members = [
        (p.parent.name, os.fspath(p))
        for p in split_dir.glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    if not members:
        raise DataFormatError(f"{split_dir}: no images in <class>/ sub-folders")
    mapping = _labels_for([c for c, _ in members], class_names, str(split_dir))
    members.sort(key=lambda cm: (mapping[cm[0]], cm[1]))
    labels = np.array([mapping[c] for c, _ in members], dtype=np.int64)
    images = _parallel(_decode_files, "", [m for _, m in members], image_size, workers)
    classes = list(class_names) if class_names is not None else sorted(mapping, key=mapping.get)
    return images, labels, classes


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: plain containers and numpy arrays only."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how numpy >= 2 pickles raw bytes at protocol 2; only encodes a string
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file: it may run code")


def read_cifar_pickle_folder(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the CIFAR-10 python pickles (``data_batch_1..5``, ``test_batch``) safely."""
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in files:
        path = root / name
        if not path.is_file():
            raise DataFormatError(f"{root}: missing CIFAR-10 batch file '{name}'")
        with open(path, "rb") as fh:
            try:
                batch = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError, ValueError) as exc:
                raise DataFormatError(f"{path}: not a CIFAR-10 batch ({exc})") from exc
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataFormatError(
                f"{path}: not a CIFAR-10 batch (expected {{b'data': N x 3072 uint8, b'labels': N ints}}; {exc})"
            ) from exc
        if len(batch_labels) != len(batch_images):
            raise DataFormatError(f"{path}: {len(batch_images)} images but {len(batch_labels)} labels")
        images.append(batch_images)
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
