"""Dataset specs, data location, checksum verification and the decoded-array cache.

``load_dataset("cifar10", "train")`` finds the data (argument, then ``CCPURIFY_DATA``, then
``../shared/data``), verifies the archive against a ``SHA256SUMS`` file beside it, decodes it once and
caches uint8 arrays under ``CCPURIFY_CACHE`` (default ``~/.cache/ccpurify``); later loads read the
cache in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccpurify.atomic import atomic_path, write_json
from ccpurify.data import readers
from ccpurify.errors import CcpurifyError, InvalidInputError
from ccpurify.registry import UnknownNameError

DATA_ENV = "CCPURIFY_DATA"
CACHE_ENV = "CCPURIFY_CACHE"
CACHE_VERSION = 1


class DataNotFoundError(CcpurifyError, FileNotFoundError):
    """No data could be located; the message says every place that was looked at."""


class ChecksumError(InvalidInputError):
    """A data file does not match its published checksum."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the protocol fixes about a dataset (docs/protocol.md, "Data")."""

    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    archives: tuple[str, ...]  # file or folder names looked for inside a data folder
    image_size: int = 32

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


CIFAR10 = DatasetSpec(
    name="cifar10",
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.247, 0.243, 0.261),
    hflip=True,
    archives=("cifar10-jpeg.zip", "cifar10.zip", "cifar10", "cifar-10-batches-py"),
)
GTSRB = DatasetSpec(
    name="gtsrb",
    class_names=tuple(f"{i:05d}" for i in range(43)),
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    hflip=False,
    archives=("gtsrb32-jpeg.zip", "gtsrb.zip", "gtsrb"),
)
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (CIFAR10, GTSRB)}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


@dataclass(frozen=True)
class SourceInfo:
    """Where a dataset was read from, in which format, and its content hash."""

    path: str
    format: str  # "zip", "folder" or "cifar-pickle"
    sha256: str
    verified: bool  # True when checked against a published SHA256SUMS entry

    def to_dict(self) -> dict:
        return dict(path=self.path, format=self.format, sha256=self.sha256, verified=self.verified)


@dataclass
class ImageSet:
    """Images (N, H, W, 3) uint8 and labels (N,) int64 of one split."""

    images: np.ndarray
    labels: np.ndarray
    spec: DatasetSpec
    split: str
    source: SourceInfo | None = None
    indices: np.ndarray | None = field(default=None, repr=False)  # positions in the full split

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> ImageSet:
        """The images at ``indices`` (positions in this set); remembers their full-split indices."""
        idx = np.asarray(indices, dtype=np.int64)
        base = self.indices[idx] if self.indices is not None else idx
        return ImageSet(self.images[idx], self.labels[idx], self.spec, self.split, self.source, base)


# ----------------------------------------------------------------------------------------- location
def _default_roots() -> list[Path]:
    package_root = Path(__file__).resolve().parents[2]  # the checkout, for source installs
    roots = [Path.cwd() / ".." / "shared" / "data", package_root / ".." / "shared" / "data"]
    unique: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r not in unique:
            unique.append(r)
    return unique


def _source_in(root: Path, spec: DatasetSpec) -> Path | None:
    """The readable source for ``spec`` at ``root``: ``root`` itself or a known name inside it."""
    if root.is_file():
        return root if root.suffix == ".zip" else None
    if (root / "train").is_dir() or (root / "test").is_dir() or (root / "data_batch_1").is_file():
        return root
    for name in spec.archives:
        candidate = root / name
        if candidate.exists():
            return candidate
    return None


def locate(name: str, data: str | os.PathLike | None = None) -> Path:
    """Path of the data for dataset ``name``: ``data``, else ``$CCPURIFY_DATA``, else ../shared/data."""
    spec = get_spec(name)
    looked: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if data is not None:
        candidates.append(("--data / data_dir", Path(data)))
    elif os.environ.get(DATA_ENV):
        candidates.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV])))
    else:
        candidates += [("../shared/data", r) for r in _default_roots()]
    for origin, root in candidates:
        if root.exists():
            found = _source_in(root, spec)
            if found is not None:
                return found
            looked.append(f"{origin}={root} (exists, but holds none of {', '.join(spec.archives)})")
        else:
            looked.append(f"{origin}={root} (does not exist)")
    raise DataNotFoundError(
        f"no {name} data found; looked at: {'; '.join(looked)}. Pass --data PATH (data_dir= in Python), "
        f"set {DATA_ENV}, or put the data in ../shared/data"
    )


# ------------------------------------------------------------------------------------- checksums
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _published_sums(path: Path) -> dict[str, str]:
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return {}
    table = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            table[parts[1].lstrip("*")] = parts[0].lower()
    return table


def _folder_fingerprint(root: Path) -> str:
    """Hash of the relative paths, sizes and mtimes of a folder's files (cheap change detection)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "ccpurify"


def _memo_sha256(path: Path, cache: Path) -> str:
    """sha256 of ``path``, remembered per (path, size, mtime) so repeated loads stay fast."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache / "sha256-memo.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = sha256_file(path)
        try:
            write_json(memo_file, memo)
        except OSError:
            pass  # an unwritable cache only costs speed
    return memo[key]


def identify(source: Path, cache: Path, verify: bool = True) -> SourceInfo:
    """Format and content hash of a data source; checks published checksums when present."""
    if source.is_file():
        digest = _memo_sha256(source, cache)
        expected = _published_sums(source).get(source.name)
        if expected is not None and verify and digest != expected:
            raise ChecksumError(
                f"{source}: sha256 {digest[:16]}... does not match SHA256SUMS ({expected[:16]}...); "
                "the file is corrupt or was altered: copy it again"
            )
        return SourceInfo(os.fspath(source), "zip", digest, expected is not None and verify)
    fmt = "cifar-pickle" if (source / "data_batch_1").is_file() else "folder"
    return SourceInfo(os.fspath(source), fmt, _folder_fingerprint(source), False)


# ------------------------------------------------------------------------------------------ load
def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache: str | os.PathLike | None = None,
    verify: bool = True,
) -> ImageSet:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` as uint8 NHWC images + int labels.

    ``data_dir`` may be a folder holding the archive, the zip itself, an image folder
    (``train/<class>/...``) or the CIFAR-10 python pickle folder. Class order is the protocol's.
    """
    spec = get_spec(name)
    if split not in ("train", "test"):
        raise InvalidInputError(f"split must be 'train' or 'test', got {split!r}")
    source = locate(name, data_dir)
    cache_root = cache_dir(cache)
    info = identify(source, cache_root, verify=verify)
    entry = cache_root / f"{name}-{info.sha256[:16]}-v{CACHE_VERSION}"
    img_file, lab_file = entry / f"{split}-images.npy", entry / f"{split}-labels.npy"
    if img_file.is_file() and lab_file.is_file():
        images = np.load(img_file, allow_pickle=False)
        labels = np.load(lab_file, allow_pickle=False)
    else:
        images, labels = _decode(source, info.format, spec, split)
        try:
            for file, array in ((img_file, images), (lab_file, labels)):
                with atomic_path(file) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, array, allow_pickle=False)
        except OSError:
            pass  # read-only cache: decode again next time
    return ImageSet(images, labels, spec, split, info)


def _decode(source: Path, fmt: str, spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "cifar-pickle":
        if spec.name != "cifar10":
            raise readers.DataFormatError(f"{source}: a CIFAR-10 pickle folder cannot hold {spec.name}")
        return readers.read_cifar_pickle_folder(source, split)
    reader = readers.read_image_folder_zip if fmt == "zip" else readers.read_image_folder_dir
    images, labels, _ = reader(source, split, spec.image_size, spec.class_names)
    return images, labels
