"""The tables that choose by name (losses, importance criteria, optimisers, architectures): every entry is complete and
works, an unknown name is one line, and nothing outside a table asks for a name."""
import ast
import re

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import REPO
from utils import model as models
from utils.cli import UserError
from utils.data import IGNORE_INDEX
from utils.losses import LOSSES, SegmentationLoss, loss_spec, soft_dice_loss
from utils.prune_ops import IMPORTANCES, build_pruner, importance_spec, make_importance, prune_step, taylor_gradients
from utils.recipe import OPTIMIZERS, Recipe, build_optimizer


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_what_its_entry_says_it_is_made_of(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0, :4] = IGNORE_INDEX
    weights = torch.tensor([0.5, 1.0, 2.0])
    spec = LOSSES[name]
    expected = 0.0
    if spec.cross_entropy:
        expected = F.cross_entropy(logits, target, weight=weights if spec.class_weighted else None,
                                   ignore_index=IGNORE_INDEX)
    if spec.dice:
        expected = expected + soft_dice_loss(logits, target)
    loss = SegmentationLoss(name, weights)(logits, target)
    torch.testing.assert_close(loss, torch.as_tensor(expected))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(IMPORTANCES))
def test_every_criterion_prunes_one_step_with_what_it_needs(name, dataset_dir):
    torch.manual_seed(0)
    network = models.build("lraspp_mobilenet_v3_large", 7, init="none").eval()
    before = models.count_parameters(network)
    spec = importance_spec(name)
    gradients = None
    if spec.needs_gradients:
        batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32)))
        gradients = lambda: taylor_gradients(network, [batch], SegmentationLoss("ce"), "cpu")  # noqa: E731
    prune_step(build_pruner(network, make_importance(name, 2, seed=1), 0.3), network, gradients)
    assert models.count_parameters(network) < before
    assert network(torch.randn(1, 3, 32, 32))["out"].shape == (1, 7, 32, 32)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimiser_steps(name):
    layer = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(layer, Recipe(optimizer=name, lr=0.1))
    layer(torch.ones(1, 2)).sum().backward()
    before = layer.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, layer.weight)


def test_unknown_names_are_one_line_errors_not_a_default():
    with pytest.raises(UserError, match="unknown --importance_type 'Entropy'"):
        make_importance("Entropy")
    with pytest.raises(UserError, match="unknown --loss 'lovasz'"):
        loss_spec("lovasz")
    with pytest.raises(UserError, match="unknown --arch 'unet'"):
        models.build("unet", 7, init="none")
    assert importance_spec("taylor").needs_gradients and not importance_spec("Random").uses_p_value


def test_every_table_entry_is_described_in_the_help():
    text = " ".join(train.get_args_parser().format_help().split())
    assert all(name in text for name in LOSSES) and all(name in text for name in models.ARCHS)
    import torchvision_pruning

    help_text = " ".join(torchvision_pruning.get_args_parser().format_help().split())
    assert all(name in help_text for name in IMPORTANCES)


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_every_architecture_entry_names_real_modules(arch):
    """The entry's heads, parts and ASPP are modules of the network it builds, the heads produce the classes, and a
    plain state_dict of it is recognised as it."""
    from utils.checkpoint import infer_arch

    entry = models.ARCHS[arch]
    network = models.build(arch, 5, init="none")
    modules = dict(network.named_modules())
    assert [layer.out_channels for layer in models.head_layers(network)] == [5] * (1 + entry.aux) if entry.aux \
        else all(layer.out_channels == 5 for layer in models.head_layers(network))
    assert all(prefix in modules for _, prefix in entry.parts)
    assert entry.aspp is None or entry.aspp in modules
    assert infer_arch(network.state_dict()) == arch
    assert (models.output_stride(network) == 8) == bool(entry.strides)


def test_no_behaviour_outside_a_table_hangs_on_a_criterion_loss_or_arch_name():
    """The names of table entries are compared nowhere in utils/ or the scripts except in the tables themselves."""
    names = set(LOSSES) | set(IMPORTANCES) | set(models.ARCHS) | {"dice", "taylor", "lraspp", "deeplabv3_resnet"}
    found = []
    for path in [*REPO.glob("*.py"), *(REPO / "utils").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for constant in [node.left, *node.comparators]:
                    if isinstance(constant, ast.Constant) and isinstance(constant.value, str) and \
                            constant.value.lower() in {name.lower() for name in names}:
                        found.append(f"{path.name}:{node.lineno} compares {constant.value!r}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith" and node.args and \
                    isinstance(node.args[0], ast.Constant) and re.match(r"(deeplab|lraspp|fcn)", str(node.args[0].value)):
                found.append(f"{path.name}:{node.lineno} tests a name prefix {node.args[0].value!r}")
    assert found == []
