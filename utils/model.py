"""Model builders (DeepLabV3-ResNet101 first, plus embedded baselines) and whole-image prediction.

Every script gets its network and its logits from here, so the dict output, the thesis' extra
8th channel and the resizing back to the label's resolution are handled in one place.
"""
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights
from torchvision.models import segmentation as seg

from utils.cli import UserError

OUTPUT_STRIDES = (8, 16)
# ASPP rates per output stride, as in the DeepLabV3 paper: the same field of view in input pixels.
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
RESNET_STAGES = tuple((f"backbone layer{index}", f"backbone.layer{index}") for index in range(1, 5))


@dataclass(frozen=True)
class Architecture:
    """One network's facts, kept here and nowhere else: its torchvision builder and pretrained weights, whether it
    has an auxiliary head, its class-producing convolutions (`heads`: replaced for a new class count, never pruned;
    module names), its parts (part name -> module-name prefix: the units of --sensitivity and of per-part plans), the
    output strides it can run at (a dilated ResNet backbone: 8 or 16; () for a fixed one) and the module whose
    atrous rates follow the stride (None: none), and how a plain state_dict of it is recognised (`signature`: a key
    prefix of its head, one of its backbone, and its ResNet layer3 block count or None)."""
    builder: Callable
    coco_weights: object
    backbone_weights: object
    aux: bool
    heads: tuple
    parts: tuple
    strides: tuple = ()
    aspp: str | None = None
    signature: tuple = ()


DEEPLAB_HEADS = ("classifier.4", "aux_classifier.4")
DEEPLAB_PARTS = (("ASPP", "classifier.0"), ("head 3x3 conv", "classifier.1"))
ARCHS = {
    "deeplabv3_resnet101": Architecture(
        seg.deeplabv3_resnet101, seg.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
        ResNet101_Weights.IMAGENET1K_V1, True, DEEPLAB_HEADS, RESNET_STAGES + DEEPLAB_PARTS, OUTPUT_STRIDES,
        "classifier.0", ("classifier.0.convs.", "backbone.layer3.", 23)),
    "deeplabv3_resnet50": Architecture(
        seg.deeplabv3_resnet50, seg.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
        ResNet50_Weights.IMAGENET1K_V1, True, DEEPLAB_HEADS, RESNET_STAGES + DEEPLAB_PARTS, OUTPUT_STRIDES,
        "classifier.0", ("classifier.0.convs.", "backbone.layer3.", 6)),
    "deeplabv3_mobilenet_v3_large": Architecture(
        seg.deeplabv3_mobilenet_v3_large, seg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
        MobileNet_V3_Large_Weights.IMAGENET1K_V1, True, DEEPLAB_HEADS, (("backbone", "backbone"),) + DEEPLAB_PARTS,
        signature=("classifier.0.convs.", "backbone.0.", None)),
    "lraspp_mobilenet_v3_large": Architecture(
        seg.lraspp_mobilenet_v3_large, seg.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
        MobileNet_V3_Large_Weights.IMAGENET1K_V1, False, ("classifier.low_classifier", "classifier.high_classifier"),
        (("backbone", "backbone"), ("LR-ASPP head", "classifier")), signature=("classifier.cbr.", "backbone.0.", None)),
    "fcn_resnet50": Architecture(
        seg.fcn_resnet50, seg.FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1, ResNet50_Weights.IMAGENET1K_V1, True,
        DEEPLAB_HEADS, RESNET_STAGES + (("FCN head 3x3 conv", "classifier.0"),), OUTPUT_STRIDES,
        signature=("classifier.0.weight", "backbone.layer3.", 6)),
    "fcn_resnet101": Architecture(
        seg.fcn_resnet101, seg.FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1, ResNet101_Weights.IMAGENET1K_V1, True,
        DEEPLAB_HEADS, RESNET_STAGES + (("FCN head 3x3 conv", "classifier.0"),), OUTPUT_STRIDES,
        signature=("classifier.0.weight", "backbone.layer3.", 23)),
}
DEFAULT_ARCH = "deeplabv3_resnet101"
INITS = ("coco", "imagenet", "none")


def architecture(arch):
    """ARCHS' entry of `arch` (a name, or a network that build() made and tagged); an unknown name is one line."""
    name = arch if isinstance(arch, str) else getattr(arch, "cracksense_arch", None)
    if name not in ARCHS:
        raise UserError(f"unknown --arch {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def tag(model, arch):
    """Record which ARCHS entry `model` is (a plain attribute: copies keep it, state_dicts do not carry it)."""
    architecture(arch)
    model.cracksense_arch = arch
    return model


@contextmanager
def eval_mode(model, training=False):
    """Run a block with the network in eval mode (or train mode with training=True), then put back the mode
    it had: tracing, timing and counting must not change what the caller's next step sees."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def has_aux(arch):
    return architecture(arch).aux


def head_layers(model):
    """The class-producing convolutions (ARCHS' `heads` present in this network): replaced on a new class count,
    never pruned, trained when frozen."""
    modules = dict(model.named_modules())
    return [modules[name] for name in architecture(model).heads if name in modules]


def _replace_head(model, num_classes):
    for name in architecture(model).heads:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        conv = getattr(holder, child, None) if holder is not None else None
        if isinstance(conv, nn.Conv2d):
            setattr(holder, child, nn.Conv2d(conv.in_channels, num_classes, kernel_size=1))


def _download_hint(weights, error):
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(weights.url)
    return (f"could not get pretrained weights {filename} ({type(error).__name__}; offline?): put the file in "
            f"{hub} (set TORCH_HOME to use another folder) or train from scratch with --init none")


def has_output_stride(arch):
    """Whether the network chooses its output stride (a dilated ResNet backbone; the MobileNet ones are fixed)."""
    return bool(architecture(arch).strides)


def output_stride(model):
    """8 or 16 for a network whose output stride can be chosen (read off its layer3: strided at 16, dilated at 8),
    None otherwise."""
    if not has_output_stride(model):
        return None
    return 16 if model.backbone.layer3[0].conv2.stride == (2, 2) else 8


def check_stride(arch, stride):
    """`arch`'s ARCHS entry, when it can run at output stride `stride`; one line otherwise."""
    entry = architecture(arch)
    if not entry.strides:
        raise UserError(f"--output_stride applies to the networks with a dilated ResNet backbone "
                        f"({', '.join(name for name, other in ARCHS.items() if other.strides)}), not {arch}")
    if stride not in entry.strides:
        raise UserError(f"--output_stride must be one of {', '.join(map(str, entry.strides))}, got {stride}")
    return entry


def add_output_stride_option(group):
    """--output_stride for the scripts that load a trained network (one help text): an override of the stride
    its checkpoint records."""
    group.add_argument("--output_stride", type=int, choices=OUTPUT_STRIDES, default=None,
                       help="run a network with a dilated ResNet backbone at this output stride instead of the one "
                            "its checkpoint records (8 when it records none)")


def _set_block(block, stride, dilation, first_dilation):
    block.conv2.stride = (stride, stride)
    block.conv2.dilation = block.conv2.padding = (first_dilation, first_dilation)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


@torch.no_grad()
def set_output_stride(model, stride):
    """Rebuild a dilated ResNet backbone's pattern in place for output stride 8 (layer3 and layer4 dilated 2 and 4)
    or 16 (layer4 dilated 2), with the ASPP rates of that stride where the network has an ASPP. The weights are the
    same shapes at either stride, so a checkpoint (dense or pruned) loads at both; returns the model."""
    entry = check_stride(model.cracksense_arch, stride)
    backbone = model.backbone
    plan = {8: ((1, 1, 2), (1, 2, 4)), 16: ((2, 1, 1), (1, 1, 2))}[stride]  # (stride, first, rest) per layer
    for layer, (layer_stride, first, rest) in zip((backbone.layer3, backbone.layer4), plan):
        _set_block(layer[0], layer_stride, first, first)
        for block in list(layer)[1:]:
            _set_block(block, 1, rest, rest)
    if entry.aspp is not None:
        for rate, branch in zip(ASPP_RATES[stride], list(model.get_submodule(entry.aspp).convs)[1:4]):
            branch[0].dilation = branch[0].padding = (rate, rate)
    return model


def build(arch=DEFAULT_ARCH, num_classes=7, init="coco", aux_loss=True, keep_feature_extract=False,
          stride=None):
    """A segmentation network with `num_classes` outputs.

    init: coco (torchvision's COCO-with-VOC-labels weights, head replaced), imagenet (backbone only)
    or none. keep_feature_extract freezes everything but the new head. stride: the output stride of a network
    with a dilated ResNet backbone (None: torchvision's 8).
    """
    entry = architecture(arch)
    if init not in INITS:
        raise UserError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    if stride is not None:
        check_stride(arch, stride)
    builder, coco_weights, backbone_weights = entry.builder, entry.coco_weights, entry.backbone_weights
    aux = bool(aux_loss) and entry.aux
    try:
        if init == "coco":
            model = tag(builder(weights=coco_weights, aux_loss=True if aux else None), arch)
            _replace_head(model, num_classes)
            if not aux and getattr(model, "aux_classifier", None) is not None:
                model.aux_classifier = None
        elif init == "imagenet":
            model = builder(weights=None, weights_backbone=backbone_weights, num_classes=num_classes,
                            aux_loss=aux if entry.aux else None)
        else:
            model = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                            aux_loss=aux if entry.aux else None)
    except (OSError, RuntimeError, ValueError) as error:
        if init == "none":
            raise
        raise UserError(_download_hint(coco_weights if init == "coco" else backbone_weights, error)) from None
    tag(model, arch)
    if stride is not None:
        set_output_stride(model, stride)
    if keep_feature_extract:
        freeze_all_but_head(model)
    return model


def freeze_all_but_head(model):
    """Feature extraction: only the class-producing convolutions keep requires_grad."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in head_layers(model):
        for parameter in layer.parameters():
            parameter.requires_grad_(True)


def strip_aux_head(model):
    """Drop the auxiliary training head: torchvision still computes it in eval mode, wasting time at test."""
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    return model


def _conv_bn_pairs(module):
    """(conv name, batchnorm name) pairs of one module's children: neighbours in a Sequential (torchvision's
    Conv2dNormActivation, ASPP, heads), convN/bnN siblings elsewhere (ResNet's stem and Bottleneck)."""
    children = dict(module.named_children())
    names = list(children)
    if isinstance(module, nn.Sequential):
        candidates = zip(names, names[1:])
    else:
        candidates = ((f"conv{name[2:]}", name) for name in names if name.startswith("bn"))
    return [(conv, bn) for conv, bn in candidates
            if isinstance(children.get(conv), nn.Conv2d) and isinstance(children.get(bn), nn.BatchNorm2d)]


@torch.no_grad()
def fold_batchnorm(model):
    """Fold every BatchNorm2d into the convolution before it, in place (the BatchNorm becomes Identity):
    the same outputs (float rounding) for less work at deployment. Eval mode only: a folded network has no
    batch statistics left to train, so a network in train mode is refused."""
    if model.training:
        raise RuntimeError("fold_batchnorm is for deployed networks; call it on a network in eval mode")
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def forward_logits(model, images, num_classes, size=None):
    """Main-head logits (thesis' extra channels dropped), resized bilinearly to `size` if given."""
    output = model(images)
    logits = output["out"] if isinstance(output, dict) else output
    logits = logits[:, :num_classes]
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def default_stride(tile):
    """Tiles overlap by an eighth of their side: with windows fitted to the photo (tile_windows) a photo
    costs at most (1 + 1/7)² ≈ 1.31x its pixels, where half-tile strides cost about 3.4x."""
    return tile - tile // 8


def tile_windows(length, tile, stride):
    """(starts, side) along one axis: the fewest windows of one side <= `tile` that cover `length` with
    starts at most `stride` apart, spread evenly and shrunk to fit instead of running past the edge."""
    if length <= tile:
        return [0], length
    count = math.ceil((length - tile) / stride) + 1
    side = math.ceil((length + (count - 1) * (tile - stride)) / count)
    return [round(index * (length - side) / (count - 1)) for index in range(count)], side


def tile_cost(height, width, tile, stride=None):
    """(number of windows, pixels the network sees / pixels of the photo) of tiled prediction."""
    (tops, tile_h), (lefts, tile_w) = (tile_windows(length, tile, stride or default_stride(tile))
                                       for length in (height, width))
    return len(tops) * len(lefts), len(tops) * len(lefts) * tile_h * tile_w / (height * width)


def _blend_weights(height, width, device):
    """A tent window (never zero) so overlapping tiles fade into each other instead of seaming."""
    def ramp(length):
        up = torch.minimum(torch.arange(length, device=device) + 1.0, torch.arange(length, 0, -1, device=device))
        return up / up.max()
    return torch.outer(ramp(height), ramp(width)).clamp_min(1e-3)


@dataclass(frozen=True)
class Tiling:
    """How a large image is cut for the network: windows of at most `tile` px (None: the whole image at once),
    starts at most `stride` apart (None: default_stride), `tile_batch` windows per forward. Checked when made."""
    tile: int | None = None
    stride: int | None = None
    tile_batch: int = 1

    def __post_init__(self):
        if self.tile is not None and self.tile < 32:
            raise UserError(f"--tile must be at least 32 px, got {self.tile}")
        if self.stride is not None and (self.tile is None or not 0 < self.stride <= self.tile):
            raise UserError(f"--stride must be between 1 and --tile ({self.tile}), got {self.stride}")
        if self.tile_batch < 1:
            raise UserError(f"--tile_batch must be at least 1, got {self.tile_batch}")

    @property
    def window_stride(self):
        return self.stride or default_stride(self.tile)


@torch.no_grad()
def sliding_window_logits(model, image, num_classes, tiling, size=None):
    """Logits of one (1,3,H,W) image from overlapping windows of at most tile x tile (tile_windows), blended;
    `tiling.tile_batch` windows go through the network per forward. Memory stays O(tile_batch x tile²).

    The accumulator lives on the CPU so a 6000x4000 photo fits beside a small GPU.
    """
    tile, stride, tile_batch = tiling.tile, tiling.window_stride, tiling.tile_batch
    _, _, height, width = image.shape
    (tops, tile_h), (lefts, tile_w) = tile_windows(height, tile, stride), tile_windows(width, tile, stride)
    corners = [(top, left) for top in tops for left in lefts]
    total = torch.zeros(num_classes, height, width)
    weight_sum = torch.zeros(height, width)
    weights = _blend_weights(tile_h, tile_w, image.device)
    for first in range(0, len(corners), tile_batch):
        chunk = corners[first:first + tile_batch]
        windows = torch.cat([image[:, :, top:top + tile_h, left:left + tile_w] for top, left in chunk])
        logits = (forward_logits(model, windows, num_classes).float() * weights).cpu()
        for (top, left), window_logits in zip(chunk, logits):
            total[:, top:top + tile_h, left:left + tile_w] += window_logits
    for top, left in corners:
        weight_sum[top:top + tile_h, left:left + tile_w] += weights.cpu()
    logits = (total / weight_sum)[None]
    if size is not None and tuple(size) != (height, width):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


@contextmanager
def _without_aux(model):
    """The network as deployed for a block: torchvision computes the auxiliary head even in eval mode."""
    aux = getattr(model, "aux_classifier", None)
    if aux is not None:
        model.aux_classifier = None
    try:
        yield model
    finally:
        if aux is not None:
            model.aux_classifier = aux


def count_macs(model, size=512, device="cpu"):
    """(MACs, parameters) of the deployed network (auxiliary head dropped, as inference runs it) for one
    size x size image (or a (height, width) one), via torch-pruning's counter: one convention everywhere."""
    import torch_pruning as tp

    height, width = (size, size) if isinstance(size, int) else size
    example = torch.zeros(1, 3, height, width, device=device)
    with _without_aux(model), eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)
