"""utils.model: the four architectures, feature extraction, offline pretrained weights, tiled prediction."""
import copy
import urllib.error

import pytest
import torch

from utils import model as models
from utils.cli import UserError


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_every_arch_predicts_seven_classes_at_input_size(arch):
    torch.manual_seed(0)
    network = models.build(arch, 7, init="none").eval()
    with torch.no_grad():
        logits = models.forward_logits(network, torch.randn(2, 3, 64, 80), 7, size=(64, 80))
    assert logits.shape == (2, 7, 64, 80)
    assert (network.aux_classifier is not None) == models.has_aux(arch) if hasattr(network, "aux_classifier") \
        else not models.has_aux(arch)


def test_keep_feature_extract_trains_only_the_new_head():
    network = models.build("deeplabv3_mobilenet_v3_large", 7, init="none", keep_feature_extract=True)
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight",
                         "aux_classifier.4.bias"}


def test_eighth_thesis_channel_is_dropped():
    network = models.build("deeplabv3_mobilenet_v3_large", 8, init="none", aux_loss=False).eval()
    with torch.no_grad():
        assert models.forward_logits(network, torch.randn(1, 3, 32, 32), 7).shape[1] == 7


@pytest.mark.parametrize("init", ["coco", "imagenet"])
def test_offline_pretrained_init_fails_with_one_line_hint(monkeypatch, tmp_path, init):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        models.build("deeplabv3_resnet50", 7, init=init)
    message = str(error.value)
    assert "TORCH_HOME" in message and "--init none" in message and "\n" not in message
    assert str(tmp_path) in message


def test_unknown_arch_and_init_refused():
    with pytest.raises(UserError, match="unknown --arch"):
        models.build("unet", 7)
    with pytest.raises(UserError, match="unknown --init"):
        models.build("deeplabv3_resnet50", 7, init="random")


def test_tiled_prediction_with_one_full_tile_equals_whole_image():
    torch.manual_seed(0)
    network = models.build("deeplabv3_mobilenet_v3_large", 7, init="none").eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = models.forward_logits(network, image, 7)
    tiled = models.sliding_window_logits(network, image, 7, tile=96, stride=96)
    assert tiled.shape == (1, 7, 64, 96)
    assert torch.allclose(tiled, whole, atol=1e-4)


def test_tiled_prediction_covers_large_images_at_full_size():
    network = models.build("lraspp_mobilenet_v3_large", 7, init="none").eval()
    tiled = models.sliding_window_logits(network, torch.randn(1, 3, 100, 150), 7, tile=64, stride=48)
    assert tiled.shape == (1, 7, 100, 150) and torch.isfinite(tiled).all()
    with pytest.raises(UserError, match="--stride"):
        models.sliding_window_logits(network, torch.randn(1, 3, 64, 64), 7, tile=32, stride=40)


def test_count_macs_counts_the_deployed_network_and_grows_with_input():
    network = models.build("deeplabv3_mobilenet_v3_large", 7, init="none")
    small, params = models.count_macs(network, 64)
    large, _ = models.count_macs(network, 128)
    deployed = models.strip_aux_head(copy.deepcopy(network))
    assert (small, params) == models.count_macs(deployed, 64)  # the aux head is never counted
    assert params == models.count_parameters(deployed) < models.count_parameters(network)
    assert network.aux_classifier is not None  # counting left the training network whole
    assert 3.5 < large / small < 4.5
