"""Shared fixtures: a tiny generated S2DS dataset and small checkpoints, made once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import data, model as models  # noqa: E402
from utils.checkpoint import make_checkpoint, save_atomic  # noqa: E402
from utils.synthetic import generate  # noqa: E402

# `make test` runs two pytest-xdist workers: each gets its share of the cores (and so do the scripts the tests start,
# through OMP_NUM_THREADS), since two processes of two OpenMP threads each on two cores wait on each other's spinning.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)))
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def run_script(*args, cwd=None, timeout=600):
    """Run a repository script or module as a user would; returns CompletedProcess (text)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result, *fragments):
    """Exit status 2, one line on stderr naming the problem, no traceback.

    Progress bars (tqdm's "NN%|" lines, and the blank line that clears one) are not counted: on a
    terminal they are redrawn in place and cleared before the error line.
    """
    visible = (line.split("\r")[-1] for line in result.stderr.split("\n"))
    lines = [line for line in visible if line.strip() and "%|" not in line]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """train 6 / val 2 / test 2 images of 64x64 px."""
    root = tmp_path_factory.mktemp("s2ds")
    generate(root, count=10, size=64, seed=3, splits=(("train", 0.6), ("val", 0.2), ("test", 0.2)))
    return root


def _saved_model(folder, arch, seed=0):
    torch.manual_seed(seed)
    network = models.build(arch, data.NUM_CLASSES, init="none").eval()
    path = folder / f"{arch}.pth"
    save_atomic(make_checkpoint(network, arch), path)
    return path


@pytest.fixture(scope="session")
def resnet101_checkpoint(tmp_path_factory):
    """An untrained DeepLabV3-ResNet101 in the CrackSense checkpoint format."""
    return _saved_model(tmp_path_factory.mktemp("ckpt"), "deeplabv3_resnet101")


@pytest.fixture(scope="session")
def mobilenet_checkpoint(tmp_path_factory):
    """An untrained DeepLabV3-MobileNetV3 (fast) in the CrackSense checkpoint format."""
    return _saved_model(tmp_path_factory.mktemp("ckpt"), "deeplabv3_mobilenet_v3_large")


@pytest.fixture(scope="session")
def lively_mobilenet_checkpoint(tmp_path_factory):
    """An untrained DeepLabV3-MobileNetV3 whose logits vary across the image.

    The plain untrained network predicts one constant class (its activations vanish), which would
    make comparisons of predictions (tiled vs whole, ONNX vs PyTorch) pass trivially. Here BatchNorm
    statistics are calibrated on random images and the heads redrawn, so several classes appear.
    """
    torch.manual_seed(0)
    arch = "deeplabv3_mobilenet_v3_large"
    network = models.build(arch, data.NUM_CLASSES, init="none")
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    network.train()
    with torch.no_grad():
        for _ in range(3):
            network(torch.randn(2, 3, 64, 64))
    network.eval()
    for conv in models.head_layers(network):
        torch.nn.init.normal_(conv.weight, std=0.01)
        torch.nn.init.zeros_(conv.bias)
    path = tmp_path_factory.mktemp("ckpt") / "lively_mobilenet.pth"
    save_atomic(make_checkpoint(network, arch), path)
    return path
