"""Each defense family removes a real backdoor: given the embedded BadNets CIFAR-10 model (the
demo's, ASR about 96%) and a small budget, the attack success rate at least halves, scored on the
embedded test images. Loose bounds on purpose: these say the defense works, the grid says how well."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ccpurify
from ccpurify import attacks, passes
from ccpurify.data import CIFAR10, Normalize, load_dataset
from ccpurify.data.readers import read_image_folder_zip
from ccpurify.demo import ASSETS
from ccpurify.evaluation import TestBench
from ccpurify.io import load_model
from ccpurify.passes import as_labeled, as_unlabeled

NORMALIZE = (CIFAR10.mean, CIFAR10.std)


@pytest.fixture(scope="module")
def suspect():
    model = load_model(ASSETS / "model.safetensors")
    attack = attacks.from_recipe(
        json.loads((ASSETS / "attack.json").read_text()), load_file(os.fspath(ASSETS / "attack.safetensors"))
    )
    images, labels, _ = read_image_folder_zip(ASSETS / "test-sample.zip", "test", 32, CIFAR10.class_names, workers=1)
    bd_images, bd_labels = attack.test_set(images[:500], labels[:500])
    bench = TestBench(CIFAR10, images[:500], labels[:500], bd_images, bd_labels, attack.target)
    before = bench.score(model).metrics
    assert before.asr > 0.9
    return model, bench, before


@pytest.fixture(scope="module")
def defender_images(data_dir):
    """Training images (never the scored test images): 300 labelled, 1,200 unlabelled."""
    train = load_dataset("cifar10", "train", data_dir)
    idx = np.random.default_rng(0).choice(len(train.images), 1500, replace=False)
    normalize = Normalize(*NORMALIZE)
    clean = as_labeled(
        (torch.from_numpy(train.images[idx[:300]]), torch.from_numpy(train.labels[idx[:300]])), normalize
    )
    return clean, as_unlabeled(torch.from_numpy(train.images[idx[300:]]), normalize)


FAMILIES = {
    "otbr (data-free, channels)": (lambda: passes.OTBR(steps=8, batch_size=128), None),
    "cc (data-free, low rank)": (lambda: "cc", None),
    "rnp (labelled)": (
        lambda: passes.RNP(mask_score="trajectory", prune_fraction=0.05, unlearn_epochs=5, recover_epochs=5),
        "clean",
    ),
    "bcu compact (unlabelled)": (
        lambda: passes.BCU(compact=passes.Prune(macs=0.5, round_to=8), epochs=5, weight_decay=2e-2),
        "unlabeled",
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_defense_at_least_halves_the_attack_success_rate(family, suspect, defender_images):
    model, bench, before = suspect
    make, data = FAMILIES[family]
    clean, unlabeled = defender_images
    given = {"clean_data": clean} if data == "clean" else {"unlabeled_data": unlabeled} if data == "unlabeled" else {}
    result = ccpurify.purify(model, make(), example_inputs=torch.zeros(1, 3, 32, 32), normalize=NORMALIZE, **given)
    after = bench.score(result.model).metrics
    assert after.asr <= before.asr / 2, f"{family}: ASR {before.asr:.3f} -> {after.asr:.3f}"
    assert after.ca >= 0.25, f"{family}: CA {before.ca:.3f} -> {after.ca:.3f}"  # not by breaking the model
