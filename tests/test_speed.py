"""Speed options on a CPU: training's mixed-precision type, channels_last, --compile and one sync per epoch;
scripts/benchmark_tiling.py."""
import copy

import numpy as np
import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

import train
from conftest import run_script
from utils import data, engine, model as models
from utils.cli import UserError
from utils.recipe import make_criterion

FAST = ["--batch_size", "2", "--crop_size", "64", "--init", "none", "--device", "cpu", "--workers", "0",
        "--arch", "lraspp_mobilenet_v3_large", "--epochs", "1"]


def train_args(dataset_dir, out, *extra):
    return [str(dataset_dir / "train"), str(dataset_dir / "val"), "speed", *FAST, "--output_dir", str(out), *extra]


def test_amp_dtype_is_bfloat16_where_native_and_float16_on_older_gpus(monkeypatch):
    assert engine.amp_dtype(torch.device("cpu")) == torch.bfloat16
    assert engine.amp_dtype(torch.device("cpu"), "float16") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert engine.amp_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert engine.amp_dtype(torch.device("cuda")) == torch.bfloat16


def _one_epoch(network, dataset_dir, channels_last, steps=2):
    train_set = data.S2DSDataset(dataset_dir / "train", data.EvalTransform(None))  # no random crops: same batches
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, range(2 * steps)), batch_size=2)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    step = engine.TrainStep(make_criterion("ce", train_set, False), optimizer)
    stats = engine.train_one_epoch(network, loader, step, torch.device("cpu"), 1, progress=False)
    return stats, network


def test_channels_last_training_gives_the_same_losses_and_weights(dataset_dir, monkeypatch):
    syncs = []
    monkeypatch.setattr(engine, "synchronize", syncs.append)
    torch.manual_seed(0)
    network = models.build("lraspp_mobilenet_v3_large", data.NUM_CLASSES, init="none")
    plain, plain_network = _one_epoch(copy.deepcopy(network), dataset_dir, False)
    fast, fast_network = _one_epoch(copy.deepcopy(network), dataset_dir, True)
    assert len(syncs) == 2  # one per epoch, not one per step
    assert fast_network.backbone["0"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    start = network.state_dict()
    for name, expected in plain_network.named_parameters():  # the same step, up to float rounding
        step, fast_step = expected.detach() - start[name], fast_network.get_parameter(name).detach() - start[name]
        assert (fast_step - step).norm() <= 1e-2 * step.norm() + 1e-7, name
    assert plain["data_seconds"] >= 0 and plain["compute_seconds"] > 0


def test_compile_is_refused_in_one_line_where_unsupported(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(UserError, match="--compile is not supported by torch .* drop --compile"):
        train.main(train_args(dataset_dir, tmp_path / "a", "--compile"))


def test_compile_errors_become_one_line_when_asked_for_and_at_the_first_forward(dataset_dir, tmp_path,
                                                                                 monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("no backend for this device")

    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
    with pytest.raises(UserError, match=r"--compile failed on this machine \(RuntimeError: no backend"):
        train.main(train_args(dataset_dir, tmp_path / "b", "--compile"))

    def fail_at_first_forward(*args, **kwargs):
        raise TorchDynamoException("inductor: C++ compiler not found")

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
    monkeypatch.setattr("utils.training.train_one_epoch", fail_at_first_forward)
    with pytest.raises(UserError, match=r"--compile failed on this machine \(inductor: C\+\+ compiler not found"):
        train.main(train_args(dataset_dir, tmp_path / "c", "--compile"))
    with pytest.raises(TorchDynamoException):  # without --compile it is a programming error: traceback kept
        train.main(train_args(dataset_dir, tmp_path / "d"))


def test_float16_autocast_is_refused_on_the_cpu(dataset_dir, tmp_path):
    with pytest.raises(UserError, match="--amp_dtype float16 needs a CUDA GPU"):
        train.main(train_args(dataset_dir, tmp_path, "--amp", "--amp_dtype", "float16"))


def test_benchmark_tiling_prints_cost_and_agreement_of_each_setting(tmp_path, lively_mobilenet_checkpoint):
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((130, 70), Image.Resampling.BILINEAR).save(tmp_path / "photo.png")
    result = run_script("scripts/benchmark_tiling.py", "--state_dict", lively_mobilenet_checkpoint, "--image",
                        tmp_path / "photo.png", "--tile", "48", "--tile_batch", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "photo.png: 130x70 px" in lines[0] and lines[1].startswith("whole photo: 1 window, 1.00x")
    default, former = lines[2], lines[3]
    # 48 px tiles at stride 42 (default): 3x2 windows of 48x38 px; at stride 24: 5x2 windows of 46x47 px
    assert default.startswith("tile 48, stride 42 (default): 6 windows, 1.20x the photo's pixels")
    assert former.startswith("tile 48, stride 24 (half-tile stride, the former default): 10 windows, 2.38x")
    for line in (default, former):
        agreement = float(line.split(" s, ")[1].split("%")[0])
        assert 0 < agreement <= 100  # untrained and 48 px tiles: little context, so no bound on the value


def test_channels_last_inference_gives_the_same_logits_and_masks(tmp_path, lively_mobilenet_checkpoint):
    from types import SimpleNamespace

    from PIL import Image

    import inference
    from utils.inference import load_network

    networks = [load_network(SimpleNamespace(state_dict=str(lively_mobilenet_checkpoint), pruned_model=None,
                                             use_pruned=False, allow_pickle=False, half=False, channels_last=flag,
                                             output_stride=None),
                             torch.device("cpu"))[0] for flag in (False, True)]
    assert networks[1].backbone["0"][0].weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.randn(1, 3, 72, 96)
    with torch.no_grad():
        plain, fast = (models.forward_logits(network, image, data.NUM_CLASSES) for network in networks)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-5)  # another convolution algorithm: rounding only
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(photo)
    masks = []
    for flag in ("False", "True"):
        out = tmp_path / flag
        inference.main(["--state_dict", str(lively_mobilenet_checkpoint), "--image", str(photo), "--mode",
                        "save_mask", "--channels_last", flag, "--device", "cpu", "--output_dir", str(out)])
        masks.append(np.array(Image.open(next((out / "inference").glob("photo*_mask.png")))))
    assert len(np.unique(masks[0])) > 1 and np.array_equal(masks[0], masks[1])
