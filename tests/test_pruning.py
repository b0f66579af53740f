"""Pruning: torchvision_pruning.py, utils/pruning.py, and pruned files going through train, test and inference."""
import dataclasses
import importlib.util
import json
import os
import typing

import pandas as pd
import pytest
import torch
import torch_pruning as tp

import benchmark
import inference
import study
import torchvision_pruning
import train
from conftest import REPO, assert_user_error, run_script
from utils import model as models, timing
from utils.evaluation import latency_per_image
from utils.checkpoint import load_model, make_checkpoint, save_atomic
from utils.cli import UserError, options_from, usable_cpus
from utils.data import ClassTable, S2DSDataset, collate, train_transform
from utils.losses import SegmentationLoss
from utils.prune_run import PruneRun
from utils.prune_ops import build_pruner, make_importance, prune_step, ratio_fraction, taylor_gradients
from utils.study import StudyOptions

MOBILENET = "deeplabv3_mobilenet_v3_large"
FAST = ["--device", "cpu", "--workers", "0", "--latency_runs", "0", "--measure_size", "64"]


def prune(tmp_path, *argv):
    """torchvision_pruning.main in-process (fast settings first, so argv overrides them); returns the checkpoint."""
    return torchvision_pruning.main([*FAST, *map(str, argv), "--output_dir", str(tmp_path)])


def logits(network, seed=1, size=64):
    torch.manual_seed(seed)
    with torch.no_grad():
        return models.forward_logits(network.eval(), torch.randn(2, 3, size, size), 7)


def conv_widths(network):
    return {name: (m.in_channels, m.out_channels) for name, m in network.named_modules()
            if isinstance(m, torch.nn.Conv2d)}


@pytest.fixture(scope="module")
def pruned_mobilenet(tmp_path_factory, mobilenet_checkpoint):
    """Magnitude L1, 50% in 2 steps, with the whole-model pickle beside it (the model as it was in memory)."""
    folder = tmp_path_factory.mktemp("pruned")
    path = prune(folder, "--pruning_ratio", 50, "--importance_type", "Magnitude", "--p_value", 1, "--model_name",
                 "mb", "--iterative_steps", 2, "--state_dict", mobilenet_checkpoint, "--keep_feature_extract",
                 "False", "--save_pickle", "--latency_runs", 1)
    return path


# --- options --------------------------------------------------------------------------------------------

def test_ratio_is_percent():
    assert ratio_fraction(0) == 0 and ratio_fraction(50) == 0.5 and ratio_fraction(99) == 0.99
    with pytest.raises(UserError, match="unit is percent"):
        ratio_fraction(0.5)
    for bad in (100, -5):
        with pytest.raises(UserError, match="between 0 and 99"):
            ratio_fraction(bad)


def _tiny_net_with_a_dead_channel(dead=5):
    """conv(3->8) + BN + ReLU + conv(8->4): channel `dead` has zero filter weights and a zero BN scale."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        net[0].weight[dead] = 0
        net[0].bias[dead] = 0
        net[1].weight[dead] = 0
    return net


@pytest.mark.parametrize("name, p_value", [("Magnitude", 1), ("Magnitude", 2), ("LAMP", 2), ("BNScale", 2),
                                           ("Taylor", 2)])
def test_each_criterion_removes_the_dead_channel_first(name, p_value):
    net = _tiny_net_with_a_dead_channel()
    example = torch.randn(2, 3, 8, 8)
    if name == "Taylor":
        net(example).square().mean().backward()
    pruner = tp.pruner.BasePruner(net, example, make_importance(name, p_value), pruning_ratio=1 / 8,
                                  ignored_layers=[net[3]])
    pruner.step()
    assert net[0].out_channels == 7
    assert net[0].weight.flatten(1).abs().sum(1).min() > 0, f"{name} kept the dead channel"


def test_importance_spellings_and_norms():
    assert make_importance("magnitude", 1).p == 1 and make_importance("Magnitude", 3).p == 3
    assert isinstance(make_importance("fpgm", 1), tp.importance.FPGMImportance) and make_importance("FPGM", 1).p == 1
    with pytest.raises(UserError, match="Magnitude, Taylor"):
        make_importance("Hessianish")
    with pytest.raises(UserError, match="positive integer"):
        make_importance("Magnitude", 0)


def _pruned_channels(net, seed):
    pruner = tp.pruner.BasePruner(net, torch.randn(2, 3, 8, 8), make_importance("Random", seed=seed),
                                  pruning_ratio=0.5, ignored_layers=[net[3]])
    pruner.step()
    return pruner.pruning_history()


def test_random_control_repeats_its_channels_for_a_seed_whatever_the_global_generator():
    chosen = []
    for global_seed, seed in ((0, 3), (1, 3), (0, 4), (0, 5)):
        net = _tiny_net_with_a_dead_channel()
        torch.manual_seed(global_seed)
        chosen.append(_pruned_channels(net, seed))
    assert chosen[0] == chosen[1], "the same --seed removed other channels"
    assert chosen[0] != chosen[2] or chosen[0] != chosen[3], "the seed does not reach the random criterion"


def test_random_importance_through_torchvision_pruning(tmp_path, mobilenet_checkpoint):
    histories = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = prune(tmp_path, "--pruning_ratio", 30, "--importance_type", "random", "--model_name", name,
                     "--seed", seed, "--state_dict", mobilenet_checkpoint)
        raw = torch.load(path, weights_only=True)
        assert raw["importance"] == "Random"
        histories[name] = raw["pruning"]
    assert histories["a"] == histories["b"] != histories["c"]


def test_every_latency_is_the_deployed_network_after_the_same_warm_up(tmp_path, pruned_mobilenet, monkeypatch):
    """torchvision_pruning.py's summary, benchmark.py and test.py's timing rows (study.py calls the same
    deployed_latencies) all time through utils.timing: BatchNorm folded, eval mode, WARMUP forwards first."""
    timed = []

    def spy(calls, runs, warmup, device):
        for call in calls:
            network = call.__defaults__[0]  # forward_times' lambda network=..., image=...
            timed.append((warmup, network.training, any(isinstance(module, torch.nn.BatchNorm2d)
                                                        for module in network.modules())))
        return [[0.01] * runs for _ in calls]

    monkeypatch.setattr(timing, "interleaved_times", spy)
    prune(tmp_path, "--pruning_ratio", 30, "--model_name", "timed", "--state_dict", pruned_mobilenet,
          "--latency_runs", 2)
    benchmark.main([str(pruned_mobilenet), str(tmp_path / "pruned" / "timed.pth"), "--size", "64", "--runs", "2",
                    "--device", "cpu", "--output_dir", str(tmp_path)])
    model, _ = load_model(pruned_mobilenet)

    class Untiled:
        tile = None

    assert latency_per_image(model, Untiled, (64, 64), torch.device("cpu")) == pytest.approx(0.01)
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules()), "the caller's model changed"
    assert len(timed) == 2 + 2 + 1
    assert set(timed) == {(timing.WARMUP, False, False)}


def test_the_seed_command_parses_as_written():
    args = torchvision_pruning.get_args_parser().parse_args(
        "--pruning_ratio 50 --importance_type Magnitude --p_value 2 --model_name NAME --iterative_steps 5 "
        "--state_dict W.pth --keep_feature_extract False".split())
    assert (args.pruning_ratio, args.importance_type, args.p_value, args.model_name, args.iterative_steps,
            args.state_dict, args.keep_feature_extract) == (50.0, "Magnitude", 2, "NAME", 5, "W.pth", False)
    assert (args.finetune_steps, args.overwrite, args.device) == (0, False, "auto")


def _option_fields(spec):
    """The field names of an options dataclass and of the ones nested in it: options_from fills every one of them
    from the script's parsed command line, so each must be an option of that script."""
    hints = typing.get_type_hints(spec)
    names = []
    for field in dataclasses.fields(spec):
        names += _option_fields(hints[field.name]) if dataclasses.is_dataclass(hints[field.name]) else [field.name]
    return names


@pytest.mark.parametrize("script, spec", [(torchvision_pruning, PruneRun), (study, StudyOptions)])
def test_every_field_of_the_run_options_is_an_option_of_the_script(script, spec):
    options = {action.dest for action in script.get_args_parser()._actions}
    fields = _option_fields(spec)
    assert len(fields) > 10 and [name for name in fields if name not in options] == []


def test_pruning_options_are_checked_and_settled_when_made(mobilenet_checkpoint, capsys):
    argv = ["--pruning_ratio", "40", "--importance_type", "lamp", "--state_dict", str(mobilenet_checkpoint),
            "--workers", "1000", "--device", "auto"]
    options = options_from(PruneRun, vars(torchvision_pruning.get_args_parser().parse_args(argv)))
    assert options.device in ("cpu", "cuda") and options.prune.workers == usable_cpus()
    assert options.prune.importance_type == "LAMP" and options.prune.recipe.crop_size is None  # settled at the run
    assert capsys.readouterr().out.count("note: --workers 1000") == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.prune.pruning_ratio = 10
    assert options.flat()["pruning_ratio"] == 40 and options.flat()["state_dict"] == str(mobilenet_checkpoint)
    with pytest.raises(UserError, match="--measure_size must be at least 32"):
        options_from(PruneRun, vars(torchvision_pruning.get_args_parser().parse_args(argv + ["--measure_size", "8"])))


# --- the pruner ----------------------------------------------------------------------------------------

def test_ratio_zero_is_the_identity():
    torch.manual_seed(0)
    network = models.build(MOBILENET, 7, init="none").eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    pruner = build_pruner(network, make_importance("Magnitude", 2), ratio_fraction(0))
    prune_step(pruner, network)
    assert pruner.pruning_history() == []
    after = network.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", [MOBILENET, "lraspp_mobilenet_v3_large"])
def test_global_and_round_to_keep_the_class_count(arch):
    torch.manual_seed(0)
    network = models.build(arch, 7, init="none").train()
    dense_macs, _ = models.count_macs(network, 64)
    dense_widths = conv_widths(network)
    prune_step(build_pruner(network, make_importance("Magnitude", 2), 0.5, global_pruning=True, round_to=8),
               network)
    assert network.training, "building the pruner must not leave the model in eval mode"
    assert all(layer.out_channels == 7 for layer in models.head_layers(network))
    changed = [out for name, (_, out) in conv_widths(network).items() if out != dense_widths[name][1]]
    assert changed and all(out % 8 == 0 for out in changed)
    assert models.count_macs(network, 64)[0] < dense_macs
    assert logits(network).shape == (2, 7, 64, 64)


def test_frozen_layers_are_pruned_and_stay_frozen_after_a_step():
    """torch-pruning traces the autograd graph, which hides frozen layers: the pruner must see them anyway."""
    torch.manual_seed(0)
    network = models.build(MOBILENET, 7, init="none", keep_feature_extract=True)
    dense_macs = models.count_macs(network, 64)[0]
    prune_step(build_pruner(network, make_importance("Magnitude", 2), 0.3), network)
    assert models.count_macs(network, 64)[0] < 0.7 * dense_macs
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight",
                         "aux_classifier.4.bias"}


# --- acceptance: ResNet-101 at 50% ------------------------------------------------------------------------

def test_resnet101_half_quarter_macs_and_exact_reload(tmp_path, resnet101_checkpoint, capsys):
    path = prune(tmp_path, "--pruning_ratio", 50, "--importance_type", "Magnitude", "--p_value", 2, "--model_name",
                 "r101", "--iterative_steps", 1, "--state_dict", resnet101_checkpoint, "--save_pickle")
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "deeplabv3_resnet101" and raw["num_classes"] == 7 and raw["pruning"]
    assert raw["macs"] <= 0.26 * raw["dense_macs"]  # the ratio does not depend on the image size
    assert "-> pruned" in capsys.readouterr().out.strip().splitlines()[-1]

    pruned, metadata = load_model(path)
    dense = conv_widths(models.build("deeplabv3_resnet101", 7, init="none"))
    widths = conv_widths(pruned)
    for name in ("backbone.conv1", "backbone.layer1.0.conv1", "backbone.layer3.5.conv2", "backbone.layer4.2.conv3",
                 "classifier.0.convs.0.0", "classifier.1"):
        assert widths[name][1] == dense[name][1] // 2, name
    assert widths["classifier.4"] == (128, 7) and widths["aux_classifier.4"][1] == 7

    in_memory = torch.load(tmp_path / "pruned" / "r101_pickled.pth", weights_only=False)
    assert (logits(pruned) - logits(in_memory)).abs().max() < 1e-5


# --- iterative pruning with Taylor gradients and fine-tuning ----------------------------------------------

def test_iterative_taylor_with_finetuning_and_steps_table(tmp_path, dataset_dir, mobilenet_checkpoint, capsys):
    path = prune(tmp_path, "--pruning_ratio", 50, "--importance_type", "Taylor", "--model_name", "taylor",
                 "--iterative_steps", 2, "--state_dict", mobilenet_checkpoint, "--data", dataset_dir / "train",
                 "--val_data", dataset_dir / "val", "--step_finetune_steps", 2, "--finetune_steps", 2,
                 "--calib_batches", 1, "--batch_size", 2, "--crop_size", 64)
    steps = pd.read_csv(tmp_path / "pruned" / "taylor_steps.csv")
    assert steps["step"].tolist() == [0, 1, 2] and steps["pruning_ratio"].tolist() == [0, 25, 50]
    assert steps["macs"].is_monotonic_decreasing and steps["params"].iloc[-1] < steps["params"].iloc[0]
    assert steps["val_miou"].between(0, 1).all() and steps["val_miou_before_finetune"].iloc[1:].notna().all()
    out = capsys.readouterr().out
    assert "val mIoU" in out and "latency" not in out.splitlines()[-1]  # --latency_runs 0
    network, metadata = load_model(path)
    assert metadata["importance"] == "Taylor" and metadata["finetune_steps"] == 2 and len(metadata["steps"]) == 3
    assert metadata["args"]["batch_size"] == 2 and metadata["args"]["bn_recalibrate"] == 20
    assert all(layer.out_channels == 7 for layer in models.head_layers(network))


@pytest.mark.parametrize("train_mode", [False, True])
def test_taylor_gradients_leave_weights_and_statistics_alone(dataset_dir, train_mode):
    torch.manual_seed(0)
    network = models.build(MOBILENET, 7, init="none", keep_feature_extract=True).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images, masks, _ = collate([S2DSDataset(dataset_dir / "train", train_transform(64))[i] for i in range(2)])
    taylor_gradients(network, [(images, masks)], SegmentationLoss("ce"), torch.device("cpu"), train_mode)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is not None for p in network.parameters()) and not network.training
    assert not network.backbone["0"][0].weight.requires_grad, "frozen layers stay frozen"


def test_why_taylor_gradients_are_taken_in_eval_mode():
    """In train mode a BatchNorm after a convolution makes the loss blind to the scale of each of its output
    channels, so sum(w * dL/dw) per channel, Taylor's estimate of removing the channel, is 0."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 7, 1))
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32))
    ratios = {}
    for train_mode in (True, False):
        taylor_gradients(network, [(images, masks)], SegmentationLoss("ce"), torch.device("cpu"), train_mode)
        products = (network[0].weight * network[0].weight.grad).detach().flatten(1)
        ratios[train_mode] = float(products.sum(1).abs().mean() / products.abs().sum(1).mean())
    assert ratios[True] < 1e-4 < 1e-2 < ratios[False]


# --- saved files: format, reload, pruning further, thesis files ---------------------------------------------

def test_saved_checkpoint_reloads_exactly(pruned_mobilenet):
    raw = torch.load(pruned_mobilenet, weights_only=True)
    assert raw["format"] == "cracksense-checkpoint" and raw["importance"] == "Magnitude" and raw["p_value"] == 1
    assert raw["latency_seconds"] > 0 and raw["dense_latency_seconds"] > 0
    assert all(isinstance(entry[0], str) and isinstance(entry[1], bool) for entry in raw["pruning"])
    pruned, _ = load_model(pruned_mobilenet)
    in_memory = torch.load(str(pruned_mobilenet).replace(".pth", "_pickled.pth"), weights_only=False)
    assert (logits(pruned, size=96) - logits(in_memory, size=96)).abs().max() < 1e-5
    assert models.count_parameters(pruned) < 0.4 * models.count_parameters(models.build(MOBILENET, 7, init="none"))


def test_pruning_a_pruned_checkpoint_continues_its_history(tmp_path, pruned_mobilenet):
    path = prune(tmp_path, "--pruning_ratio", 20, "--model_name", "again", "--state_dict", pruned_mobilenet)
    first, second = torch.load(pruned_mobilenet, weights_only=True), torch.load(path, weights_only=True)
    assert second["pruning"][:len(first["pruning"])] == first["pruning"]
    assert second["params"] < first["params"]
    assert load_model(path)[1]["params"] == second["params"]


def test_thesis_files_become_pickle_free_checkpoints(tmp_path):
    """A thesis-style pruned network (8 outputs, no history), pickled or as a state_dict: --pruning_ratio 0
    gives a 7-class checkpoint with a history that rebuilds it, and the same predictions."""
    torch.manual_seed(0)
    thesis = models.build(MOBILENET, 8, init="none", aux_loss=False).eval()
    prune_step(build_pruner(thesis, make_importance("Magnitude", 2), 0.4), thesis)
    torch.save(thesis, tmp_path / "thesis_pruned.pth")
    torch.save(thesis.state_dict(), tmp_path / "thesis_pruned_weights.pth")
    with pytest.raises(UserError, match="--allow_pickle"):
        prune(tmp_path, "--pruning_ratio", 0, "--state_dict", tmp_path / "thesis_pruned.pth")
    for source, extra in (("thesis_pruned.pth", ["--allow_pickle"]), ("thesis_pruned_weights.pth", [])):
        path = prune(tmp_path, "--pruning_ratio", 0, "--state_dict", tmp_path / source, "--model_name", source, *extra)
        network, metadata = load_model(path)
        assert metadata["num_outputs"] == 7 and metadata["pruning"], source
        assert (logits(network) - logits(thesis)).abs().max() < 1e-5, source


def test_existing_output_is_kept_unless_overwrite(tmp_path, pruned_mobilenet):
    folder = os.path.dirname(os.path.dirname(pruned_mobilenet))
    stamp = os.path.getmtime(pruned_mobilenet)
    with pytest.raises(UserError, match="--overwrite"):
        prune(folder, "--pruning_ratio", 10, "--model_name", "mb", "--state_dict", pruned_mobilenet)
    assert os.path.getmtime(pruned_mobilenet) == stamp


# --- bad inputs: one line, exit status 2 --------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["--pruning_ratio", "100"], "between 0 and 99"),
    (["--pruning_ratio", "-5"], "between 0 and 99"),
    (["--pruning_ratio", "0.5"], "unit is percent"),
    (["--pruning_ratio", "50", "--p_value", "0"], "--p_value"),
    (["--pruning_ratio", "50", "--importance_type", "Entropy"], "unknown --importance_type"),
    (["--pruning_ratio", "50", "--importance_type", "Taylor"], "needs --data"),
    (["--pruning_ratio", "50", "--finetune_steps", "1"], "needs --data"),
    (["--pruning_ratio", "50", "--importance_type", "Taylor", "--data", "x", "--calib_mode", "train",
      "--batch_size", "1"], "at least 2"),
    (["--pruning_ratio", "50", "--finetune_steps", "10", "--finetune_minutes", "1"], "give one"),
    (["--pruning_ratio", "50", "--finetune_minutes", "nan"], "finite"),
    (["--pruning_ratio", "50", "--bn_recalibrate", "-1"], "at least 0"),
    (["--pruning_ratio", "50", "--distill", "1"], "acts during fine-tuning"),
    (["--pruning_ratio", "nan"], "finite"),
    (["--pruning_ratio", "50", "--arch", "deeplabv3_resnet101"], "not --arch deeplabv3_resnet101"),
])
def test_bad_values_refused(tmp_path, mobilenet_checkpoint, argv, fragment):
    with pytest.raises(UserError, match=fragment.replace("-", r"\-")):
        prune(tmp_path, *argv, "--state_dict", mobilenet_checkpoint)
    assert not (tmp_path / "pruned").exists()


def test_nothing_to_prune_and_other_class_count_refused(tmp_path, dataset_dir):
    with pytest.raises(UserError, match="--state_dict"):
        prune(tmp_path, "--pruning_ratio", 50)
    five = ClassTable(("background", "a", "b", "c", "crack"),
                      ((0, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 255, 255)))
    save_atomic(make_checkpoint(models.build(MOBILENET, 5, init="none"), MOBILENET, five), tmp_path / "five.pth")
    with pytest.raises(UserError, match="predicts 5 classes .* has 7"):  # S2DS data for a 5-class network
        prune(tmp_path, "--pruning_ratio", 50, "--state_dict", tmp_path / "five.pth", "--val_data",
              dataset_dir / "val")


def test_bad_input_as_a_user_runs_it(tmp_path, mobilenet_checkpoint):
    assert_user_error(run_script("torchvision_pruning.py", "--pruning_ratio", "50", "--importance_type", "Taylor",
                                 "--state_dict", mobilenet_checkpoint, "--output_dir", tmp_path), "--data")


# --- the rest of the pipeline takes pruned files ------------------------------------------------------------

def test_pruned_model_trains_through_train_py(tmp_path, dataset_dir, pruned_mobilenet):
    """The seed form: head only (--train_pruned_fully False), weights loaded on top of the pruned network."""
    train.main([str(dataset_dir / "train"), str(dataset_dir / "val"), "finetune", "--pruned_model",
                str(pruned_mobilenet), "--train_pruned_fully", "False", "--keep_feature_extract", "False",
                "--load_pretrained_weights", str(pruned_mobilenet), "--init", "none", "--epochs", "1",
                "--batch_size", "2", "--crop_size", "64", "--workers", "0", "--device", "cpu",
                "--output_dir", str(tmp_path)])
    best = tmp_path / "runs" / "finetune" / "best.pth"
    trained, metadata = load_model(best)
    start, _ = load_model(pruned_mobilenet)
    assert metadata["pruning"] == torch.load(pruned_mobilenet, weights_only=True)["pruning"]
    heads = {"classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight", "aux_classifier.4.bias"}
    for (name, after), before in zip(trained.state_dict().items(), start.state_dict().values()):
        assert torch.equal(after, before) != (name in heads), name


def test_pruned_model_evaluates_through_test_py(tmp_path, dataset_dir, pruned_mobilenet):
    spec = importlib.util.spec_from_file_location("cracksense_test_script_for_pruning", REPO / "test.py")
    test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test)
    common = ["--device", "cpu", "--workers", "0", "--output_dir", str(tmp_path)]
    alone = test.main([str(dataset_dir / "test"), "--weights", str(pruned_mobilenet), *common])
    seed_form = test.main([str(dataset_dir / "test"), "--weights", str(pruned_mobilenet), "--pruned_model",
                           str(pruned_mobilenet), "--use_pruned", "--name", "seed_form", *common])
    assert torch.equal(alone.confusion.matrix, seed_form.confusion.matrix)  # same network, same weights
    rows = pd.read_excel(tmp_path / "model_test_results.xlsx")
    assert rows["name"].tolist() == ["mb", "seed_form"] and rows["MACs per image (all tiles)"].nunique() == 1
    dense_macs = models.count_macs(models.build(MOBILENET, 7, init="none"), (64, 64))[0]
    assert rows.loc[0, "MACs per image (all tiles)"] < 0.5 * dense_macs
    with pytest.raises(UserError, match="without --use_pruned"):
        test.main([str(dataset_dir / "test"), "--weights", str(pruned_mobilenet), "--pruned_model",
                   str(pruned_mobilenet), "--name", "ambiguous", *common])


def test_pruned_model_runs_through_inference_py(tmp_path, dataset_dir, pruned_mobilenet):
    photo = sorted((dataset_dir / "test" / "Images").iterdir())[0]
    inference.main(["--state_dict", str(pruned_mobilenet), "--image", str(photo), "--mode", "overlay",
                    "--save_figure", "--device", "cpu", "--output_dir", str(tmp_path)])
    assert (tmp_path / "inference" / f"{photo.stem}_mb_overlay.png").is_file()


# --- pruning to a budget: per-part ratios from measured sensitivity and cost -----------------------------------

def test_greedy_plan_cuts_the_part_that_saves_most_per_miou_lost_then_bisects_to_the_budget():
    """Part a saves 0.5 per percent and costs no accuracy up to 50%, then a lot; b saves 0.3 per percent and
    costs a little: a goes to 50% first, then b, and the last cut is bisected to the whole percent that meets the
    target. The real cost here is exactly additive, so the result can be checked by hand."""
    from utils.planning import greedy_percents

    rows = [{"prefix": prefix, "pruning_ratio": percent, "cost": 100 - per_percent * percent,
             "val_miou_drop": drop(percent)}
            for prefix, per_percent, drop in (("a", 0.5, lambda p: 0.0 if p <= 50 else 0.2),
                                              ("b", 0.3, lambda p: 0.001 * p))
            for percent in range(10, 91, 10)]
    measured = []

    def measure(percents):
        measured.append(dict(percents))
        return 100 - 0.5 * percents["a"] - 0.3 * percents["b"]

    percents, cost = greedy_percents(rows, 100.0, 66.8, measure)
    assert percents == {"a": 50, "b": 28} and cost == pytest.approx(66.6)  # b at 27% would cost 66.9
    assert measured[0] == {"a": 50, "b": 30}, "measured before the estimate met the budget, or cut in another order"


def test_target_gmacs_lands_within_3_percent_at_or_below_and_the_plan_replays(tmp_path, dataset_dir,
                                                                              mobilenet_checkpoint, capsys,
                                                                              monkeypatch):
    from utils import planning

    monkeypatch.setattr(planning, "RATIO_STEP", 30)  # 30, 60, 90% per part: a third of the probes of the default 10
    dense_macs = models.count_macs(load_model(mobilenet_checkpoint)[0], 64)[0]
    target = round(0.6 * dense_macs / 1e9, 4)
    path = prune(tmp_path, "--target_gmacs", target, "--val_data", dataset_dir / "val", "--model_name", "budget",
                 "--state_dict", mobilenet_checkpoint)
    raw = torch.load(path, weights_only=True)
    assert 0.97 * target * 1e9 <= raw["macs"] <= target * 1e9, (raw["macs"], target)
    assert "pruning_ratio" not in raw and raw["target_gmacs"] == target and set(raw["part_ratios"]) == {
        "backbone", "ASPP", "head 3x3 conv"}
    plan_path = tmp_path / "pruned" / "budget_plan.json"
    plan = json.loads(plan_path.read_text())
    assert [row["pruning_ratio"] for row in plan["sensitivity"]] == [30, 60, 90] * 3 and plan["achieved"]["gmacs"] == pytest.approx(raw["macs"] / 1e9)
    assert {part: entry["pruning_ratio"] for part, entry in plan["parts"].items()} == raw["part_ratios"]
    out = capsys.readouterr().out
    assert "plan: backbone " in out and f"budget: target {target:g} GMACs" in out
    assert pd.read_csv(tmp_path / "pruned" / "budget_steps.csv")["pruning_ratio"].isna().iloc[1:].all()

    again = prune(tmp_path, "--plan", plan_path, "--model_name", "again", "--state_dict", mobilenet_checkpoint)
    assert conv_widths(load_model(again)[0]) == conv_widths(load_model(path)[0])
    assert "sensitivity" not in capsys.readouterr().out.lower()


@pytest.mark.parametrize("target, fragment", [("1000", "not below the dense network"),
                                              ("0.00001", "below what pruning reaches")])
def test_a_budget_above_dense_or_out_of_reach_is_one_line(tmp_path, dataset_dir, mobilenet_checkpoint, target,
                                                         fragment):
    result = run_script("torchvision_pruning.py", "--target_gmacs", target, "--val_data", dataset_dir / "val",
                        "--state_dict", mobilenet_checkpoint, *FAST, "--output_dir", tmp_path)
    assert_user_error(result, fragment, "--target_gmacs")
    assert not (tmp_path / "pruned" / f"deeplabv3_mobilenet_v3_large_magnitude_l2_{target}gmacs.pth").exists()


@pytest.mark.parametrize("argv, fragment", [
    ([], "say how much to prune"),
    (["--pruning_ratio", "30", "--target_gmacs", "1"], "--pruning_ratio and --target_gmacs contradict"),
    (["--target_gmacs", "1", "--target_latency_ms", "5", "--val_data", "v"], "contradict each other"),
    (["--target_gmacs", "1"], "needs --val_data"),
    (["--target_latency_ms", "-3", "--val_data", "v"], "must be positive"),
    (["--target_gmacs", "1", "--val_data", "v", "--global_pruning"], "drop --global_pruning"),
])
def test_how_much_to_prune_is_said_exactly_once(tmp_path, mobilenet_checkpoint, argv, fragment):
    with pytest.raises(UserError, match=fragment.replace("-", r"\-")):
        prune(tmp_path, *argv, "--state_dict", mobilenet_checkpoint)


def test_a_plan_that_is_not_one_or_for_another_network_is_refused(tmp_path, mobilenet_checkpoint):
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "cracksense-pruning-plan", "arch": "deeplabv3_resnet101",
                                                     "parts": {}}))
    for name, fragment in (("text.json", "is not a pruning plan"), ("other.json", "deeplabv3_resnet101 network"),
                           ("missing.json", "missing.json")):
        with pytest.raises(UserError, match=fragment):
            prune(tmp_path, "--plan", tmp_path / name, "--state_dict", mobilenet_checkpoint)
