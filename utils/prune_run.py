"""The pruning run behind torchvision_pruning.py: load, plan (a budget) or take the ratio, prune in steps, fine-tune
with the training recipe (best kept), measure dense against pruned, save a pickle-free checkpoint.

Floor 8 (docs/ARCHITECTURE.md): pruning is utils.pruning's, plans utils.planning's, recovery utils.finetune's,
latency utils.timing's. MACs and parameters are those of the deployed network (auxiliary head dropped), as test.py
and benchmark.py count.
"""
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

from utils import model as models
from utils.checkpoint import make_checkpoint, save_atomic
from utils.cli import UserError, check_batch_memory, plain_name, resolve_device
from utils.distributed import DistContext, launched_processes
from utils.files import refuse_existing
from utils.finetune import finetune, prepare_data, validation_miou
from utils.planning import budget_line, describe_plan, make_budget, plan_to_budget, read_plan, save_plan
from utils.prune_ops import importance_spec
from utils.pruning import PruneOptions, at_least, load_for_pruning, prune_in_steps, require_classes
from utils.recipe import seed_everything
from utils.report import write_csv
from utils.timing import ROUNDS, deployed_latencies


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


class StepTable:
    """The per-step table: printed as it grows, saved as <model_name>_steps.csv (ratio empty under a per-part plan,
    where each part has its own); `history` is the pruning history the steps made."""

    def __init__(self, path, with_val, with_finetune):
        self.path, self.rows, self.dense, self.history = path, [], None, []
        self.with_val, self.with_finetune = with_val, with_finetune
        header = f"{'step':>4} {'ratio %':>8} {'GMACs':>9} {'% dense':>8} {'params M':>9}"
        if with_val and with_finetune:
            header += f" {'mIoU pruned':>11}"
        if with_val:
            header += f" {'val mIoU':>9}"
        print(header + f" {'seconds':>8}", flush=True)

    def add(self, step, percent, macs, params, seconds, miou=None, miou_pruned=None):
        self.dense = self.dense or macs
        row = {"step": step, "pruning_ratio": percent, "macs": macs, "params": params,
               "macs_percent_of_dense": round(100 * macs / self.dense, 2)}
        line = (f"{step:>4} {_fmt(percent, 1):>8} {macs / 1e9:>9.2f} {row['macs_percent_of_dense']:>8.1f} "
                f"{params / 1e6:>9.2f}")
        if self.with_val and self.with_finetune:
            row["val_miou_before_finetune"] = miou_pruned
            line += f" {_fmt(None if miou_pruned is None else 100 * miou_pruned):>11}"
        if self.with_val:
            row["val_miou"] = miou
            line += f" {_fmt(100 * miou):>9}"
        row["seconds"] = round(seconds, 2)
        print(line + f" {seconds:>8.1f}", flush=True)
        self.rows.append(row)
        write_csv(self.rows, self.path)


def output_paths(output_dir, model_name):
    """{"checkpoint", "steps", "pickle", "plan"}: the files of one pruned network under OUTPUT_DIR/pruned/."""
    folder = os.path.join(output_dir, "pruned")
    name = plain_name(model_name, "--model_name")
    return {"checkpoint": os.path.join(folder, f"{name}.pth"), "steps": os.path.join(folder, f"{name}_steps.csv"),
            "pickle": os.path.join(folder, f"{name}_pickled.pth"), "plan": os.path.join(folder, f"{name}_plan.json")}


def default_model_name(arch, importance, p_value, amount):
    """arch_criterion[_lP]_AMOUNT, AMOUNT the percent removed or the budget ('4.5gmacs', '50ms', 'plan')."""
    norm = f"_l{p_value}" if importance_spec(importance).uses_p_value else ""
    amount = f"{amount:g}" if isinstance(amount, (int, float)) else amount
    return f"{arch}_{importance.lower()}{norm}_{amount}"


@dataclass(frozen=True)
class PruneRun:
    """torchvision_pruning.py's run: the network to prune, how (`prune`), on what data (`tuning`), what is measured
    and where it goes. Every check that needs no file happens here, when the options are made; `device` is
    resolved (auto becomes cpu or cuda)."""
    prune: PruneOptions
    data: str | None
    val_data: str | None
    state_dict: str | None
    arch: str | None
    init: str | None
    allow_pickle: bool
    output_stride: int | None
    keep_feature_extract: bool
    model_name: str | None
    output_dir: str
    overwrite: bool
    save_pickle: bool
    measure_size: int
    latency_runs: int
    device: str
    target_gmacs: float | None = None
    target_latency_ms: float | None = None
    plan: str | None = None

    def __post_init__(self):
        if launched_processes() > 1:
            raise UserError(f"torchvision_pruning.py prunes one network in one process, but torchrun started "
                            f"{launched_processes()}; run it with python (many networks over several GPUs: "
                            f"torchrun study.py)")
        self._check_amount()
        if self.prune.needs_data and not self.data:
            raise UserError(f"{self.prune.needs_data} needs --data TRAIN_DIR: gradient criteria and fine-tuning use "
                            f"the real segmentation loss on training images, never random input")
        if self.prune.recipe.distill and not self.prune.finetuning.tunes:
            raise UserError("--distill acts during fine-tuning; add --finetune_steps N or drop --distill")
        at_least(self, measure_size=32, latency_runs=0)
        recipe = self.prune.recipe.settled()  # the largest the settled batch can be is checked again when settled
        check_batch_memory(recipe.batch_size, recipe.crop_size, "--batch_size x --crop_size")
        if self.model_name is not None:
            plain_name(self.model_name, "--model_name")
        object.__setattr__(self, "device", str(resolve_device(self.device)))

    def _check_amount(self):
        """Exactly one of --pruning_ratio, --target_gmacs, --target_latency_ms and --plan says how much to prune."""
        given = [option for option, value in (("--pruning_ratio", self.prune.pruning_ratio),
                                               ("--target_gmacs", self.target_gmacs),
                                               ("--target_latency_ms", self.target_latency_ms),
                                               ("--plan", self.plan)) if value is not None]
        if not given:
            raise UserError("say how much to prune: --pruning_ratio PERCENT (every layer alike), --target_gmacs G or "
                            "--target_latency_ms T (per-part ratios chosen to meet a budget), or --plan FILE")
        if len(given) > 1:
            raise UserError(f"{given[0]} and {given[1]} contradict each other: give one of --pruning_ratio, "
                            f"--target_gmacs, --target_latency_ms and --plan")
        budget = self.budget_option
        if budget and not 0 < getattr(self, budget[2:]) < math.inf:  # NaN too
            raise UserError(f"{budget} must be positive, got {getattr(self, budget[2:]):g}")
        if budget and not self.val_data:
            raise UserError(f"{budget} chooses each part's ratio by the val mIoU it costs and needs --val_data "
                            f"VAL_DIR")
        if given[0] != "--pruning_ratio" and self.prune.global_pruning:
            raise UserError(f"{given[0]} prunes each part by its own ratio, which --global_pruning's ranking across "
                            f"the whole network would override; drop --global_pruning")

    @property
    def budget_option(self):
        """'--target_gmacs' or '--target_latency_ms' when pruning to a budget, else None."""
        return ("--target_gmacs" if self.target_gmacs is not None else
                "--target_latency_ms" if self.target_latency_ms is not None else None)

    @property
    def timing_runs(self):
        """--latency_runs; a latency budget is always measured (utils.timing's rounds when --latency_runs is 0)."""
        return self.latency_runs or (ROUNDS if self.target_latency_ms is not None else 0)

    def flat(self):
        """The options as one flat dict of option names, as the command line gave them (saved in the checkpoint)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        prune = dataclasses.asdict(values.pop("prune"))
        return {**prune.pop("recipe"), **prune.pop("finetuning"), **prune, **values}


def make_plan(model, arch, options, tuning, prepared, context):
    """The per-part plan of --target_gmacs/--target_latency_ms (planned now) or --plan (read), printed; None for
    uniform pruning."""
    budget = make_budget(options)
    if budget is not None:
        plan = plan_to_budget(model, arch, tuning, prepared, context, budget)
        print(f"plan: {describe_plan(plan)} -> {budget.text(plan['planned_cost'])} {budget.where} (target "
              f"{budget.target:g})", flush=True)
        return plan
    if options.plan is not None:
        plan = {**read_plan(options.plan, model, arch), "replayed_from": str(options.plan)}
        print(f"plan from {options.plan}: {describe_plan(plan)}", flush=True)
        return plan
    return None


def run(options):
    """Load, prune in --iterative_steps (every layer by --pruning_ratio, or each part by its ratio in a plan made
    for --target_gmacs/--target_latency_ms or read from --plan), fine-tune, score, time dense against pruned, save.
    `options` is a PruneRun."""
    context = DistContext(device=torch.device(options.device))
    seed_everything(options.prune.seed)
    loaded = load_for_pruning(options.state_dict, options.arch, options.init, options.allow_pickle,
                              options.output_stride)
    tuning = settled_tuning(options.prune, loaded.trained_with)
    model, kind = loaded.model, tuning.importance_type
    paths = output_paths(options.output_dir, options.model_name or default_model_name(
        loaded.arch, kind, tuning.p_value, _amount(options)))
    # The steps table is written as the steps go: one without its checkpoint is a failed run's, replaced.
    refuse_existing([paths["checkpoint"]] + ([paths["pickle"]] if options.save_pickle else []) +
                    ([paths["plan"]] if tuning.pruning_ratio is None else []), options.overwrite,
                    "choose another --model_name")
    if options.keep_feature_extract:
        models.freeze_all_but_head(model)
    model.to(context.device)
    prepared = prepare_data(options.data, options.val_data, tuning.recipe, (tuning.workers, tuning.seed), context)
    require_classes(prepared, loaded.classes, loaded.source)
    plan = make_plan(model, loaded.arch, options, tuning, prepared, context)
    print(describe_run(loaded, tuning, plan is not None), flush=True)
    dense = copy.deepcopy(model)  # the teacher of --distill, and measured beside the pruned one at the end
    prepared.teacher = dense if tuning.recipe.distill else None
    table, recovery = _prune_and_recover(model, (tuning, plan, paths["steps"]), prepared, context,
                                         options.measure_size)
    facts = _measure(dense, model, options, context.device)
    del dense
    _save(model, (loaded.arch, loaded.classes), loaded.history + table.history,
          _extras(options, loaded.source, facts, table.rows, plan, tuning, recovery), paths, options.save_pickle)
    if plan is not None:
        save_plan({**plan, "achieved": _achieved(facts)}, paths["plan"])
        print(f"saved {paths['plan']}", flush=True)
    print(final_line(facts, options.measure_size, context.device), flush=True)
    if plan is not None and "replayed_from" not in plan:
        print(budget_line(plan, facts, options), flush=True)
    return paths["checkpoint"]


def settled_tuning(tuning, trained_with):
    """`tuning` (a PruneOptions) with its recipe's fields not given taken from the options the network was trained
    with, then from the Recipe's defaults: a pruned network fine-tunes as it was trained."""
    return dataclasses.replace(tuning, recipe=tuning.recipe.settled(trained_with))


def describe_run(loaded, tuning, per_part):
    """'pruning ARCH from SOURCE: AMOUNT by CRITERION in N step(s), then ...': what the run is about to do."""
    amount = "each part by its planned ratio" if per_part else f"{tuning.pruning_ratio:g}% of channels"
    norm = f" (p={tuning.p_value})" if importance_spec(tuning.importance_type).uses_p_value else ""
    recipe = tuning.recipe
    return (f"pruning {loaded.arch} from {loaded.source}: {amount} by {tuning.importance_type} importance{norm} in "
            f"{tuning.iterative_steps} step(s); BatchNorm recalibrated on {tuning.bn_recalibrate} batches after each; "
            f"then {tuning.finetuning.describe()} ({recipe.optimizer}, lr {recipe.lr:g}, {recipe.loss}, batch "
            f"{recipe.batch_size} x {recipe.crop_size} px"
            f"{f', distilled from the dense network at weight {recipe.distill:g}' if recipe.distill else ''})")


def _prune_and_recover(model, plan_and_table, prepared, context, size):
    """Prune `model` in steps (a row of the step table after each), then fine-tune it with its budget (best kept):
    (the StepTable with the pruning history as its `history`, the FinetuneResult)."""
    tuning, plan, table_path = plan_and_table
    percents = None if plan is None else {entry["prefix"]: entry["pruning_ratio"] for entry in plan["parts"].values()}
    started = time.perf_counter()
    table = StepTable(table_path, prepared.val_loader is not None, tuning.finetuning.step_finetune_steps > 0)
    table.add(0, 0.0, *models.count_macs(model, size, context.device), time.perf_counter() - started,
              validation_miou(model, prepared, context.device))

    def on_step(step, percent, seconds, miou_pruned, miou_tuned):
        macs, params = models.count_macs(model, size, context.device)
        table.add(step, percent, macs, params, seconds, miou_pruned if miou_tuned is None else miou_tuned,
                  miou_pruned)

    table.history = prune_in_steps(model, tuning, prepared, context, on_step, part_ratios=percents)
    recovery = finetune(model, prepared, tuning.recipe, tuning.finetuning, context)
    if recovery.steps:
        print(f"fine-tuned {recovery.steps} steps in {recovery.seconds:.0f} s; kept step {recovery.best_step}"
              + (f" (val mIoU {100 * recovery.val_miou:.2f}%)" if recovery.val_miou is not None else ""), flush=True)
    return table, recovery


def _amount(options):
    """The amount in a default name: the percent, the budget ('4.5gmacs', '50ms') or 'plan'."""
    if options.prune.pruning_ratio is not None:
        return options.prune.pruning_ratio
    if options.target_gmacs is not None:
        return f"{options.target_gmacs:g}gmacs"
    return f"{options.target_latency_ms:g}ms" if options.target_latency_ms is not None else "plan"


def _achieved(facts):
    latency = facts["latency_seconds"]
    return {"gmacs": facts["macs"] / 1e9, "params": facts["params"],
            "latency_ms": None if latency is None else 1000 * latency}


def _extras(options, source, facts, steps, plan, tuning, recovery):
    """The pruning facts a checkpoint carries (docs/ARCHITECTURE.md, Checkpoints); a plan's per-part ratios
    instead of pruning_ratio; `tuning` the settled PruneOptions, `recovery` the final fine-tuning's result."""
    amount = ({"pruning_ratio": tuning.pruning_ratio} if plan is None else
              {"part_ratios": {part: entry["pruning_ratio"] for part, entry in plan["parts"].items()},
               "target_gmacs": options.target_gmacs, "target_latency_ms": options.target_latency_ms})
    return {**amount, "importance": tuning.importance_type, "p_value": tuning.p_value,
            "iterative_steps": tuning.iterative_steps, "bn_recalibrate": tuning.bn_recalibrate,
            "finetune_steps": recovery.steps, "finetune_best_step": recovery.best_step,
            "global_pruning": tuning.global_pruning, "round_to": tuning.round_to, "source": source,
            "measure_size": options.measure_size, **facts, "steps": steps,
            "args": dataclasses.replace(options, prune=tuning).flat()}


def _measure(dense, pruned, options, device):
    """MACs and parameters of the deployed networks (aux head dropped), and their latency as utils.timing measures
    every latency (BatchNorm folded, warm-up, median of interleaved rounds)."""
    facts = {}
    for prefix, network in (("dense_", dense), ("", pruned)):
        facts[f"{prefix}macs"], facts[f"{prefix}params"] = models.count_macs(network, options.measure_size, device)
    facts["dense_latency_seconds"] = facts["latency_seconds"] = None
    if options.timing_runs:
        facts["dense_latency_seconds"], facts["latency_seconds"] = deployed_latencies(
            [dense, pruned], options.measure_size, device, options.timing_runs)
    return facts


def _save(model, network, history, extras, paths, save_pickle):
    """The pruned checkpoint (network: its arch and ClassTable), the steps table beside it, the pickle if asked."""
    arch, classes = network
    save_atomic(make_checkpoint(model, arch, classes, pruning=history, **extras), paths["checkpoint"])
    saved = [paths["checkpoint"], paths["steps"]]
    if save_pickle:
        save_atomic(model.cpu(), paths["pickle"])
        saved.append(paths["pickle"])
    print(f"saved {', '.join(saved)}")


def final_line(facts, size, device):
    """'dense ... -> pruned ...' with the reductions, the line people quote."""
    dense_macs, macs, dense_params, params = (facts[key] for key in ("dense_macs", "macs", "dense_params", "params"))
    line = (f"dense {dense_macs / 1e9:.1f} GMACs, {dense_params / 1e6:.1f} M params -> pruned {macs / 1e9:.1f} GMACs "
            f"({100 * macs / dense_macs:.1f}%, {dense_macs / macs:.2f}x fewer), {params / 1e6:.1f} M params "
            f"({100 * params / dense_params:.1f}%) at {size}x{size} (deployed network, aux head dropped)")
    if facts["latency_seconds"] is not None:
        dense_latency, latency = facts["dense_latency_seconds"], facts["latency_seconds"]
        line += (f"; latency {1000 * dense_latency:.1f} -> {1000 * latency:.1f} ms ({dense_latency / latency:.2f}x "
                 f"faster; deployed: BatchNorm folded, median of interleaved rounds, batch 1, "
                 f"{torch.device(device).type})")
    return line

