"""One recipe: every field of utils.recipe.Recipe is an option of every script that trains, reaches the options each
run reads (train.py's run, pruning's fine-tuning, every study arm) and the settings a study records; every flag of
those scripts is taken by an options field; a value that makes no sense is one line."""
import dataclasses
import math
import typing

import pytest

import study
import torchvision_pruning
import train
from conftest import assert_user_error, run_script
from utils.cli import UserError, options_from
from utils.prune_run import PruneRun, settled_tuning
from utils.recipe import Recipe, recipe_fields
from utils.study import StudyOptions, study_settings
from utils.study.grid import Variant
from utils.study.settings import prune_options
from utils.training import TrainOptions

SCRIPT_ONLY = {"help", "config", "quiet"}  # parser conveniences that shape no run


def changed(field):
    """(argv words, the value the Recipe then holds) for a value of `field` that is not its default."""
    kwargs, default = field.metadata["argparse"], field.default
    if "choices" in kwargs:
        choice = next(choice for choice in kwargs["choices"] if choice != default)
        return [choice], choice
    if kwargs.get("nargs") == 2:
        return ["0.75", "1.5"], (0.75, 1.5)
    if field.name == "amp":
        return ["False"], False
    if isinstance(default, bool):
        return [str(not default)], not default
    if kwargs.get("type") is int:
        return [str(default + 2)], default + 2
    value = 0.5 if default in (None, 0.0) else default * 0.5
    return [repr(value)], value


def recipe_argv():
    argv, expected = [], {}
    for field in recipe_fields():
        words, value = changed(field)
        argv += [f"--{field.name}", *words]
        expected[field.name] = value
    return argv, expected


def recipe_values(recipe):
    return {field.name: getattr(recipe, field.name) for field in recipe_fields()}


def test_every_recipe_field_reaches_train_pruning_fine_tuning_and_every_study_arm(mobilenet_checkpoint, dataset_dir):
    argv, expected = recipe_argv()
    assert len(expected) >= 13 and {"lr", "loss", "skeleton_recall", "distill", "cat_max_ratio"} <= set(expected)

    trained = train.train_options(train.get_args_parser().parse_args(["a", "b", "run", *argv]))
    assert recipe_values(trained.recipe) == expected
    assert recipe_values(trained.settled().recipe) == expected  # not replaced by defaults
    assert {key: trained.settled().flat()[key] for key in expected} == expected  # saved in args.json

    common = ["--state_dict", str(mobilenet_checkpoint), "--data", str(dataset_dir / "train"), "--val_data",
              str(dataset_dir / "val"), "--finetune_steps", "4", *argv]
    pruning = options_from(PruneRun, vars(torchvision_pruning.get_args_parser().parse_args(
        ["--pruning_ratio", "30", *common])))
    assert recipe_values(settled_tuning(pruning.prune, {"lr": 9.0, "loss": "ce"}).recipe) == expected

    studied = options_from(StudyOptions, vars(study.get_args_parser().parse_args(
        ["--pruning_ratio", "30", "--test_data", str(dataset_dir / "test"), "--name", "walk", *common])))
    studied = studied.settled({"lr": 9.0})
    for variant in (None, Variant("Magnitude", 2, 30.0, 1)):
        assert recipe_values(prune_options(studied, variant, 1).recipe) == expected
    recorded = study_settings(studied)["recipe"]
    assert {key: tuple(value) if isinstance(value, list) else value for key, value in recorded.items()} == expected


def test_recipe_fields_not_given_settle_on_the_training_run_then_the_defaults():
    given = Recipe(**{field.name: None for field in recipe_fields()})
    settled = dataclasses.replace(given, lr=0.2).settled({"lr": 0.5, "loss": "dice", "scale_range": [1.0, 1.0]})
    assert (settled.lr, settled.loss, settled.scale_range, settled.optimizer) == (0.2, "dice", (1.0, 1.0), "sgd")
    assert settled == settled.settled({"lr": 7.0})


def _fields(spec):
    hints = typing.get_type_hints(spec)
    for field in dataclasses.fields(spec):
        yield from (_fields(hints[field.name]) if dataclasses.is_dataclass(hints[field.name]) else [field.name])


@pytest.mark.parametrize("script, spec", [(train, TrainOptions), (torchvision_pruning, PruneRun),
                                          (study, StudyOptions)])
def test_every_flag_is_taken_by_an_options_field(script, spec):
    """options_from fills fields by option name and drops what no field takes: such a flag would be accepted and do
    nothing, so every flag of a script must be a field of its options."""
    flags = {action.dest for action in script.get_args_parser()._actions} - SCRIPT_ONLY
    assert sorted(flags - set(_fields(spec))) == []


@pytest.mark.parametrize("name, value, fragment", [
    ("lr", math.nan, "finite"), ("lr", 0.0, "more than 0"), ("lr", math.inf, "finite"),
    ("skeleton_recall", -1.0, "at least 0"), ("weight_decay", -0.1, "at least 0"), ("distill", math.nan, "finite"),
    ("distill_temperature", 0.0, "more than 0"), ("batch_size", 1, "at least 2"), ("crop_size", 4, "at least 8"),
    ("cat_max_ratio", 1.5, "at most 1"), ("scale_range", (2.0, 1.0), "LOW <= HIGH"),
    ("scale_range", (math.nan, 1.0), "finite"), ("optimizer", "lbfgs", "unknown --optimizer"),
    ("loss", "lovasz", "unknown --loss"),
])
def test_a_recipe_value_that_makes_no_sense_is_refused(name, value, fragment):
    with pytest.raises(UserError, match=fragment):
        Recipe(**{name: value})


@pytest.mark.parametrize("argv, fragment", [
    (["--max_minutes", "nan"], "--max_minutes must be a finite number"),
    (["--max_minutes", "inf"], "--max_minutes must be a finite number"),
    (["--max_minutes", "-1"], "--max_minutes must be more than 0"),
    (["--skeleton_recall", "-1"], "--skeleton_recall must be at least 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--patience", "-2"], "--patience must be at least 0"),
    (["--distill", "1"], "--distill needs --teacher"),
])
def test_train_refuses_nonsense_values_in_one_line(dataset_dir, tmp_path, argv, fragment):
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "bad", "--arch",
                        "lraspp_mobilenet_v3_large", "--init", "none", "--epochs", "1", "--batch_size", "2",
                        "--crop_size", "32", "--workers", "0", "--output_dir", tmp_path, *argv)
    assert_user_error(result, fragment)


def test_training_batches_do_not_depend_on_the_number_of_loading_workers(dataset_dir):
    """Each sample's augmentation follows the seed the loader drew for it, not the worker that made it: the same
    seed gives the same batches with 0, 1 or 2 workers (so a torchrun process's share of CPUs changes no run), another
    seed other batches, and loading leaves the caller's own random streams where they were."""
    import random

    import torch

    from utils import data
    from utils.distributed import DistContext
    from utils.recipe import train_loader

    train_set = data.training_set(dataset_dir / "train", 48)

    def batches(workers, seed=5):
        loader = iter(train_loader(train_set, 2, workers, seed, DistContext()))
        return [next(loader) for _ in range(3)]

    random.seed(0)
    torch.manual_seed(0)
    untouched = (random.random(), torch.rand(2))
    random.seed(0)
    torch.manual_seed(0)
    reference = batches(0)
    assert random.random() == untouched[0] and torch.equal(torch.rand(2), untouched[1])
    for workers in (1, 2):
        for (images, masks, indices), (want_images, want_masks, want_indices) in zip(batches(workers), reference):
            assert torch.equal(indices, want_indices) and torch.equal(images, want_images)
            assert torch.equal(masks, want_masks)
    assert not all(torch.equal(got[0], want[0]) for got, want in zip(batches(0, seed=6), reference))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_validation_pass_leaves_the_global_random_stream_alone(dataset_dir, workers):
    """Scoring draws nothing from torch's global generator, first pass or later: the dropout of the training that
    follows does not depend on whether this process validated before."""
    import torch

    from utils import data
    from utils.distributed import DistContext
    from utils.recipe import eval_loader

    loader = eval_loader(data.S2DSDataset(dataset_dir / "val", data.EvalTransform()), 1, workers, DistContext())
    torch.manual_seed(7)
    untouched = torch.rand(2)
    for _ in range(2):
        torch.manual_seed(7)
        for _batch in loader:
            pass
        assert torch.equal(torch.rand(2), untouched)
