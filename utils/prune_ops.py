"""Pruning primitives (torch-pruning): importance criteria, the pruner, one pruning step, Taylor
gradients, and the pruning history that rebuilds a pruned network without pickles.

Middle floor (docs/ARCHITECTURE.md): used by the checkpoint reader (replay) and by the pruning and
study runs above it. torch-pruning builds its dependency graph from the autograd graph, which does not
show frozen parameters, so every graph here is built with the whole network trainable.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp

from utils.cli import UserError, percent_or_fraction_hint
from utils.model import architecture, eval_mode, head_layers

EXAMPLE_SIZE = 64


def example_inputs(model, size=EXAMPLE_SIZE):
    """A small input for tracing on the model's device: the dependency graph does not depend on the size."""
    return torch.randn(1, 3, size, size, device=next(model.parameters()).device)


def trainable_flags(model):
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


@contextmanager
def fully_traced(model):
    """Eval mode (a batch of 1 cannot pass the ASPP pooling BatchNorm in train mode) and every parameter
    trainable while torch-pruning traces; afterwards the mode and the frozen/trainable flags by name are put
    back (pruning replaces Parameters, so flags are restored by name, new ones trainable)."""
    flags = trainable_flags(model)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    try:
        with eval_mode(model):
            yield model
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, True))


def dependency_graph(model):
    """torch-pruning's DependencyGraph of the whole network, frozen layers included."""
    with fully_traced(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(model), verbose=False)


def replay_pruning_history(model, history):
    """Rebuild a pruned network: trace the dense model, then redo each recorded channel removal, each entry
    checked first (a real layer, indices within its channels now), so a damaged history is one line."""
    graph = dependency_graph(model)
    modules = dict(model.named_modules())
    with fully_traced(model):
        for position, (name, out, indices) in enumerate(history):
            module = modules.get(name)
            pruner = graph.get_pruner_of_module(module) if module is not None else None
            if pruner is None:
                raise UserError(f"pruning history entry {position} names {name!r}, which is no prunable layer "
                                f"of this network (damaged or edited checkpoint)")
            channels = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
            if len(set(indices)) != len(indices) or not all(0 <= i < channels for i in indices) \
                    or len(indices) >= channels:
                raise UserError(f"pruning history entry {position} ({name}) removes channels {_brief(indices)} "
                                f"of {channels}: out of range, repeated or all of them (damaged or edited "
                                f"checkpoint)")
            graph.load_pruning_history([(name, bool(out), list(indices))])
    return model


def _brief(indices):
    indices = list(indices)
    return str(indices) if len(indices) <= 6 else f"[{', '.join(map(str, indices[:6]))}, ...]"


def json_history(history):
    """torch-pruning's history as plain lists of str/bool/int, so torch.load(weights_only=True) reads it."""
    return [[str(name), bool(out), [int(i) for i in idx]] for name, out, idx in history]


class SeededRandomImportance(tp.importance.RandomImportance):
    """torch-pruning's random criterion drawing from a generator of its own: the same seed removes the same channels,
    whatever else drew from torch's global generator before (data loading, tracing inputs)."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        _, indices = group[0]
        return torch.rand(len(indices), generator=self.generator)


@dataclass(frozen=True)
class ImportanceSpec:
    """What an --importance_type is: its builder over (p_value, seed), whether it ranks by gradients of the loss
    on training batches (then it needs --data), whether --p_value is its norm, its --help text, and whether it is
    the control the others have to beat (it ranks nothing)."""
    build: object
    needs_gradients: bool
    uses_p_value: bool
    help: str
    control: bool = False


# --importance_type's choices: the seed's two, torch-pruning's criteria that need nothing but the weights, and Random,
# the control every criterion has to beat at the same ratio to be worth its cost.
IMPORTANCES = {
    "Magnitude": ImportanceSpec(lambda p, seed: tp.importance.GroupMagnitudeImportance(p=p), False, True,
                                "the channel's weight norm (L1 or L2 by --p_value)"),
    "Taylor": ImportanceSpec(lambda p, seed: tp.importance.GroupTaylorImportance(), True, False,
                             "first-order Taylor estimate of the loss change, from gradients of the real loss on --data"),
    "LAMP": ImportanceSpec(lambda p, seed: tp.importance.LAMPImportance(p=p), False, True,
                           "layer-adaptive magnitude"),
    "BNScale": ImportanceSpec(lambda p, seed: tp.importance.BNScaleImportance(), False, False,
                              "the BatchNorm scale of the channel"),
    "FPGM": ImportanceSpec(lambda p, seed: tp.importance.FPGMImportance(p=p), False, True,
                           "distance to the geometric median of the layer's filters"),
    "Random": ImportanceSpec(lambda p, seed: SeededRandomImportance(seed), False, False,
                             "channels drawn at random by the seed: the control a criterion has to beat", control=True),
}


def importance_name(name):
    """The canonical spelling of an --importance_type (any case accepted); an unknown name is one line."""
    by_lower = {choice.lower(): choice for choice in IMPORTANCES}
    if str(name).lower() not in by_lower:
        raise UserError(f"unknown --importance_type {name!r}; choose one of {', '.join(IMPORTANCES)}")
    return by_lower[str(name).lower()]


def importance_spec(name):
    return IMPORTANCES[importance_name(name)]


def importances_help():
    return "; ".join(f"{name}: {spec.help}" for name, spec in IMPORTANCES.items())


def make_importance(name, p_value=2, seed=0):
    """A torch-pruning importance criterion from IMPORTANCES; p_value is the norm of the magnitude-based ones
    (1 = L1, 2 = L2), seed the generator of Random's scores."""
    spec = importance_spec(name)
    if isinstance(p_value, bool) or not isinstance(p_value, int) or p_value < 1:
        raise UserError(f"--p_value must be a positive integer (1 = L1, 2 = L2), got {p_value}")
    return spec.build(p_value, seed)


def ratio_fraction(percent):
    """--pruning_ratio (percent of channels removed, 0 to 99) as torch-pruning's fraction."""
    if not 0 <= percent <= 99:
        raise UserError(f"--pruning_ratio must be between 0 and 99 (percent of channels removed), got {percent:g}")
    if 0 < percent < 1:
        raise UserError(f"--pruning_ratio {percent_or_fraction_hint(percent)}; use 0 to prune nothing")
    return percent / 100


def build_pruner(model, importance, ratio, iterative_steps=1, global_pruning=False, round_to=None,
                 ignored_layers=None):
    """A torch-pruning pruner over the whole network (frozen layers too) that never touches the
    class-producing convolutions, nor any of `ignored_layers`. `ratio` is the fraction removed from every layer,
    or {module-name prefix: fraction} per part (torch-pruning's pruning_ratio_dict; layers in no part stay whole)."""
    per_part = isinstance(ratio, dict)
    with fully_traced(model):
        return tp.pruner.BasePruner(
            model, example_inputs(model), importance, pruning_ratio=0.0 if per_part else ratio,
            pruning_ratio_dict={model.get_submodule(prefix): part for prefix, part in ratio.items()} if per_part
            else None, iterative_steps=iterative_steps, ignored_layers=head_layers(model) + list(ignored_layers or ()),
            global_pruning=global_pruning, round_to=round_to if round_to and round_to > 1 else None)


def prune_step(pruner, model, compute_gradients=None):
    """One pruner step (Taylor's gradients computed first), with gradients cleared and flags put back."""
    if compute_gradients is not None:
        compute_gradients()
    with fully_traced(model):
        pruner.step()
    model.zero_grad(set_to_none=True)


@contextmanager
def _buffers_restored(model):
    """Batch statistics without side effects: BatchNorm running statistics are put back afterwards."""
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


def taylor_gradients(model, batches, criterion, device, train_mode=False):
    """Accumulate gradients of the real segmentation loss over `batches` for Taylor importance.

    Eval mode (default) keeps BatchNorm on its running statistics, as deployed. In train mode a
    BatchNorm after a convolution makes the loss blind to the scale of that convolution's channels, so
    per channel sum(w * dL/dw) is exactly 0 and the ranking loses its signal (batch >= 2 needed there).
    Every parameter gets a gradient (frozen ones included, so the whole network is ranked); weights,
    BatchNorm statistics, the mode and trainable flags are left as they were.
    """
    model.zero_grad(set_to_none=True)
    with fully_traced(model), eval_mode(model, training=train_mode), _buffers_restored(model), \
            torch.enable_grad():
        for images, masks in batches:
            loss = criterion(model(images.to(device)), masks.to(device)) / len(batches)
            loss.backward()


def slice_extra_outputs(model, state_dict, num_classes):
    """Drop the thesis' 8th "boundary" output from the head weights so the pruned file is a plain 7-class one
    (forward_logits drops that channel at prediction anyway)."""
    names = {id(module): name for name, module in model.named_modules()}
    state_dict = dict(state_dict)
    for layer in head_layers(model):
        for suffix in ("weight", "bias"):
            key = f"{names[id(layer)]}.{suffix}"
            if key in state_dict and state_dict[key].shape[0] > num_classes:
                state_dict[key] = state_dict[key][:num_classes]
    return state_dict


def match_pruned_widths(model, state_dict):
    """Prune a dense network down to the channel counts of a pruned state_dict that has no history
    (a thesis pickle or its state_dict); returns the history that rebuilds those widths.

    Which channels go does not matter: the file's weights are loaded afterwards.
    """
    graph = dependency_graph(model)
    with fully_traced(model):
        for name, module in model.named_modules():
            weight = state_dict.get(f"{name}.weight")
            if isinstance(module, torch.nn.Conv2d) and weight is not None and weight.shape[0] < module.out_channels:
                surplus = list(range(weight.shape[0], module.out_channels))
                graph.get_pruning_group(module, tp.prune_conv_out_channels, surplus).prune()
    return json_history(graph.pruning_history())


def shapes_differ(model, state_dict):
    own = model.state_dict()
    return any(key in own and own[key].shape != value.shape for key, value in state_dict.items())


def network_parts(model):
    """{part: module-name prefix}: the units of the sensitivity and of a per-part pruning plan, as the network's
    ARCHS entry lists them (each ResNet stage, then DeepLabV3's ASPP and head 3x3 conv, LR-ASPP's head, FCN's head)."""
    return dict(architecture(model).parts)


def layers_outside(model, prefix):
    """Every convolution outside `prefix`: ignored by the pruner so only that part loses channels."""
    return [module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Conv2d) and not (name == prefix or name.startswith(prefix + "."))]
