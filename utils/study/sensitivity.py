"""--sensitivity: each part of the network (ResNet stage, ASPP, head 3x3 conv) pruned alone at each ratio by the
grid's first criterion, BatchNorm recalibrated, not fine-tuned, scored on --val_data: where the network can be cut.

Floor 9 (docs/ARCHITECTURE.md).
"""
import copy
import dataclasses

from utils import model as models
from utils.finetune import FinetuneBudget, validation_miou
from utils.prune_ops import layers_outside, network_parts
from utils.pruning import prune_in_steps
from utils.recipe import seed_everything
from utils.report import write_csv
from utils.study.grid import Variant
from utils.study.manifest import save_manifest
from utils.study.plots import plot_sensitivity
from utils.study.runs import seeded_data
from utils.study.settings import prune_options


def sensitivity_row(study, variant, part, prefix):
    model = copy.deepcopy(study.dense).to(study.context.device)
    tuning = dataclasses.replace(prune_options(study.options, variant, study.options.seed),
                                 finetuning=FinetuneBudget())
    seed_everything(study.options.seed)
    prepared = seeded_data(study.prepared, study.options.seed, study.options, study.context)
    prune_in_steps(model, tuning, prepared, study.context, lambda *_: None, layers_outside(model, prefix))
    macs, _ = models.count_macs(model, study.options.measure_size, study.context.device)
    return {"part": part, "pruning_ratio": variant.ratio, "gmacs": macs / 1e9,
            "val_miou": validation_miou(model, study.prepared, study.context.device)}


def run_sensitivity(study, grid):
    """Each part pruned alone at each ratio by the grid's first criterion, scored on --val_data untuned."""
    first = grid[0]
    done = study.manifest["sensitivity"]
    if "dense" not in done:
        done["dense"] = validation_miou(study.dense, study.prepared, study.context.device)
    print(f"sensitivity: each part pruned alone by {first.importance}"
          f"{f' L{first.p_value}' if first.p_value else ''}, no fine-tuning; dense val mIoU "
          f"{100 * done['dense']:.2f}%", flush=True)
    rows = []
    for part, prefix in network_parts(study.dense).items():
        for ratio in dict.fromkeys(study.options.pruning_ratio):
            key = f"{part} @ {float(ratio):g}"
            if key not in done:
                done[key] = sensitivity_row(study, Variant(first.importance, first.p_value, float(ratio), 1), part,
                                            prefix)
                save_manifest(study.folder, study.manifest)
            row = {**done[key], "val_miou_drop": done["dense"] - done[key]["val_miou"]}
            print(f"  {part:<16} {ratio:>5g}%: val mIoU {100 * row['val_miou']:6.2f}% "
                  f"(drop {100 * row['val_miou_drop']:+.2f} points), {row['gmacs']:.2f} GMACs", flush=True)
            rows.append(row)
    write_csv(rows, study.folder / "sensitivity.csv")
    plot_sensitivity(rows, study.folder / "sensitivity.png", study.options.name, first)
    print(f"wrote {study.folder}/sensitivity.csv and sensitivity.png", flush=True)
    return rows
