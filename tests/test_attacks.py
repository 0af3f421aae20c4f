"""Every trigger is deterministic for a seed and changes only what it should."""

import numpy as np
import pytest
import torch

from ccpurify import attacks
from ccpurify.registry import UnknownNameError


@pytest.fixture(scope="module")
def sample(cifar_test):
    """400 test images of every class (the split is stored sorted by class)."""
    idx = np.sort(np.random.default_rng(0).choice(len(cifar_test), 400, replace=False))
    return cifar_test.images[idx], cifar_test.labels[idx]


@pytest.mark.parametrize("name", attacks.list_attacks())
def test_trigger_is_deterministic_for_a_seed(name, sample):
    images, labels = sample
    first = attacks.create(name, seed=3, **({"width": 4} if name == "input_aware" else {}))
    again = attacks.create(name, seed=3, **({"width": 4} if name == "input_aware" else {}))
    np.testing.assert_array_equal(first.apply(images[:50]), again.apply(images[:50]))
    np.testing.assert_array_equal(
        first.poison(images, labels).poison_indices, again.poison(images, labels).poison_indices
    )


@pytest.mark.parametrize("name", ["blended", "lf", "wanet"])
def test_a_different_seed_gives_a_different_trigger(name, sample):
    images, _ = sample
    assert not np.array_equal(
        attacks.create(name, seed=0).apply(images[:8]), attacks.create(name, seed=1).apply(images[:8])
    )


@pytest.mark.parametrize("name", attacks.list_attacks())
def test_recipe_and_tensors_rebuild_the_same_trigger(name, sample):
    images, _ = sample
    attack = attacks.create(name, seed=5, **({"width": 4} if name == "input_aware" else {}))
    rebuilt = attacks.from_recipe(attack.recipe(), attack.tensors())
    np.testing.assert_array_equal(attack.apply(images[:16]), rebuilt.apply(images[:16]))


def test_badnets_touches_exactly_the_bottom_right_3x3_corner(sample):
    images, _ = sample
    out = attacks.create("badnets").apply(images)
    changed = np.any(out != images, axis=(0, 3))
    assert set(zip(*np.nonzero(changed))) <= {(r, c) for r in range(29, 32) for c in range(29, 32)}
    assert np.all(out[:, 29:, 29:] == 255)
    np.testing.assert_array_equal(out[:, :29], images[:, :29])
    np.testing.assert_array_equal(out[:, :, :29], images[:, :, :29])


def test_badnets_accepts_a_user_patch_mask_and_location(sample):
    images, _ = sample
    patch = np.zeros((2, 2, 3), np.uint8)
    patch[0, 0] = (255, 0, 0)
    attack = attacks.create("badnets", patch=patch, mask=np.array([[1, 0], [0, 0]], bool), location=(4, 6))
    out = attack.apply(images)
    diff = np.any(out != images, axis=(0, 3))
    assert set(zip(*np.nonzero(diff))) == {(4, 6)}
    assert np.all(out[:, 4, 6] == (255, 0, 0))


def test_blended_mixes_the_whole_image_with_alpha(sample):
    images, _ = sample
    attack = attacks.create("blended", alpha=0.2)
    expected = np.clip(np.rint(0.8 * images.astype(np.float32) + 0.2 * attack.key.astype(np.float32)), 0, 255)
    np.testing.assert_array_equal(attack.apply(images), expected.astype(np.uint8))


def test_blended_key_is_smooth_not_pixel_noise(sample):
    key = attacks.create("blended").key.astype(float)
    noise = np.random.default_rng(0).integers(0, 256, key.shape).astype(float)
    step = lambda img: np.abs(np.diff(img, axis=1)).mean()  # noqa: E731
    assert step(key) < 0.35 * step(noise) and key.std() > 30  # smooth, yet not flat


def test_sig_adds_a_horizontal_sinusoid():
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    out = attacks.create("sig").apply(flat).astype(int) - 128
    np.testing.assert_array_equal(out[0, 0], out[0, 17])  # identical rows
    assert out.max() == 40 and out.min() == -40
    assert np.abs(out[0, 0, :, 0] - np.rint(40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32))).max() <= 1


def test_lf_pattern_is_low_frequency_and_bounded():
    attack = attacks.create("lf")
    assert attack.pattern.min() == pytest.approx(0.0) and attack.pattern.max() == pytest.approx(51.0)
    channel = attack.pattern[..., 2] - attack.pattern[..., 2].mean()
    energy = np.abs(np.fft.fft2(channel)) ** 2
    k = np.abs(np.fft.fftfreq(32) * 32)
    low = (k[:, None] <= 3) & (k[None, :] <= 3)  # 49 of 1,024 frequencies (white noise puts ~5% there)
    assert energy[low].sum() > 0.9 * energy.sum()


def test_dirty_label_poisons_the_ratio_of_all_classes_and_relabels(sample):
    images, labels = sample
    result = attacks.create("badnets", target=2, poison_ratio=0.1).poison(images, labels)
    assert len(result.poison_indices) == 40
    assert len(np.unique(labels[result.poison_indices])) > 3
    assert np.all(result.labels[result.poison_indices] == 2)
    untouched = np.setdiff1d(np.arange(len(labels)), result.poison_indices)
    np.testing.assert_array_equal(result.images[untouched], images[untouched])
    np.testing.assert_array_equal(result.labels[untouched], labels[untouched])


def test_clean_label_sig_poisons_target_images_only_and_keeps_labels(sample):
    images, labels = sample
    target_count = int((labels == 0).sum())
    result = attacks.create("sig", target=0, poison_ratio=target_count / len(labels)).poison(images, labels)
    assert np.all(labels[result.poison_indices] == 0)
    np.testing.assert_array_equal(result.labels, labels)


def test_clean_label_without_enough_target_images_says_so(sample):
    images, labels = sample
    with pytest.raises(ValueError, match="clean-label"):
        attacks.create("sig", poison_ratio=0.5).poison(images, labels)


def test_test_set_holds_triggered_non_target_images(sample):
    images, labels = sample
    bd, true = attacks.create("badnets", target=0).test_set(images, labels)
    assert len(bd) == int((labels != 0).sum()) and np.all(true != 0)
    assert np.all(bd[:, 29:, 29:] == 255)


def test_wanet_poisons_batches_not_indices(sample):
    images, labels = sample
    attack = attacks.create("wanet", poison_ratio=0.1, cross_ratio=2)
    assert len(attack.poison(images, labels).poison_indices) == 0
    x = torch.from_numpy(images[:128]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels[:128])
    px, py, extra = attack.batch_poisoner()(x, y, torch.Generator().manual_seed(0))
    assert extra is None and torch.all(py[:12] == 0) and torch.equal(py[12:], y[12:])
    changed = (px != x).flatten(1).any(1)
    assert changed[: 12 + 24].all() and not changed[36:].any()


def test_input_aware_batch_poisoner_trains_its_generator(sample):
    images, labels = sample
    attack = attacks.create("input_aware", width=4, mask_epochs=1)
    attack.prepare(images[:256], batch_size=64)
    poisoner = attack.batch_poisoner()
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255
    px, py, extra = poisoner(x, torch.from_numpy(labels[:64]), torch.Generator().manual_seed(0))
    assert px.shape == x.shape and torch.all(py[:6] == 0) and extra is not None and extra.requires_grad
    before = [p.clone() for p in attack.pattern_net.parameters()]
    (px.sum() + extra).backward()
    poisoner.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, attack.pattern_net.parameters()))


def test_input_aware_diversity_gradient_is_finite_when_two_triggers_are_identical():
    from ccpurify.attacks.input_aware import diversity_loss

    x1, x2 = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    pattern = torch.full((4, 3, 8, 8), 0.9, requires_grad=True)  # a saturated generator: the same output twice
    diversity_loss(x1, x2, pattern, pattern.detach().clone()).backward()
    assert torch.isfinite(pattern.grad).all()


def test_attacks_refuse_float_images():
    with pytest.raises(ValueError, match="uint8 images"):
        attacks.create("badnets").apply(np.zeros((2, 32, 32, 3), np.float32))


def test_unknown_attack_names_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown attack 'trojan'.*badnets"):
        attacks.create("trojan")
