"""--sensitivity: each part of the network (ResNet stage, ASPP, head 3x3 conv) pruned alone at each ratio by the
grid's first criterion, BatchNorm recalibrated, not fine-tuned, scored on --val_data: where the network can be cut.
Its (part, ratio) jobs are spread over torchrun's processes as the grid's are.

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
from utils.study.spread import spread
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


def dense_val_miou(study):
    """The dense network's --val_data mIoU, scored once and kept in the manifest."""
    done = study.manifest["sensitivity"]
    if "dense" not in done:
        done["dense"] = validation_miou(study.dense, study.prepared, study.context.device)
        save_manifest(study.folder, study.manifest)
    return done["dense"]


def run_sensitivity(study, grid):
    """Each part pruned alone at each ratio by the grid's first criterion, scored on --val_data untuned; the
    (part, ratio) jobs spread over torchrun's processes, the outputs written by the first."""
    first, launch = grid[0], study.launch
    dense = launch.from_first(lambda: dense_val_miou(study))
    if launch.is_main:
        print(f"sensitivity: each part pruned alone by {first.importance}"
              f"{f' L{first.p_value}' if first.p_value else ''}, no fine-tuning; dense val mIoU "
              f"{100 * dense:.2f}%", flush=True)
    ratios = dict.fromkeys(float(ratio) for ratio in study.options.pruning_ratio)
    jobs = {f"sensitivity {part} @ {ratio:g}": (part, prefix, ratio)
            for part, prefix in network_parts(study.dense).items() for ratio in ratios}

    def work(position, key, job):
        part, prefix, ratio = job
        row = sensitivity_row(study, Variant(first.importance, first.p_value, ratio, 1), part, prefix)
        print(f"{position} {part:<16} {ratio:>5g}%: val mIoU {100 * row['val_miou']:6.2f}% (drop "
              f"{100 * (dense - row['val_miou']):+.2f} points), {row['gmacs']:.2f} GMACs", flush=True)
        return row
    done = spread(jobs, work, study, "sensitivity")
    if not launch.is_main:
        return None
    study.manifest["sensitivity"] = {"dense": dense, **done}
    save_manifest(study.folder, study.manifest)
    rows = [{**done[key], "val_miou_drop": dense - done[key]["val_miou"]} for key in jobs]
    write_csv(rows, study.folder / "sensitivity.csv")
    plot_sensitivity(rows, study.folder / "sensitivity.png", study.options.name, first)
    print(f"wrote {study.folder}/sensitivity.csv and sensitivity.png", flush=True)
    return rows
