"""The pruning study behind study.py: every criterion x p x ratio x schedule, each repeated per seed, pruned,
BatchNorm-recalibrated, fine-tuned for the same number of steps with the recipe the network was trained with, scored
on the test split as test.py scores it, timed as every latency is timed, and compared with a dense twin fine-tuned
alike; tabulated per seed and as mean and spread, plotted; resumable after a kill.

Floor 10 (docs/ARCHITECTURE.md): this package's modules split the work along its seams: grid (the variants),
settings (StudyOptions, what defines a study), manifest (resume), runs (one (variant, seed), the dense rows, INT8 rows,
latency), tables and plots (the outputs), sensitivity (--sensitivity); this module walks the grid.

Fair comparison: every pruned variant is fine-tuned for --finetune_steps, so the dense network gets a twin ("dense
fine-tuned") fine-tuned from the same weights with the same recipe, steps and seed; every change against dense is
taken against that twin, seed by seed. The untuned dense row stays in the table, labelled as such.

Noise: each variant and the twin run once per --seeds value (pruning randomness, Taylor's calibration batches,
crops and the order of fine-tuning batches all follow the seed). A mean change against the twin no larger than the
spread (the larger sample standard deviation over seeds of the variant and of the twin) is marked within noise.

Resuming: OUTPUT_DIR/studies/NAME/study.json holds the normalised arguments, the dense row and the budgets' plans;
NAME/runs/<key>.json each finished (variant, seed), written as it ends; a checkpoint carries the digest of the
arguments, so one that was saved but not yet scored when the run was killed is scored, not pruned again.

Several processes: under torchrun (`torchrun --nproc_per_node N study.py ...`, `--nnodes` across machines) the first
process opens the manifest, scores the dense network and plans the budgets; the (variant, seed) runs, then their INT8
rows, are claimed one at a time by whichever process is free and run on its own device (LOCAL_RANK's GPU, or the
CPU); once every process is through, the first one times every network in one process and writes the outputs. The
processes talk only through torchrun's key-value store (utils.distributed.Launch), so each run trains and scores
as one process would. Every run is seeded by its own seed alone, so the rows do not depend on how many processes
ran the grid.
"""
import datetime
from pathlib import Path

from utils import data
from utils.cli import UserError, device_name, plain_name
from utils.distributed import join_launch
from utils.finetune import prepare_data
from utils.planning import Budget, describe_plan, plan_to_budget, uniform_ratio_for
from utils.pruning import load_for_pruning, require_classes
from utils.recipe import seed_everything
from utils.report import write_csv, write_workbook
from utils.study.grid import DENSE, INT8, ONNX, run_name
from utils.study.manifest import MANIFEST, open_study, save_manifest
from utils.study.plots import plot_study
from utils.study.runs import Study, add_latency, dense_row, describe, onnx_rows, run_variant, seeded_data
from utils.study.sensitivity import run_sensitivity
from utils.study.spread import spread
from utils.study.settings import StudyOptions, options_grid, prune_options, study_settings
from utils.study.tables import PER_SEED, SUMMARY, format_table, summary_rows, table_rows

__all__ = ["StudyOptions", "run"]


def recipe_text(recipe):
    """'adamw, lr 0.001, ce_weighted_dice, batch 8 x 96 px, distill 1 (T 2)': the fine-tuning recipe in a line."""
    distill = f", distill {recipe.distill:g} (T {recipe.distill_temperature:g})" if recipe.distill else ""
    return (f"{recipe.optimizer}, lr {recipe.lr:g}, {recipe.loss}"
            f"{f' + skeleton recall {recipe.skeleton_recall:g}' if recipe.skeleton_recall else ''}, batch "
            f"{recipe.batch_size} x {recipe.crop_size} px{distill}")


# How long a process waits at a rendezvous for the others (the end of a phase, the first process's dense scoring and
# budget plans): one S2DS run takes hours on a GPU, and a process that dies is noticed by torchrun, not by this limit.
WAIT_LIMIT = datetime.timedelta(days=3)


def set_up(options, launch):
    """The study's dense network, its options settled on the recipe that network was trained with, its folder,
    manifest (opened by the first process, the same on every process) and data."""
    folder = Path(options.output_dir) / "studies" / plain_name(options.name, "--name")
    seed_everything(options.seed)
    loaded = load_for_pruning(options.state_dict, allow_pickle=options.allow_pickle, stride=options.output_stride)
    options = options.settled(loaded.trained_with)

    def open_manifest():
        manifest = open_study(folder, study_settings(options), options.overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        save_manifest(folder, manifest)
        return manifest
    manifest = launch.from_first(open_manifest)
    if not (folder / MANIFEST).is_file():
        raise UserError(f"process {launch.rank} does not see {folder / MANIFEST}, which the first process wrote: "
                        f"a study over several machines needs an --output_dir every machine shares")
    context = launch.own()  # each run is one process's own: its loaders neither shard nor wait
    dense = loaded.model.to(context.device)
    prepared = prepare_data(options.data, options.val_data, options.recipe, (options.workers, options.seed), context)
    require_classes(prepared, loaded.classes, loaded.source)
    prepared.teacher = dense  # what --distill learns from: the dense network every arm starts from
    if launch.is_main:
        print(f"recovery of every arm: BatchNorm statistics re-estimated on {options.bn_recalibrate} batches, then "
              f"{options.finetuning.describe()} ({recipe_text(options.recipe)})"
              f"{f'; runs spread over {launch.world_size} processes' if launch.enabled else ''}", flush=True)
    study = Study(options, folder, manifest, context, prepared, dense, loaded.arch, loaded.history, loaded.source,
                  loaded.classes, launch=launch)
    if options.test_data:
        study.test_set = data.S2DSDataset(options.test_data, data.EvalTransform(), require_labels=True)
        data.require_same_classes(loaded.classes, study.test_set, loaded.source)
    return study


def run(options):
    """study.py: the grid (or, with --sensitivity, the per-part sensitivity), resumable, its runs spread over the
    processes torchrun started (one without torchrun); the first process returns the per-seed rows, the others
    None. `options` is a StudyOptions."""
    grid = options_grid(options)
    study = set_up(options, join_launch(options.device, WAIT_LIMIT))
    return run_sensitivity(study, grid) if study.options.sensitivity else run_grid(study, grid)


def run_grid(study, grid):
    """The dense rows and budgets (first process), every (variant, seed) and then their INT8 rows (spread), the
    latency and the outputs (first process)."""
    options, launch = study.options, study.launch
    study.manifest["dense"] = launch.from_first(lambda: dense_once(study))
    study.manifest["budgets"] = launch.from_first(lambda: plan_budgets(study, grid))
    plan = [(describe(variant)["variant"], variant, seed) for variant in [None, *grid] for seed in options.seeds]
    runs = spread({run_name(name, seed): (variant, seed) for name, variant, seed in plan},
                  lambda position, key, job: run_variant(*job, study, position), study, "runs")
    int8_jobs = {run_name(name + INT8, seed): (name, seed) for name, _, seed in plan if options.wants_int8(name)}
    int8 = spread(int8_jobs, lambda position, key, job: int8_job(position, *job, runs, study), study, "int8")
    if not launch.is_main:
        return None
    found = {**runs, **{key: row for graphs in int8.values() for key, row in graphs.items()}}
    study.manifest["runs"] = found
    save_manifest(study.folder, study.manifest)
    rows = [{**study.manifest["dense"], "run": DENSE, "seed": seed} for seed in options.seeds]
    rows += list(found.values())
    add_latency(rows, study)
    write_outputs(rows, study)
    return rows


def dense_once(study):
    """The untuned dense network's row, scored once and kept in the manifest."""
    if study.manifest["dense"] is None:
        study.manifest["dense"] = dense_row(study)
        save_manifest(study.folder, study.manifest)
    return study.manifest["dense"]


def int8_job(position, name, seed, runs, study):
    """{key: row} of the float32 graph and the INT8 graph of the finished run `name` with `seed`."""
    return onnx_rows(runs[run_name(name, seed)], [run_name(name + ONNX, seed), run_name(name + INT8, seed)], study,
                     position)


def plan_budgets(study, grid):
    """What each --target_gmacs needs before its variants run, found once and kept in the manifest: the uniform
    ratio of equal GMACs (bisected), and per criterion the per-part plan (pruning.plan_to_budget: each part's
    measured val mIoU drop and cost, greedy), made with the first seed and used by every seed."""
    options, budgets = study.options, study.manifest["budgets"]
    for variant in grid:
        key = variant.budget_key
        if key is None or key in budgets:
            continue
        budget = Budget("gmacs", variant.target_gmacs, options.measure_size, options.device, 0)
        tuning = prune_options(options, variant, options.seed)
        if not variant.budgeted:
            ratio = uniform_ratio_for(budget, study.dense, tuning)
            print(f"{key}: every layer pruned by {ratio:g}% meets {variant.target_gmacs:g} GMACs", flush=True)
            budgets[key] = {"pruning_ratio": ratio}
        else:
            prepared = seeded_data(study.prepared, options.seed, options, study.context)
            planned = plan_to_budget(study.dense, study.arch, tuning, prepared, study.context, budget)
            budgets[key] = {"part_ratios": {part: entry["pruning_ratio"] for part, entry in planned["parts"].items()},
                            "plan": describe_plan(planned), "planned_gmacs": planned["planned_cost"]}
            print(f"{key}: {budgets[key]['plan']} -> {planned['planned_cost']:.3f} GMACs", flush=True)
        save_manifest(study.folder, study.manifest)
    return budgets


def write_outputs(rows, study):
    """study.csv (per seed, fractions), study_summary.csv (mean and spread), study.xlsx (both, percentages),
    study.png; the summary table printed."""
    table = table_rows(rows)
    summary = summary_rows(table)
    folder, options = study.folder, study.options
    write_csv([PER_SEED.taken(row) for row in table], folder / "study.csv")
    write_csv(summary, folder / "study_summary.csv")
    note = (f"test split {options.test_data}; seeds {', '.join(map(str, options.seeds))}; MACs and latency at "
            f"{options.measure_size}x{options.measure_size} px, batch 1, deployed network, "
            f"{device_name(study.context.device)}; every pruned network: BatchNorm recalibrated on "
            f"{options.bn_recalibrate} batches, then {options.finetuning.describe()} ({recipe_text(options.recipe)}); "
            f"changes are percentage points against the dense network fine-tuned alike (same steps, recipe and seed); "
            f"spread = sample standard deviation over seeds; 'within noise' = |mean change| <= the larger spread of the variant and the dense fine-tuned twin, "
            f"or under 0.005 points")
    write_workbook(str(folder / "study.xlsx"), {
        "summary": [SUMMARY.table([SUMMARY.taken(row) for row in summary], title=note)],
        "per seed": [PER_SEED.table([PER_SEED.taken(row) for row in table], title="one row per (variant, seed)")]})
    plot_study(summary, folder / "study.png", f"Pruning study {options.name}", options.measure_size,
               study.context.device.type)
    print(format_table(summary))
    print(f"\nwrote {folder}/: study.csv (one row per seed), study_summary.csv, study.xlsx, study.png and one "
          f"checkpoint per (variant, seed)", flush=True)
