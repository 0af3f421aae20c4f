"""The model zoo: registry behaviour and the architectures' published sizes."""

import pytest
import torch

from ccpurify import models
from ccpurify.registry import UnknownNameError


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_preact_resnet18_has_backdoorbench_parameter_count():
    assert n_params(models.create("preact_resnet18", num_classes=10, width=1)) == 11_171_146


def test_preact_block_registers_modules_in_backdoorbench_order():
    block = models.create("preact_resnet18", width=0.25).layer2[0]
    assert [name for name, _ in block.named_children()] == ["bn1", "conv1", "bn2", "conv2", "shortcut"]


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("num_classes", [10, 43])
def test_every_zoo_model_maps_cifar_images_to_class_logits(name, num_classes):
    model = models.create(name, num_classes=num_classes, width=0.25).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_width_scales_the_channels():
    narrow = models.create("preact_resnet18", width=0.25)
    assert narrow.conv1.out_channels == 16 and narrow.linear.in_features == 128


def test_mobilenet_v2_has_depthwise_convs():
    model = models.create("mobilenet_v2", width=0.5)
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 17


def test_list_models_filters_by_wildcard():
    assert models.list_models("*resnet*") == ["preact_resnet18", "resnet18"]


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown model 'resnet1000'.*preact_resnet18"):
        models.create("resnet1000")
