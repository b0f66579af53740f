"""Training that spends its time on steps: output stride, time budget, validation cadence, class-aware crops."""
import json
import random

import pandas as pd
import pytest
import torch
from torchvision import tv_tensors

import train
from conftest import assert_user_error, run_script
from utils import data, model as models
from utils.checkpoint import load_model, make_checkpoint, save_atomic
from utils.cli import UserError
from utils.recipe import PolyDecay, epochs_within_budget, poly_scheduler, resize_schedule

FAST = ["--batch_size", "2", "--crop_size", "64", "--init", "none", "--device", "cpu", "--workers", "0"]
MOBILE = ["--arch", "deeplabv3_mobilenet_v3_large"]


def _conv_pattern(network):
    return [(conv.stride, conv.dilation, conv.padding) for conv in network.modules()
            if isinstance(conv, torch.nn.Conv2d)]


@pytest.mark.parametrize("arch", ["deeplabv3_resnet50", "deeplabv3_resnet101"])
def test_output_stride_16_is_torchvisions_layer4_dilation_with_half_the_aspp_rates(arch):
    network = models.build(arch, 7, init="none", aux_loss=False, stride=16).eval()
    rates = [branch[0].dilation[0] for branch in list(network.classifier[0].convs)[1:4]]
    assert rates == [6, 12, 18] and models.output_stride(network) == 16
    with torch.no_grad():
        assert network.backbone(torch.zeros(1, 3, 64, 64))["out"].shape[-1] == 4  # 64 / 16
    models.set_output_stride(network, 8)
    assert _conv_pattern(network) == _conv_pattern(models.build(arch, 7, init="none", aux_loss=False))
    with torch.no_grad():
        assert network.backbone(torch.zeros(1, 3, 64, 64))["out"].shape[-1] == 8


def test_output_stride_round_trip_through_the_checkpoint(tmp_path):
    network = models.build("deeplabv3_resnet50", 7, init="none", aux_loss=False, stride=16).eval()
    save_atomic(make_checkpoint(network, "deeplabv3_resnet50"), tmp_path / "os16.pth")
    loaded, metadata = load_model(tmp_path / "os16.pth")
    assert models.output_stride(loaded) == 16 and metadata["output_stride"] == 16
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(image)["out"], network(image)["out"], atol=1e-5)
    overridden, metadata = load_model(tmp_path / "os16.pth", stride=8)
    assert models.output_stride(overridden) == 8 and metadata["output_stride"] == 8
    old = make_checkpoint(network, "deeplabv3_resnet50")
    del old["output_stride"]  # written before strides were recorded
    save_atomic(old, tmp_path / "old.pth")
    assert models.output_stride(load_model(tmp_path / "old.pth")[0]) == 8


def test_output_stride_is_refused_for_mobilenet_in_one_line(dataset_dir, tmp_path):
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "m", *FAST, *MOBILE,
                        "--output_stride", "16", "--output_dir", tmp_path)
    assert_user_error(result, "--output_stride", "DeepLabV3-ResNet")


def test_poly_schedule_resized_by_a_budget_still_ends_at_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = poly_scheduler(optimizer, 100)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    resize_schedule(scheduler, 20)
    assert scheduler.lr_lambdas[0].total_steps == 20 and "total_steps" in str(scheduler.state_dict())
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert PolyDecay(10, power=1.0)(5) == 0.5


def test_epochs_within_budget_by_hand():
    # 600 s budget, 100 s gone, 2 epochs done; 10 s per epoch, 20 s per validation every 5 epochs:
    # (600 - 100 - 20 final) / (10 + 20 / 5) = 480 / 14 = 34.3 -> 34 more epochs.
    assert epochs_within_budget(600, 100, 2, 10, 20, 5) == 36
    assert epochs_within_budget(600, 700, 2, 10, 20, 5) == 2  # over budget: never fewer than done


def test_time_budget_sizes_the_run_and_its_schedule(dataset_dir, tmp_path):
    train.main([str(dataset_dir / "train"), str(dataset_dir / "val"), "budget", *FAST, *MOBILE,
                "--max_minutes", "0.75", "--val_every", "3", "--output_dir", str(tmp_path)])
    run = tmp_path / "runs" / "budget"
    last = torch.load(run / "last.pth", weights_only=True)
    planned = last["args"]["epochs"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert planned == last["epoch"] == metrics["epoch"].iloc[-1]  # the plan was run to its end
    assert 1 < planned != 30  # sized by the budget (an epoch takes a few seconds), not --epochs' default
    assert metrics["lr"].iloc[-1] < metrics["lr"].iloc[0]  # decaying towards the plan's last step
    assert last["lr_scheduler"]["lr_lambdas"][0]["total_steps"] == planned * 3  # 6 images / batch 2


def test_val_every_and_steps(dataset_dir, tmp_path):
    train.main([str(dataset_dir / "train"), str(dataset_dir / "val"), "cadence", *FAST, *MOBILE,
                "--steps", "14", "--val_every", "2", "--output_dir", str(tmp_path)])
    run = tmp_path / "runs" / "cadence"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 4, 5]  # 14 steps of 3 per epoch: 5 epochs; 1, every 2nd, last
    assert metrics["step"].tolist() == [3, 6, 12, 15]
    assert json.loads((run / "args.json").read_text())["steps"] == 14


def test_steps_and_budget_together_are_refused(dataset_dir, tmp_path):
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "x", *FAST, *MOBILE,
                        "--steps", "5", "--max_minutes", "1", "--output_dir", tmp_path)
    assert_user_error(result, "--steps", "--max_minutes")


def _rare_class_sample(size=64, rare_side=16):
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[-rare_side:, -rare_side:] = data.CRACK_ID
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _crops_with_rare_class(cat_max_ratio, draws=300):
    """The share of 24 px crops of a 64 px image whose rare 16 px corner square covers at least a quarter
    (a crop where background covers at most 75%)."""
    random.seed(0)
    crop = data.ClassAwareCrop(24, cat_max_ratio)
    image, mask = _rare_class_sample()
    return sum(int((crop(image, mask)[1] == data.CRACK_ID).sum()) >= 24 * 24 // 4 for _ in range(draws)) / draws


def test_class_aware_crop_sees_the_rare_class_far_more_often():
    plain, aware = _crops_with_rare_class(None), _crops_with_rare_class(0.75)
    assert plain < 0.1 and aware > 3 * plain, (plain, aware)


def test_class_aware_crop_pads_small_images_with_ignore():
    image, mask = _rare_class_sample(size=16, rare_side=4)
    cropped_image, cropped_mask = data.ClassAwareCrop(24, 0.75)(image, mask)
    assert cropped_image.shape[-2:] == (24, 24) and cropped_mask.shape == (24, 24)
    assert int((cropped_mask == data.IGNORE_INDEX).sum()) == 24 * 24 - 16 * 16


@pytest.mark.parametrize("flags, fragment", [(["--cat_max_ratio", "1.5"], "--cat_max_ratio"),
                                             (["--scale_range", "2", "1"], "--scale_range")])
def test_bad_crop_settings_are_refused(dataset_dir, tmp_path, flags, fragment):
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "x", *FAST, *MOBILE, *flags,
                        "--output_dir", tmp_path)
    assert_user_error(result, fragment)


def test_skeleton_recall_loss_by_hand():
    from utils.losses import SegmentationLoss, skeleton_recall_loss

    target = torch.zeros(1, 9, 9, dtype=torch.long)
    target[0, 4, 1:8] = data.CRACK_ID  # a 1-px crack: its own skeleton; tubed (3 px): 7 + 7 + 9 = 23 pixels
    logits = torch.full((1, data.NUM_CLASSES, 9, 9), -50.0)
    logits[:, 0] = 50.0
    logits[0, data.CRACK_ID, :, :5], logits[0, 0, :, :5] = 50.0, -50.0  # crack predicted on columns 0-4
    # covered: row 3 cols 1-4 (4) + row 5 cols 1-4 (4) + row 4 cols 0-4 (5) = 13 of 23
    assert skeleton_recall_loss(logits, target, data.CRACK_ID).item() == pytest.approx(1 - 13 / 23, abs=1e-6)
    plain = SegmentationLoss("ce")(logits, target)
    assert SegmentationLoss("ce", skeleton_weight=2.0, crack_id=data.CRACK_ID)(logits, target).item() == \
        pytest.approx(plain.item() + 2 * (1 - 13 / 23), abs=1e-5)
    assert skeleton_recall_loss(logits, torch.zeros_like(target), data.CRACK_ID).item() == 0
    with pytest.raises(UserError, match="crack"):  # a class table without crack has no skeleton to recall
        SegmentationLoss("ce", skeleton_weight=1.0)


def test_config_repeats_a_run_and_flags_win(dataset_dir, tmp_path):
    first = [str(dataset_dir / "train"), str(dataset_dir / "val"), "first", *FAST, *MOBILE, "--epochs", "1",
             "--lr", "0.003", "--optimizer", "adamw", "--cat_max_ratio", "0.8", "--output_dir", str(tmp_path)]
    train.main(first)
    saved = tmp_path / "runs" / "first" / "args.json"
    train.main(["--config", str(saved), str(dataset_dir / "train"), str(dataset_dir / "val"), "again"])
    train.main(["--config", str(saved), str(dataset_dir / "train"), str(dataset_dir / "val"), "changed",
                "--lr", "0.001"])
    runs = {name: json.loads((tmp_path / "runs" / name / "args.json").read_text())
            for name in ("first", "again", "changed")}
    differs = {key for key in runs["first"] if runs["first"][key] != runs["again"].get(key)}
    assert differs == {"run_name"}
    assert runs["changed"]["lr"] == 0.001 and runs["changed"]["cat_max_ratio"] == 0.8


@pytest.mark.parametrize("content, fragment", [("{not json", "not a readable JSON"),
                                               ('{"lr": "fast"}', "lr 'fast'"),
                                               ('{"optimizer": "lion"}', "not one of"),
                                               ('{"learning_rate": 0.1}', "learning_rate is not an option")])
def test_bad_config_is_one_line(dataset_dir, tmp_path, content, fragment):
    config = tmp_path / "bad.json"
    config.write_text(content)
    result = run_script("train.py", "--config", config, dataset_dir / "train", dataset_dir / "val", "x", *FAST,
                        *MOBILE, "--output_dir", tmp_path)
    assert_user_error(result, fragment)


@pytest.fixture(scope="module")
def stride16_checkpoint(tmp_path_factory):
    network = models.build("deeplabv3_resnet50", 7, init="none", aux_loss=False, stride=16).eval()
    path = tmp_path_factory.mktemp("os16") / "os16.pth"
    save_atomic(make_checkpoint(network, "deeplabv3_resnet50"), path)
    return path


@pytest.mark.parametrize("override, expected", [([], 16), (["--output_stride", "8"], 8)])
def test_pruning_keeps_the_recorded_stride_unless_overridden(stride16_checkpoint, tmp_path, override, expected):
    import torchvision_pruning

    torchvision_pruning.main(["--state_dict", str(stride16_checkpoint), "--pruning_ratio", "20",
                              "--importance_type", "Magnitude", "--model_name", "p", "--measure_size", "64",
                              "--latency_runs", "0", "--workers", "0", "--device", "cpu", "--output_dir", str(tmp_path), *override])
    pruned, metadata = load_model(tmp_path / "pruned" / "p.pth")
    assert metadata["output_stride"] == models.output_stride(pruned) == expected


def test_export_and_benchmark_run_the_recorded_stride(stride16_checkpoint, tmp_path, capsys):
    import benchmark
    import export

    export.main([str(stride16_checkpoint), "--output", str(tmp_path / "os16.onnx"), "--size", "64", "--device", "cpu"])
    assert "parity check passed" in capsys.readouterr().out
    from utils.benchmarking import VariantSpec, prepare_variant

    for stride, side in ((None, 4), (8, 8)):  # 64 px at stride 16 and 8: 4 and 8 feature cells a side
        variant = prepare_variant(stride16_checkpoint, "x", VariantSpec(64, 1, "cpu", output_stride=stride))
        with torch.no_grad():
            assert variant.network.model.backbone(variant.image)["out"].shape[-1] == side
    benchmark.main([str(stride16_checkpoint), "--size", "64", "--runs", "1", "--warmup", "0", "--output_stride", "8",
                    "--device", "cpu", "--output_dir", str(tmp_path)])


def test_test_py_refuses_a_stride_for_an_onnx_graph(stride16_checkpoint, dataset_dir, tmp_path):
    import export

    export.main([str(stride16_checkpoint), "--output", str(tmp_path / "g.onnx"), "--size", "64", "--device", "cpu"])
    result = run_script("test.py", dataset_dir / "test", "--weights", tmp_path / "g.onnx", "--output_stride", "8",
                        "--output_dir", tmp_path)
    assert_user_error(result, "--output_stride", "ONNX")


def test_pruning_takes_its_settings_from_a_config_file(tmp_path):
    import torchvision_pruning

    network = models.build("deeplabv3_mobilenet_v3_large", 7, init="none").eval()
    save_atomic(make_checkpoint(network, "deeplabv3_mobilenet_v3_large"), tmp_path / "dense.pth")
    config = tmp_path / "prune.json"
    config.write_text(json.dumps({"state_dict": str(tmp_path / "dense.pth"), "pruning_ratio": 30,
                                  "importance_type": "Magnitude", "model_name": "from_config", "latency_runs": 0,
                                  "measure_size": 64, "device": "cpu", "output_dir": str(tmp_path)}))
    torchvision_pruning.main(["--config", str(config), "--model_name", "given"])  # the command line wins
    assert (tmp_path / "pruned" / "given.pth").is_file() and not (tmp_path / "pruned" / "from_config.pth").exists()
    result = run_script("study.py", "--config", config, "--output_dir", tmp_path)
    assert_user_error(result, "model_name is not an option")
