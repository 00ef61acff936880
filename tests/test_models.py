"""The paper's networks: shapes, parameter counts, stride variants, torchvision state-dict compatibility."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from cli.errors import ResnetError
from training.models import ARCHS, build_model, count_parameters


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on 2 shared cores OpenMP threads spin against other processes and run ~3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Paper: Table 6 (CIFAR, in millions) and torchvision/paper for ResNet-50 (25.6M).
PAPER_PARAMS = {
    "resnet20": 0.27,
    "resnet32": 0.46,
    "resnet44": 0.66,
    "resnet56": 0.85,
    "resnet110": 1.7,
    "resnet1202": 19.4,
    "resnet50": 25.6,
}


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(arch):
    millions = count_parameters(build_model(arch)) / 1e6
    digits = 2 if millions < 1 else 1
    assert round(millions, digits) == PAPER_PARAMS[arch]


def test_plain_nets_have_the_same_parameters_as_residual_ones():
    # Option A shortcuts are parameter-free, so the paper compares plain/residual nets at equal size.
    for depth in (20, 56):
        assert count_parameters(build_model(f"plain{depth}")) == count_parameters(
            build_model(f"resnet{depth}")
        )


@pytest.mark.parametrize("arch", ["resnet20", "plain32", "resnet110"])
def test_cifar_nets_map_32px_images_to_logits(arch):
    model = build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet34", "resnet101"])
def test_imagenet_nets_map_images_to_logits(arch):
    model = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_cifar_depth_is_6n_plus_2_weighted_layers():
    model = build_model("resnet56")
    weighted = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(weighted) == 56  # option A adds no conv


def test_residual_and_plain_blocks_differ_only_by_the_shortcut():
    residual, plain = build_model("resnet20").eval(), build_model("plain20").eval()
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(residual(x), plain(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strictly_with_identical_outputs(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)().eval()
    ours = build_model(arch).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


def test_stride_variants_place_the_stride_where_documented():
    v1, v15 = build_model("resnet50", stride_variant="v1"), build_model("resnet50", stride_variant="v1.5")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    # Same parameters (torchvision weights load into either), different computation.
    v1.load_state_dict(v15.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        v1.eval(), v15.eval()
        assert v1(x).shape == v15(x).shape
        assert not torch.allclose(v1(x), v15(x))


def test_he_initialisation():
    torch.manual_seed(0)
    conv = build_model("resnet50").layer3[0].conv2  # 3x3, 256 -> 256
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(ResnetError) as error:
        build_model("resnet99")
    assert "resnet99" in str(error.value) and all(name in str(error.value) for name in ARCHS)
    with pytest.raises(ResnetError):
        build_model("resnet50", stride_variant="v2")
