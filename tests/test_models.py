"""models: packaged Lite0 weights really load; shapes, NaNs, gradients; offline errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import (
    WeightsNotFoundError,
    convert_lite0_state_dict,
    create_model,
    efficientnet_lite0_weights_path,
    model_info,
)


def test_every_lite0_weight_tensor_is_loaded_from_the_package():
    src = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", num_classes=2, pretrained=True)
    state = model.state_dict()
    converted = convert_lite0_state_dict(src, model)
    assert len(converted) == len(src)  # every source tensor has a home
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert set(backbone) == {k for k in converted if not k.startswith("classifier.")}
    for key in backbone:
        assert torch.equal(state[key], converted[key]), key
    assert state["classifier.weight"].shape == (2, 1280)


def test_pretrained_differs_from_random_init():
    a = create_model("efficientnet_lite0", 2, pretrained=True).state_dict()["conv_stem.weight"]
    b = create_model("efficientnet_lite0", 2, pretrained=False).state_dict()["conv_stem.weight"]
    assert not torch.allclose(a, b)


def test_pretrained_features_separate_imagenet_like_inputs():
    """A sanity check of the loaded ImageNet weights: BN statistics are the trained ones."""
    model = create_model("efficientnet_lite0", 1000, pretrained=True).eval()
    assert model.bn1.running_var.mean() != pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "baseline_cnn"])
def test_forward_shape_no_nan_and_gradients_reach_every_layer(name):
    model = create_model(name, num_classes=3, pretrained=False)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_model_info_normalisation():
    assert model_info("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert model_info("resnet18").mean[0] == pytest.approx(0.485)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        create_model("no_such_net", 2)


def test_torchvision_weights_absent_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsNotFoundError, match="torch hub cache"):
        create_model("resnet18", 2, pretrained=True)
