"""Segmentation losses: cross-entropy (optionally class-weighted), soft Dice, and their sum.

Crack covers about 0.1% of S2DS pixels, so plain cross-entropy lets a model ignore it; weighted
CE and Dice are the usual remedies. The auxiliary head, when present, adds its loss at weight 0.5.
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import UserError
from utils.data import IGNORE_INDEX

LOSSES = ("ce", "ce_weighted", "dice", "ce_dice")
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


class SegmentationLoss(nn.Module):
    """Loss on a torchvision segmentation output dict ({'out', 'aux'}) or a plain logits tensor."""

    def __init__(self, kind="ce", class_weights=None):
        super().__init__()
        if kind not in LOSSES:
            raise UserError(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")
        if kind == "ce_weighted" and class_weights is None:
            raise ValueError("ce_weighted needs class weights")
        self.kind = kind
        self.register_buffer("class_weights", class_weights if kind == "ce_weighted" else None)

    def single(self, logits, target):
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = 0
        if self.kind in ("ce", "ce_weighted", "ce_dice"):
            loss = F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=IGNORE_INDEX)
        if self.kind in ("dice", "ce_dice"):
            loss = loss + soft_dice_loss(logits, target)
        return loss

    def forward(self, output, target):
        if not isinstance(output, dict):
            return self.single(output, target)
        loss = self.single(output["out"], target)
        if output.get("aux") is not None:
            loss = loss + AUX_WEIGHT * self.single(output["aux"], target)
        return loss
