"""Datasets for the evaluation harness: CIFAR-10 and GTSRB as uint8 arrays, plus batched transforms.

>>> from ccpurify.data import load_dataset
>>> train = load_dataset("cifar10", "train")           # ../shared/data, $CCPURIFY_DATA or data_dir=
>>> train.images.shape, train.labels[:3]
((50000, 32, 32, 3), array([0, 0, 0]))
"""

from ccpurify.data.datasets import (
    CACHE_ENV,
    CIFAR10,
    DATA_ENV,
    DATASETS,
    GTSRB,
    ChecksumError,
    DataNotFoundError,
    DatasetSpec,
    ImageSet,
    SourceInfo,
    get_spec,
    load_dataset,
    locate,
)
from ccpurify.data.readers import DataFormatError
from ccpurify.data.transforms import Augment, Normalize, random_crop, random_hflip, to_float, to_uint8

__all__ = [
    "CACHE_ENV",
    "CIFAR10",
    "DATASETS",
    "DATA_ENV",
    "GTSRB",
    "Augment",
    "ChecksumError",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetSpec",
    "ImageSet",
    "Normalize",
    "SourceInfo",
    "get_spec",
    "load_dataset",
    "locate",
    "random_crop",
    "random_hflip",
    "to_float",
    "to_uint8",
]
