"""utils.checkpoint: the pickle-free format, atomic writes, and the older kinds of file people have."""
import os

import pytest
import torch

from utils import data, model as models
from utils.checkpoint import (checkpoint_classes, load_for_inference, load_model, make_checkpoint, read_checkpoint,
                              save_atomic)
from utils.cli import UserError

ARCH = "deeplabv3_mobilenet_v3_large"


def outputs(network, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return models.forward_logits(network.eval(), torch.randn(1, 3, 64, 64), 7)


def test_roundtrip_loads_weights_only_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    network = models.build(ARCH, 7, init="none").eval()
    path = tmp_path / "m.pth"
    save_atomic(make_checkpoint(network, ARCH, epoch=3, metrics=[{"epoch": 1, "val_miou": 0.5}]), path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cracksense-checkpoint" and raw["arch"] == ARCH and raw["num_classes"] == 7
    assert raw["classes"][-1] == "crack" and "pruning" not in raw
    loaded, metadata = load_model(path)
    assert metadata["epoch"] == 3 and not loaded.training
    assert torch.equal(outputs(loaded), outputs(network))


def test_failed_save_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    save_atomic({"a": torch.ones(1)}, path)

    def broken_save(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_atomic({"a": torch.zeros(1)}, path)
    assert os.listdir(tmp_path) == ["m.pth"]
    assert torch.load(path, weights_only=True)["a"].item() == 1


def test_thesis_state_dict_with_eight_outputs(tmp_path):
    torch.manual_seed(0)
    network = models.build(ARCH, 8, init="none", aux_loss=False)
    path = tmp_path / "thesis_weights.pth"
    torch.save(network.state_dict(), path)
    loaded, metadata = load_model(path)
    assert metadata["format"] == "state_dict" and metadata["num_outputs"] == 8 and metadata["num_classes"] == 7
    assert metadata["arch"] == ARCH
    assert torch.equal(outputs(loaded), outputs(network)[:, :7])


def test_ddp_prefixed_state_dict_and_arch_inference(tmp_path):
    network = models.build("deeplabv3_resnet50", 7, init="none")
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in network.state_dict().items()}, path)
    assert read_checkpoint(path)["arch"] == "deeplabv3_resnet50"
    network = models.build("lraspp_mobilenet_v3_large", 7, init="none")
    torch.save(network.state_dict(), path)
    assert read_checkpoint(path)["arch"] == "lraspp_mobilenet_v3_large"


def test_pickled_model_needs_allow_pickle(tmp_path):
    network = models.build(ARCH, 7, init="none")
    path = tmp_path / "whole.pth"
    torch.save(network, path)
    with pytest.raises(UserError, match="--allow_pickle"):
        load_model(path)
    loaded, metadata = load_model(path, allow_pickle=True)
    assert metadata["format"] == "pickled_model"
    assert torch.equal(outputs(loaded), outputs(network))


def test_other_class_count_missing_file_and_garbage_refused(tmp_path):
    path = tmp_path / "voc.pth"
    torch.save(models.build(ARCH, 21, init="none").state_dict(), path)
    with pytest.raises(UserError, match="21 classes but records no class table"):
        load_model(path)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model(tmp_path / "junk.pth")


def test_a_checkpoint_names_its_classes_and_a_tampered_table_is_refused(tmp_path):
    binary = data.ClassTable(("background", "crack"), ((0, 0, 0), (255, 255, 255)))
    path = tmp_path / "binary.pth"
    save_atomic(make_checkpoint(models.build(ARCH, 2, init="none"), ARCH, binary), path)
    _, metadata = load_model(path)
    assert checkpoint_classes(metadata) == binary and metadata["classes"] == ["background", "crack"]
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["class_table"][1][2] = 7  # a colour no label can have
    torch.save(checkpoint, tmp_path / "tampered.pth")
    with pytest.raises(UserError, match="damaged or edited checkpoint.*0 or 255"):
        load_model(tmp_path / "tampered.pth")
    checkpoint["class_table"] = checkpoint["class_table"][:1]
    torch.save(checkpoint, tmp_path / "short.pth")
    with pytest.raises(UserError, match="damaged or edited checkpoint"):
        load_model(tmp_path / "short.pth")


def test_weights_into_another_architecture_refused(tmp_path, mobilenet_checkpoint):
    other = tmp_path / "r50.pth"
    save_atomic(make_checkpoint(models.build("deeplabv3_resnet50", 7, init="none"), "deeplabv3_resnet50"), other)
    with pytest.raises(UserError, match="does not fit this network"):
        load_for_inference(weights=other, pruned_model=mobilenet_checkpoint, use_pruned=True)


def test_loading_rules_for_test_and_inference(mobilenet_checkpoint):
    with pytest.raises(UserError, match="--use_pruned needs --pruned_model"):
        load_for_inference(weights=mobilenet_checkpoint, use_pruned=True)
    with pytest.raises(UserError, match="no model given"):
        load_for_inference()
    model, metadata = load_for_inference(weights=mobilenet_checkpoint, pruned_model=mobilenet_checkpoint,
                                         use_pruned=True)
    assert metadata["weights_path"] == str(mobilenet_checkpoint) and not model.training


def test_strip_checkpoint_keeps_the_network_drops_the_training_state(tmp_path):
    from conftest import assert_user_error, run_script

    torch.manual_seed(0)
    network = models.build(ARCH, 7, init="none")
    optimizer = torch.optim.AdamW(network.parameters())
    network(torch.randn(2, 3, 64, 64))["out"].mean().backward()
    optimizer.step()
    source, target = tmp_path / "last.pth", tmp_path / "deploy.pth"
    save_atomic(make_checkpoint(network, ARCH, optimizer=optimizer.state_dict(), lr_scheduler={}, epoch=4), source)
    result = run_script("strip_checkpoint.py", source, target)
    assert result.returncode == 0, result.stderr
    stripped = torch.load(target, weights_only=True)
    assert "optimizer" not in stripped and "lr_scheduler" not in stripped and stripped["epoch"] == 4
    assert os.path.getsize(target) < os.path.getsize(source) / 2
    assert torch.equal(outputs(load_model(target)[0]), outputs(network))
    assert_user_error(run_script("strip_checkpoint.py", source, target), "already exists", "--overwrite")
    assert run_script("strip_checkpoint.py", source, target, "--overwrite").returncode == 0
