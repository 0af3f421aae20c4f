"""Datasets: the real archives load with the protocol's shapes, counts and labels; other layouts
load too; bad inputs fail with messages that say what to do."""

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccpurify.data import (
    Augment,
    ChecksumError,
    DataFormatError,
    DataNotFoundError,
    load_dataset,
    random_crop,
    random_hflip,
)


@pytest.mark.parametrize(
    "name, split, count, classes",
    [
        ("cifar10", "train", 50_000, 10),
        ("cifar10", "test", 10_000, 10),
        ("gtsrb", "train", 39_209, 43),
        ("gtsrb", "test", 12_630, 43),
    ],
)
def test_shared_archives_load_as_uint8_nhwc_with_all_labels(data_dir, name, split, count, classes):
    data = load_dataset(name, split, data_dir)
    assert data.images.shape == (count, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (count,) and data.labels.dtype == np.int64
    assert set(np.unique(data.labels)) == set(range(classes))
    assert data.source.verified  # checked against ../shared/data/SHA256SUMS


def test_cifar10_classes_follow_the_cifar_order(data_dir):
    data = load_dataset("cifar10", "test", data_dir)
    assert np.bincount(data.labels).tolist() == [1000] * 10
    assert data.spec.class_names[0] == "airplane" and data.spec.class_names[9] == "truck"
    # Planes and ships are mostly sky/sea blue; frogs are not.
    blue = data.images[..., 2].astype(float).mean(axis=(1, 2)) - data.images[..., 0].astype(float).mean(axis=(1, 2))
    by_class = [blue[data.labels == c].mean() for c in range(10)]
    assert by_class[0] > by_class[6] and by_class[8] > by_class[6]


def test_gtsrb_class_counts_match_the_official_test_set(data_dir):
    counts = np.bincount(load_dataset("gtsrb", "test", data_dir).labels)
    assert counts[0] == 60 and counts[1] == 720 and counts.sum() == 12_630


def test_second_load_comes_from_the_cache(data_dir, tmp_path):
    first = load_dataset("cifar10", "test", data_dir, cache=tmp_path)
    assert list(tmp_path.glob("cifar10-*/test-images.npy"))
    second = load_dataset("cifar10", "test", data_dir, cache=tmp_path)
    np.testing.assert_array_equal(first.images, second.images)


def _write_folder(root: Path, split: str, per_class: dict[str, list[np.ndarray]]) -> None:
    for cls, imgs in per_class.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(root / split / cls / f"{i}.png")


def test_image_folder_directory_loads_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {c: [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(2)] for c in ("00000", "00002")}
    _write_folder(tmp_path / "gtsrb", "test", imgs)
    data = load_dataset("gtsrb", "test", tmp_path / "gtsrb", cache=tmp_path / "cache")
    assert data.images.shape == (4, 32, 32, 3)
    assert data.labels.tolist() == [0, 0, 2, 2]  # folder 00002 is class 2, whatever is missing


def test_image_folder_zip_with_a_prefix_folder_loads(tmp_path):
    img = np.full((32, 32, 3), 7, np.uint8)
    path = tmp_path / "mine.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for cls in ("cat", "airplane"):
            buf = tmp_path / "x.png"
            Image.fromarray(img).save(buf)
            zf.write(buf, f"cifar10/train/{cls}/a.png")
    data = load_dataset("cifar10", "train", path, cache=tmp_path / "cache")
    assert data.labels.tolist() == [0, 3]


def test_unknown_class_folders_are_reported(tmp_path):
    _write_folder(tmp_path / "d", "test", {"giraffe": [np.zeros((32, 32, 3), np.uint8)]})
    with pytest.raises(DataFormatError, match="giraffe"):
        load_dataset("cifar10", "test", tmp_path / "d", cache=tmp_path / "cache")


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}


def test_cifar10_python_pickle_folder_loads(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(3, i) for i in range(1, 6)} | {"test_batch": _cifar_batch(4, 9)}
    for name, batch in batches.items():
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    data = load_dataset("cifar10", "test", tmp_path, cache=tmp_path / "cache")
    assert data.images.shape == (4, 32, 32, 3)
    expected = batches["test_batch"][b"data"].reshape(4, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(data.images, expected)
    assert data.labels.tolist() == batches["test_batch"][b"labels"]


@pytest.mark.parametrize(
    "batch",
    [
        {},
        [1, 2],
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
    ],
    ids=["empty dict", "a list", "wrong image size", "labels short"],
)
def test_a_damaged_cifar_pickle_batch_is_one_clear_error(batch, tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(1, i)))
    with pytest.raises(DataFormatError, match="not a CIFAR-10 batch|images but"):
        load_dataset("cifar10", "test", tmp_path, cache=tmp_path / "cache")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ccpurify-pwned-by-cifar",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": []}))
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(1, i)))
    with pytest.raises(DataFormatError, match="refusing to load posix.system"):
        load_dataset("cifar10", "test", tmp_path, cache=tmp_path / "cache")
    assert not Path("/tmp/ccpurify-pwned-by-cifar").exists()


def test_wrong_checksum_is_reported(tmp_path):
    archive = tmp_path / "cifar10-jpeg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("test/cat/a.jpg", b"")
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  cifar10-jpeg.zip\n")
    with pytest.raises(ChecksumError, match="does not match SHA256SUMS.*copy it again"):
        load_dataset("cifar10", "test", tmp_path, cache=tmp_path / "cache")
    real = hashlib.sha256(archive.read_bytes()).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{real}  cifar10-jpeg.zip\n")
    with pytest.raises(DataFormatError):  # the checksum passes; the empty JPEG does not decode
        load_dataset("cifar10", "test", tmp_path, cache=tmp_path / "cache")


def test_corrupt_zip_is_reported(tmp_path):
    (tmp_path / "cifar10-jpeg.zip").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="not a readable zip"):
        load_dataset("cifar10", "test", tmp_path, cache=tmp_path / "cache")


def test_missing_data_names_all_three_places(tmp_path, monkeypatch):
    monkeypatch.delenv("CCPURIFY_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", "test", tmp_path / "nowhere")
    message = str(err.value)
    assert "--data" in message and "CCPURIFY_DATA" in message and "../shared/data" in message


def test_env_var_locates_the_data(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CCPURIFY_DATA", str(data_dir))
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("cifar10", "test")) == 10_000


def test_random_crop_shifts_content_within_the_padding():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    rows, cols = torch.nonzero(out[:, 0] == 1, as_tuple=True)[1:]
    assert out.shape == x.shape and out.sum() == 64
    assert set(rows.tolist()) == set(range(2, 7)) and set(cols.tolist()) == set(range(2, 7))


def test_augment_is_deterministic_for_a_generator_and_flip_mirrors():
    x = torch.rand(16, 3, 32, 32)
    a = Augment()(x, torch.Generator().manual_seed(1))
    b = Augment()(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, x.flip(3))
