import pytest
import torch

import models
from constants import UserError

SMALL = ["resnet18", "preactresnet18", "resnet9", "small_vgg", "smallcnn"]


@pytest.mark.parametrize("name", SMALL)
def test_features_head_and_blocks(name):
    torch.manual_seed(0)
    model = models.get_model(name, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x)
    assert feats.ndim == 2 and feats.shape[1] == model.head.in_features
    assert torch.allclose(model.head(feats), model(x), atol=1e-6)
    assert model(x).shape == (2, 7)
    names = [n for n, _ in model.blocks()]
    assert len(names) == len(set(names)) and model.blocks()[-1][1] is model.head
    block_params = {id(p) for _, m in model.blocks() for p in m.parameters()}
    assert block_params == {id(p) for p in model.parameters()}  # the blocks cover the model


def test_wide_resnet_builds():
    model = models.get_model("WRN-28-10", 100)
    assert model.head.in_features == 640 and model.head.out_features == 100


def test_small_vgg_has_the_release_layout():
    keys = list(models.get_model("small_VGG16", 43).state_dict())
    assert keys[:2] == ["features.0.weight", "features.0.bias"]
    assert "features.20.running_mean" in keys and keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert not models.expects_normalized("small_vgg") and models.expects_normalized("resnet18")


def test_last_k_counts_weight_layers():
    net = models.get_model("resnet9", 10)
    assert [n for n, _ in models.last_k_blocks(net, 2)] == ["conv4", "fc"]
    assert [n for n, _ in models.last_k_blocks(net, 4)] == ["res2", "conv4", "fc"]
    assert len(models.last_k_blocks(net, -1)) == len(net.blocks())
    with pytest.raises(UserError, match="valid k"):
        models.last_k_blocks(net, 3)


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'resnet1'"):
        models.get_model("resnet1", 10)
