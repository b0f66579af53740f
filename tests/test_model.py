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
    tiled = models.sliding_window_logits(network, image, 7, models.Tiling(96, 96))
    assert tiled.shape == (1, 7, 64, 96)
    assert torch.allclose(tiled, whole, atol=1e-4)


def test_tiled_prediction_covers_large_images_at_full_size():
    network = models.build("lraspp_mobilenet_v3_large", 7, init="none").eval()
    tiled = models.sliding_window_logits(network, torch.randn(1, 3, 100, 150), 7, models.Tiling(64, 48))
    assert tiled.shape == (1, 7, 100, 150) and torch.isfinite(tiled).all()
    with pytest.raises(UserError, match="--stride"):
        models.Tiling(32, 40)


def test_count_macs_counts_the_deployed_network_and_grows_with_input():
    network = models.build("deeplabv3_mobilenet_v3_large", 7, init="none")
    small, params = models.count_macs(network, 64)
    large, _ = models.count_macs(network, 128)
    deployed = models.strip_aux_head(copy.deepcopy(network))
    assert (small, params) == models.count_macs(deployed, 64)  # the aux head is never counted
    assert params == models.count_parameters(deployed) < models.count_parameters(network)
    assert network.aux_classifier is not None  # counting left the training network whole
    assert 3.5 < large / small < 4.5


def _with_random_batch_statistics(network):
    """BatchNorm layers with non-trivial statistics and affine terms, so that folding has something to fold."""
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))
    return network.eval()


@pytest.mark.parametrize("arch,pruned", [(arch, False) for arch in models.ARCHS]
                         + [("deeplabv3_mobilenet_v3_large", True), ("deeplabv3_resnet50", True)])
def test_folding_batchnorm_keeps_the_logits_and_leaves_no_batchnorm(arch, pruned):
    from utils import prune_ops

    torch.manual_seed(0)
    network = _with_random_batch_statistics(models.strip_aux_head(models.build(arch, 7, init="none")))
    if pruned:
        pruner = prune_ops.build_pruner(network, prune_ops.make_importance("Magnitude"), 0.5)
        prune_ops.prune_step(pruner, network)
        network.eval()
    # float64: untrained deep networks reach logits of 1e4, where float32 rounding alone exceeds 1e-4
    network, image = network.double(), torch.randn(2, 3, 72, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = models.forward_logits(network, image, 7)
        folded = models.fold_batchnorm(copy.deepcopy(network))
        actual = models.forward_logits(folded, image, 7)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert expected.abs().max() > 1e-2  # a network that outputs zeros would agree trivially
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_folding_batchnorm_refuses_a_network_in_train_mode():
    network = models.build("lraspp_mobilenet_v3_large", 7, init="none").train()
    with pytest.raises(RuntimeError, match="eval mode"):
        models.fold_batchnorm(network)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())


@pytest.mark.parametrize("length,tile,stride", [(3000, 512, 448), (2000, 512, 448), (100, 48, 32), (49, 48, 1),
                                                (48, 48, 48), (30, 48, 40), (1000, 512, 512)])
def test_tile_windows_cover_the_axis_within_tile_and_stride(length, tile, stride):
    starts, side = models.tile_windows(length, tile, stride)
    assert side <= tile and starts[0] == 0 and starts[-1] + side == length
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < gap <= stride for gap in gaps)
    assert all(side - gap >= tile - stride for gap in gaps)  # each overlap at least the asked one


def test_default_tiling_of_a_3000x2000_photo_costs_under_one_and_a_half_times_its_pixels():
    count, cost = models.tile_cost(2000, 3000, 512)
    assert cost <= 1.5 and count == 35  # half-tile strides ran 77 windows, 3.4x the photo's pixels


def test_batched_tiles_equal_one_tile_per_forward(lively_mobilenet_checkpoint):
    from utils.checkpoint import load_model

    model, _ = load_model(lively_mobilenet_checkpoint)
    image = torch.randn(1, 3, 90, 130)
    single = models.sliding_window_logits(model, image, 7, models.Tiling(48, 32))
    assert single.argmax(1).unique().numel() > 1 and single.std() > 1e-2  # constant outputs agree trivially
    for tile_batch in (3, 100):
        batched = models.sliding_window_logits(model, image, 7, models.Tiling(48, 32, tile_batch=tile_batch))
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="--tile_batch"):
        models.Tiling(48, tile_batch=0)
