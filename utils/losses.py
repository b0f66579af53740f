"""Segmentation losses: cross-entropy (optionally class-weighted), soft Dice, and their sum.

Crack covers about 0.1% of S2DS pixels, so plain cross-entropy lets a model ignore it; weighted
CE and Dice are the usual remedies. The auxiliary head, when present, adds its loss at weight 0.5.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import UserError
from utils.data import IGNORE_INDEX

LOSSES = ("ce", "ce_weighted", "dice", "ce_dice", "ce_weighted_dice")
WEIGHTED = ("ce_weighted", "ce_weighted_dice")
AUX_WEIGHT = 0.5


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
        if kind not in LOSSES:
            raise UserError(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")
        if kind in WEIGHTED and class_weights is None:
            raise ValueError(f"{kind} needs class weights")
        if skeleton_weight and crack_id is None:
            raise UserError("--skeleton_recall needs a class named crack in the dataset's class table")
        self.kind, self.skeleton_weight, self.crack_id = kind, skeleton_weight, crack_id
        self.register_buffer("class_weights", class_weights if kind in WEIGHTED else None)

    def single(self, logits, target):
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = 0
        if self.kind != "dice":
            loss = F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=IGNORE_INDEX)
        if self.kind in ("dice", "ce_dice", "ce_weighted_dice"):
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
