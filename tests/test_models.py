"""Every registered model: shapes, finite outputs, declared features, gradient coverage."""

import pytest
import torch

import vgg
from model import count_flops, count_params, create_model, list_models

SPATIAL = [32, 16, 8, 4, 4]  # max-pool after the first three stages
SPATIAL_TV = [32, 16, 8, 4, 2]  # torchvision layout: max-pool after every stage


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_and_feature_shapes(name, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, width=0.25).eval()  # eval: the MLP heads' dropout
    x = torch.randn(3, 3, 32, 32)
    logits, feats = model(x, features=True)
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()
    assert torch.equal(model(x), logits)
    assert len(feats["stages"]) == len(model.stage_channels) == 5
    spatial = SPATIAL_TV if name.endswith("_tv") else SPATIAL
    for f, p, c, s in zip(feats["stages"], feats["preact"], model.stage_channels, spatial, strict=True):
        assert f.shape == p.shape == (3, c, s, s)
        assert torch.equal(f, p.relu())
        assert (p < 0).any(), "pre-activation features must keep their negative part"
    assert feats["pooled"].shape == (3, model.embed_dim)


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_gradient(name):
    model = create_model(name, num_classes=10, width=0.125)
    logits, feats = model(torch.randn(4, 3, 32, 32), features=True)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_vgg8_parameter_count_by_hand():
    channels = [3, 64, 128, 256, 512, 512]
    conv = sum(c_in * c_out * 9 + c_out for c_in, c_out in zip(channels[:-1], channels[1:], strict=True))
    bn = sum(2 * c for c in channels[1:])
    head = 512 * 100 + 100
    assert count_params(vgg.vgg8(num_classes=100)) == conv + bn + head  # 3.96 M


def test_width_multiplier_and_stage_layouts():
    assert create_model("vgg13", width=0.5).stage_channels == [32, 64, 128, 256, 256]
    assert [len(s) for s in vgg.STAGES["vgg19"]] == [2, 2, 4, 4, 4]
    assert vgg.STAGES["vgg8"] == [[64], [128], [256], [512], [512]]


def test_flops_grow_with_depth_and_width():
    f8 = count_flops(create_model("vgg8", width=0.25))
    assert f8 < count_flops(create_model("vgg13", width=0.25)) < count_flops(create_model("vgg16", width=0.25))
    assert count_flops(create_model("vgg8", width=0.5)) == pytest.approx(4 * f8, rel=0.1)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="registered: vgg8, vgg11, vgg13, vgg16, vgg19"):
        create_model("resnet18")


def test_layer_summary_agrees_with_parameter_count():
    from model import summary

    model = create_model("vgg11", num_classes=10, width=0.25)
    stats = summary(model)
    assert stats.total_params == count_params(model)
    assert "Conv2d" in str(stats)
