"""Recovery after pruning: BatchNorm recalibration, distillation from the dense network, fine-tuning by a step budget
with validation every N steps and the best kept; as torchvision_pruning.py and the study use them."""
import copy
import json

import pytest
import torch

import torchvision_pruning
from conftest import assert_user_error, run_script
from utils import finetune as recovery, model as models
from utils.checkpoint import load_model
from utils.distributed import DistContext
from utils.engine import recalibrate_batchnorm
from utils.finetune import FinetuneBudget, PruneData, finetune
from utils.losses import Distillation, SegmentationLoss
from utils.recipe import Recipe


def test_recalibration_is_the_plain_average_of_the_batch_statistics():
    """Hand-computed: a BatchNorm after an identity convolution sees each batch's per-channel mean and unbiased
    variance; with momentum None the running statistics are their plain average over the batches."""
    conv = torch.nn.Conv2d(2, 2, 1, bias=False)
    torch.nn.init.eye_(conv.weight.view(2, 2))
    network = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(2)).eval()
    network[1].running_mean.fill_(50.0)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 2, 4, 4, generator=generator) * scale + shift, None)
               for scale, shift in ((1.0, 2.0), (3.0, -1.0))]
    recalibrate_batchnorm(network, iter(batches), "cpu")
    means = torch.stack([images.mean(dim=(0, 2, 3)) for images, _ in batches]).mean(0)
    variances = torch.stack([images.transpose(0, 1).reshape(2, -1).var(dim=1) for images, _ in batches]).mean(0)
    torch.testing.assert_close(network[1].running_mean, means)
    torch.testing.assert_close(network[1].running_var, variances)
    assert not network.training and network[1].momentum == 0.1  # mode and momentum put back


def test_distillation_is_zero_against_itself_and_trains_only_the_student():
    torch.manual_seed(0)
    teacher = models.build("lraspp_mobilenet_v3_large", 3, init="none").eval()
    student = copy.deepcopy(teacher).train()
    images = torch.randn(2, 3, 32, 32)
    same = Distillation(teacher, weight=1.0, temperature=2.0).loss(student.eval()(images), images)
    assert same.abs().item() < 1e-6
    for parameter in student.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    differing = Distillation(teacher, weight=2.0, temperature=2.0).loss(student(images), images)
    assert differing.item() > 0
    differing.backward()
    assert any(p.grad is not None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters()), "the teacher's own flags are left alone"


def _fake_data(network, classes=3):
    """Endless (images, masks) batches and a loss, without files: what finetune reads of PruneData."""
    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, classes, (2, 32, 32),
                                                                                 generator=generator)
    return PruneData(train_set=object(), criterion=SegmentationLoss("ce"), calibration=batches())


def test_fine_tuning_keeps_the_best_validated_step(monkeypatch):
    torch.manual_seed(0)
    network = models.build("lraspp_mobilenet_v3_large", 3, init="none")
    prepared, snapshots = _fake_data(network), []
    scores = iter([0.50, 0.40, 0.70, 0.60])  # untuned, after 2, 4 and 6 steps: step 4 is the best

    def fake_validation(model, prepared, device):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    monkeypatch.setattr(recovery, "validation_miou", fake_validation)
    result = finetune(network, prepared, Recipe(lr=0.01, amp=False), FinetuneBudget(6, None, 2),
                      DistContext(device=torch.device("cpu")))
    assert (result.steps, result.best_step, result.val_miou) == (6, 4, 0.70)
    kept = network.state_dict()
    assert all(torch.equal(kept[key], snapshots[2][key]) for key in kept)
    assert not all(torch.equal(kept[key], snapshots[3][key]) for key in kept if kept[key].is_floating_point())


def test_fine_tuning_never_makes_the_network_worse_and_without_val_keeps_the_last(monkeypatch):
    network = models.build("lraspp_mobilenet_v3_large", 3, init="none")
    untuned = copy.deepcopy(network.state_dict())
    monkeypatch.setattr(recovery, "validation_miou", lambda *_: next(worse))
    worse = iter([0.5, 0.1])
    result = finetune(network, _fake_data(network), Recipe(lr=0.01, amp=False), FinetuneBudget(2),
                      DistContext(device=torch.device("cpu")))
    assert result.best_step == 0 and all(torch.equal(network.state_dict()[k], untuned[k]) for k in untuned)
    monkeypatch.setattr(recovery, "validation_miou", lambda *_: None)
    result = finetune(network, _fake_data(network), Recipe(lr=0.01, amp=False), FinetuneBudget(2),
                      DistContext(device=torch.device("cpu")))
    assert result.best_step == result.steps == 2 and result.val_miou is None


def test_a_minutes_budget_is_sized_from_the_first_steps():
    assert recovery._planned_steps(FinetuneBudget(finetune_minutes=1.0), 5, 10.0) == 30
    assert recovery._planned_steps(FinetuneBudget(finetune_minutes=0.01), 5, 10.0) == 5  # never fewer than done


def test_pruning_recalibrates_fine_tunes_and_distills_end_to_end(tmp_path, dataset_dir, mobilenet_checkpoint,
                                                                  capsys):
    path = torchvision_pruning.main([
        "--pruning_ratio", "40", "--state_dict", str(mobilenet_checkpoint), "--data", str(dataset_dir / "train"),
        "--val_data", str(dataset_dir / "val"), "--bn_recalibrate", "2", "--finetune_steps", "4",
        "--finetune_val_every", "2", "--distill", "0.5", "--batch_size", "2", "--crop_size", "48", "--lr", "0.002",
        "--workers", "0", "--measure_size", "64", "--latency_runs", "0", "--model_name", "recovered",
        "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "BatchNorm recalibrated on 2 batches" in out and "distilled from the dense network at weight 0.5" in out
    assert "fine-tuning step 2:" in out and "fine-tuning step 4:" in out
    _, metadata = load_model(path)
    assert metadata["bn_recalibrate"] == 2 and metadata["finetune_steps"] == 4 and 0 <= metadata[
        "finetune_best_step"] <= 4
    assert (metadata["args"]["distill"], metadata["args"]["lr"], metadata["args"]["batch_size"]) == (0.5, 0.002, 2)


def test_recalibration_changes_the_pruned_statistics(dataset_dir, mobilenet_checkpoint):
    """After a pruning step with --bn_recalibrate the BatchNorm statistics are the pruned network's own, not the
    dense network's slices."""
    from utils.finetune import prepare_data
    from utils.pruning import PruneOptions, prune_in_steps

    def pruned(batches):
        network, _ = load_model(mobilenet_checkpoint)
        context = DistContext(device=torch.device("cpu"))
        prepared = prepare_data(dataset_dir / "train", None, Recipe(batch_size=2, crop_size=48), (0, 0), context)
        options = PruneOptions("Magnitude", 2, 30, 1, False, None, 1, "eval", 0, 0, bn_recalibrate=batches)
        prune_in_steps(network, options, prepared, context, lambda *_: None)
        return network.backbone["1"].block[0][1].running_mean

    assert not torch.allclose(pruned(0), pruned(2))


def test_train_distills_from_a_teacher(dataset_dir, tmp_path, mobilenet_checkpoint):
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "student", "--arch",
                        "deeplabv3_mobilenet_v3_large", "--init", "none", "--epochs", "1", "--batch_size", "2",
                        "--crop_size", "32", "--workers", "0", "--distill", "1", "--teacher", mobilenet_checkpoint,
                        "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    args = torch.load(tmp_path / "runs" / "student" / "best.pth", weights_only=True)["args"]
    assert args["distill"] == 1.0 and args["teacher"] == str(mobilenet_checkpoint)
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "lonely", "--init", "none",
                        "--teacher", mobilenet_checkpoint, "--output_dir", tmp_path)
    assert_user_error(result, "--teacher is the network --distill learns from")


@pytest.mark.parametrize("argv, fragment", [
    (["--finetune_steps", "2"], "needs --data"),
    (["--finetune_steps", "2", "--data", "x", "--finetune_minutes", "1"], "give one"),
    (["--data", "x", "--finetune_minutes", "1", "--val_data", "y"], "same --finetune_steps"),
])
def test_study_fine_tuning_budgets_are_checked(mobilenet_checkpoint, dataset_dir, tmp_path, argv, fragment):
    result = run_script("study.py", "--state_dict", mobilenet_checkpoint, "--test_data", dataset_dir / "test",
                        "--pruning_ratio", "30", "--name", "bad", "--output_dir", tmp_path, *argv)
    assert_user_error(result, fragment)


def test_pruning_refuses_torchrun_in_one_line(mobilenet_checkpoint, tmp_path, monkeypatch):
    """One network is pruned in one process: several torchrun processes would each prune and write the same file."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_script("torchvision_pruning.py", "--pruning_ratio", "30", "--state_dict", mobilenet_checkpoint,
                        "--output_dir", tmp_path)
    assert_user_error(result, "torchrun started 2")
    assert not (tmp_path / "pruned").exists()


def test_a_study_distills_every_arm_from_its_dense_network(mobilenet_checkpoint, dataset_dir, tmp_path):
    result = run_script("study.py", "--state_dict", mobilenet_checkpoint, "--data", dataset_dir / "train",
                        "--val_data", dataset_dir / "val", "--test_data", dataset_dir / "test", "--pruning_ratio", "30",
                        "--finetune_steps", "2", "--distill", "0.5", "--bn_recalibrate", "1", "--batch_size", "2",
                        "--crop_size", "32", "--measure_size", "64", "--latency_runs", "0", "--workers", "0",
                        "--name", "distilled", "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distill 0.5 (T 2)" in result.stdout
    manifest = json.loads((tmp_path / "studies" / "distilled" / "study.json").read_text())
    assert manifest["settings"]["recipe"]["distill"] == 0.5 and len(manifest["runs"]) == 2
