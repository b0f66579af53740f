"""Segmentation losses: cross-entropy (optionally class-weighted), soft Dice, and their sum; distillation from a
teacher network.

Crack covers about 0.1% of S2DS pixels, so plain cross-entropy lets a model ignore it; weighted
CE and Dice are the usual remedies. The auxiliary head, when present, adds its loss at weight 0.5.
Every loss is one entry of LOSSES, which says what it is made of; nothing else looks at a loss's name.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import UserError
from utils.data import IGNORE_INDEX

AUX_WEIGHT = 0.5


@dataclass(frozen=True)
class LossSpec:
    """What a --loss is made of: cross-entropy or not, class weights from the training labels' pixel counts (the
    weighted kinds), soft Dice or not; `help` is its one-line description in every script's --help."""
    cross_entropy: bool
    class_weighted: bool
    dice: bool
    help: str


LOSSES = {
    "ce": LossSpec(True, False, False, "cross-entropy"),
    "ce_weighted": LossSpec(True, True, False, "cross-entropy weighted by inverse class frequency in the training "
                                               "labels"),
    "dice": LossSpec(False, False, True, "soft Dice over the classes present"),
    "ce_dice": LossSpec(True, False, True, "cross-entropy + soft Dice"),
    "ce_weighted_dice": LossSpec(True, True, True, "weighted cross-entropy + soft Dice"),
}


def loss_spec(kind):
    """LOSSES' entry of `kind`; an unknown name is one line."""
    if kind not in LOSSES:
        raise UserError(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[kind]


def losses_help():
    return "; ".join(f"{name}: {spec.help}" for name, spec in LOSSES.items())


def soft_dice_loss(logits, target, ignore_index=IGNORE_INDEX, eps=1.0):
    """1 - mean soft Dice over the classes present in the batch's labels or predictions."""
    num_classes = logits.shape[1]
    valid = target != ignore_index
    probabilities = logits.float().softmax(dim=1) * valid.unsqueeze(1)
    one_hot = F.one_hot(torch.where(valid, target, 0), num_classes).permute(0, 3, 1, 2) * valid.unsqueeze(1)
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    cardinality = probabilities.sum(dims) + one_hot.sum(dims)
    present = one_hot.sum(dims) > 0
    dice = (2 * intersection + eps) / (cardinality + eps)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0


def crack_skeletons(target, class_id):
    """The labelled cracks thinned to their 1-px centre lines and thickened to 3 px (skeleton recall's "tubed"
    skeleton), as a float (N, H, W) mask on the target's device."""
    from scipy.ndimage import binary_dilation
    from skimage.morphology import skeletonize

    masks = (target == class_id).cpu().numpy()
    tubes = [binary_dilation(skeletonize(mask)) if mask.any() else mask for mask in masks]
    return torch.from_numpy(np.stack(tubes)).to(target.device, torch.float32)


def skeleton_recall_loss(logits, target, class_id):
    """1 - the share of the labelled cracks' centre lines that the predicted crack probability covers
    (Kirchhoff et al., "Skeleton Recall Loss", ECCV 2024): thin structures count by length, not by area, so a
    missed hairline crack costs as much as a missed wide one. 0 for a batch without crack."""
    skeletons = crack_skeletons(target, class_id)
    if not skeletons.any():
        return logits.sum() * 0
    probability = logits.float().softmax(dim=1)[:, class_id]
    return 1 - (probability * skeletons).sum() / skeletons.sum()


class SegmentationLoss(nn.Module):
    """Loss on a torchvision segmentation output dict ({'out', 'aux'}) or a plain logits tensor; with
    skeleton_weight > 0 the main output also gets skeleton_recall_loss on the crack class."""

    def __init__(self, kind="ce", class_weights=None, skeleton_weight=0.0, crack_id=None):
        super().__init__()
        self.spec = loss_spec(kind)
        if self.spec.class_weighted and class_weights is None:
            raise ValueError(f"{kind} needs class weights")
        if skeleton_weight and crack_id is None:
            raise UserError("--skeleton_recall needs a class named crack in the dataset's class table")
        self.kind, self.skeleton_weight, self.crack_id = kind, skeleton_weight, crack_id
        self.register_buffer("class_weights", class_weights if self.spec.class_weighted else None)

    def single(self, logits, target):
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = 0
        if self.spec.cross_entropy:
            loss = F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=IGNORE_INDEX)
        if self.spec.dice:
            loss = loss + soft_dice_loss(logits, target)
        return loss

    def main(self, logits, target):
        """The main head's loss: single() plus the weighted skeleton recall of the crack class."""
        loss = self.single(logits, target)
        if self.skeleton_weight:
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + self.skeleton_weight * skeleton_recall_loss(logits, target, self.crack_id)
        return loss

    def forward(self, output, target):
        if not isinstance(output, dict):
            return self.main(output, target)
        loss = self.main(output["out"], target)
        if output.get("aux") is not None:
            loss = loss + AUX_WEIGHT * self.single(output["aux"], target)
        return loss


def main_logits(output):
    """The main head's logits of a torchvision segmentation output dict, or the tensor itself."""
    return output["out"] if isinstance(output, dict) else output


class Distillation:
    """Knowledge distillation from a teacher network (the dense network a pruned student came from): per pixel, the
    KL divergence between the teacher's and the student's class distributions softened by `temperature`, scaled by
    temperature² (Hinton et al.) and by `weight`, added to the task loss. The teacher runs in eval mode without
    gradients on the same crops as the student."""

    def __init__(self, teacher, weight, temperature=1.0):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def loss(self, output, images):
        self.teacher.eval()  # the teacher's BatchNorm keeps its statistics; no gradient reaches it
        with torch.no_grad():
            target = main_logits(self.teacher(images)).float()
        student = main_logits(output).float()
        if student.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target, size=student.shape[-2:], mode="bilinear", align_corners=False)
        temperature = self.temperature
        divergence = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(target / temperature, dim=1),
                              reduction="none", log_target=True).sum(dim=1).mean()
        return self.weight * temperature ** 2 * divergence
