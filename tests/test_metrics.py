"""CA / ASR / RA / DER exactly as the protocol defines them, on hand-computed cases."""

import numpy as np
import pytest
import torch
from torch import nn

from ccpurify.metrics import der, evaluate, model_cost


class CornerDetector(nn.Module):
    """Predicts class 0 when the bottom-right pixel is bright, else the class written in pixel (0, 0)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        cls = (x[:, 0, 0, 0] * 255).round().long().clamp(0, 9)
        logits[torch.arange(len(x)), cls] = 1.0
        bright = x[:, 0, -1, -1] > 0.9
        logits[bright, 0] = 5.0
        return logits


def images_with_labels(labels, corner_bright):
    imgs = np.zeros((len(labels), 32, 32, 3), np.uint8)
    imgs[:, 0, 0, 0] = labels
    imgs[:, -1, -1, 0] = np.where(corner_bright, 255, 0)
    return imgs


def test_asr_and_ra_are_fractions_of_the_triggered_non_target_set():
    labels = np.array([1, 2, 3, 4])
    clean = images_with_labels(labels, [False] * 4)
    triggered = images_with_labels(labels, [True, True, True, False])  # the last trigger "fails"
    m = evaluate(CornerDetector(), clean, labels, triggered, labels, target=0)
    assert m.ca == 1.0
    assert m.asr == pytest.approx(3 / 4)
    assert m.ra == pytest.approx(1 / 4)


def test_triggered_set_with_target_class_images_is_rejected():
    labels = np.array([0, 1])
    imgs = images_with_labels(labels, [True, True])
    with pytest.raises(ValueError, match="non-target"):
        evaluate(CornerDetector(), imgs, labels, imgs, labels, target=0)


@pytest.mark.parametrize(
    "ca_b, asr_b, ca_a, asr_a, expected",
    [
        (0.90, 1.00, 0.90, 1.00, 0.50),  # nothing changed
        (0.90, 1.00, 0.90, 0.00, 1.00),  # perfect defense
        (0.90, 1.00, 0.80, 0.10, (0.90 - 0.10 + 1) / 2),
        (0.90, 0.50, 0.95, 0.60, 0.50),  # gains never count: both max(0, .) terms are 0
        (0.90, 1.00, 0.10, 1.00, (0 - 0.80 + 1) / 2),  # the CA loss is subtracted (BackdoorBench's code adds it)
    ],
)
def test_der_follows_the_documented_formula(ca_b, asr_b, ca_a, asr_a, expected):
    assert der(ca_b, asr_b, ca_a, asr_a) == pytest.approx(expected)


def test_model_cost_counts_conv_macs_per_output_pixel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    cost = model_cost(model, (4, 3, 32, 32))
    assert cost.params == 8 * 3 * 9
    assert cost.macs == 8 * 3 * 9 * 32 * 32
