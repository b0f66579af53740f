"""Pruning to a budget: per-part ratios chosen from each part's measured val mIoU drop and cost (a GMACs or latency
budget), the uniform ratio of equal cost, and the plan files that replay them.

Floor 7 (docs/ARCHITECTURE.md): each probe is cut by utils.pruning's criterion and scored after its BatchNorm
statistics are re-estimated (utils.finetune.recalibrate, as EagleEye scores candidates), so a part's drop is what
pruning it costs, not what stale statistics cost.
"""
import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from utils import model as models
from utils.cli import UserError, require_path
from utils.files import replace_atomically
from utils.finetune import recalibrate, validation_miou
from utils.prune_ops import build_pruner, make_importance, network_parts, prune_step
from utils.pruning import step_gradients
from utils.timing import deployed_latencies

PLAN_FORMAT = "cracksense-pruning-plan"
RATIO_STEP = 10       # percent: each part is measured at every multiple; a greedy choice cuts one part this more
MAX_PART_RATIO = 90   # percent: no part loses more of its channels
FREE_DROP = 1e-4      # a val mIoU drop no larger (or a gain) counts as this: such a cut is chosen by what it saves


@dataclass(frozen=True)
class Budget:
    """What a plan must meet: GMACs (counted, as everywhere) or latency in ms (utils.timing's one measurement: the
    deployed network, batch 1, on `device`), at size x size px."""
    kind: str  # "gmacs" or "latency_ms"
    target: float
    size: int
    device: str
    runs: int

    def cost(self, network):
        if self.kind == "gmacs":
            return models.count_macs(network, self.size, self.device)[0] / 1e9
        return 1000 * deployed_latencies([network], self.size, self.device, self.runs)[0]

    def text(self, value):
        return f"{value:.3f} GMACs" if self.kind == "gmacs" else f"{value:.1f} ms"

    @property
    def where(self):
        return f"at {self.size}x{self.size} px" + ("" if self.kind == "gmacs" else f" on {self.device}")


def make_budget(options):
    """The Budget of --target_gmacs or --target_latency_ms, or None."""
    if options.budget_option is None:
        return None
    kind = options.budget_option[len("--target_"):]
    return Budget(kind, getattr(options, f"target_{kind}"), options.measure_size, options.device, options.timing_runs)


def magnitude_cut(model, ratio, round_to, global_pruning=False):
    """A copy of `model` cut in one step by L2 magnitude (`ratio`: a fraction for every layer, or {prefix:
    fraction} per part): what a budget's cost is measured on, since a cost depends on the widths, not on which
    channels go."""
    network = copy.deepcopy(model)
    prune_step(build_pruner(network, make_importance("Magnitude", 2), ratio, 1, global_pruning, round_to), network)
    return network


def refuse_unprunable(budget, dense_cost):
    """A budget at or above the dense network's cost leaves nothing to prune: one line."""
    if dense_cost <= budget.target:
        raise UserError(f"--target_{budget.kind} {budget.target:g} is not below the dense network's "
                        f"{budget.text(dense_cost)} {budget.where}: nothing to prune; give a smaller budget")


class PlanProbe:
    """Copies of the network cut part by part in one step, no fine-tuning: by the run's criterion for the val mIoU
    they lose (BatchNorm recalibrated first, as every pruned network here), by magnitude where only their cost counts
    (a cost depends on the widths, not on which channels go)."""

    def __init__(self, model, tuning, prepared, context, budget):
        self.model, self.tuning, self.prepared, self.context, self.budget = model, tuning, prepared, context, budget
        self.costs = {}

    def cut(self, percents):
        """A copy cut by the run's criterion (the val mIoU it loses is measured on it)."""
        network, tuning = copy.deepcopy(self.model), self.tuning
        pruner = build_pruner(network, make_importance(tuning.importance_type, tuning.p_value, tuning.seed),
                              {prefix: percent / 100 for prefix, percent in percents.items()}, 1, False,
                              tuning.round_to)
        prune_step(pruner, network, step_gradients(network, tuning, self.prepared, self.context))
        recalibrate(network, self.prepared, tuning.bn_recalibrate, self.context.device)
        return network

    def cost(self, percents):
        """The budget's cost of the network with these per-part percents (measured once per plan)."""
        key = tuple(sorted(percents.items()))
        if key not in self.costs:
            fractions = {prefix: percent / 100 for prefix, percent in percents.items()}
            self.costs[key] = self.budget.cost(magnitude_cut(self.model, fractions, self.tuning.round_to))
        return self.costs[key]


def part_sensitivity(probe, parts, dense_miou):
    """Per part and ratio (RATIO_STEP to MAX_PART_RATIO): the val mIoU it loses cut alone, and the cost then."""
    rows = []
    for part, prefix in parts.items():
        for percent in range(RATIO_STEP, MAX_PART_RATIO + 1, RATIO_STEP):
            network = probe.cut({prefix: percent})
            miou = validation_miou(network, probe.prepared, probe.context.device)
            row = {"part": part, "prefix": prefix, "pruning_ratio": percent, "val_miou": miou,
                   "val_miou_drop": dense_miou - miou, "cost": probe.budget.cost(network)}
            print(f"  {part:<16} {percent:>3}%: val mIoU {100 * miou:6.2f}% (drop {100 * row['val_miou_drop']:+.2f} "
                  f"points), {probe.budget.text(row['cost'])}", flush=True)
            rows.append(row)
    return rows


def greedy_percents(rows, dense_cost, target, measure):
    """Per-part percents: from none, repeatedly cut by RATIO_STEP more the part whose next step saves the most cost
    per val mIoU lost (both as measured with the part cut alone) until `measure(percents)`, the real cost, is at most
    `target`; then the last part chosen is bisected to the whole percent that just meets it. (percents, cost)."""
    saved = {(row["prefix"], row["pruning_ratio"]): dense_cost - row["cost"] for row in rows}
    drop = {(row["prefix"], row["pruning_ratio"]): row["val_miou_drop"] for row in rows}
    percents = {row["prefix"]: 0 for row in rows}
    for prefix in percents:
        saved[prefix, 0], drop[prefix, 0] = 0.0, 0.0

    def merit(prefix):
        now, then = percents[prefix], percents[prefix] + RATIO_STEP
        return (saved[prefix, then] - saved[prefix, now]) / max(drop[prefix, then] - drop[prefix, now], FREE_DROP)

    while True:
        choices = [prefix for prefix, percent in percents.items() if percent + RATIO_STEP <= MAX_PART_RATIO]
        chosen = max(choices, key=merit)
        percents[chosen] += RATIO_STEP
        estimate = dense_cost - sum(saved[prefix, percent] for prefix, percent in percents.items())
        if (estimate <= target or len(choices) == 1) and measure(percents) <= target:
            break
    low, high = percents[chosen] - RATIO_STEP, percents[chosen]
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if measure({**percents, chosen: middle}) <= target else (middle, high)
    percents[chosen] = high
    return percents, measure(percents)


def plan_to_budget(model, arch, tuning, prepared, context, budget):
    """The per-part plan that meets `budget` with the least val mIoU lost (greedy over measured sensitivity and
    cost); a budget at or above the dense cost, or below every part cut by MAX_PART_RATIO, is one line."""
    parts = network_parts(model)
    probe = PlanProbe(model, tuning, prepared, context, budget)
    dense_cost = budget.cost(model)
    option = f"--target_{budget.kind}"
    refuse_unprunable(budget, dense_cost)
    floor = probe.cost({prefix: MAX_PART_RATIO for prefix in parts.values()})
    if budget.target < floor:
        raise UserError(f"{option} {budget.target:g} is below what pruning reaches: {budget.text(floor)} "
                        f"{budget.where} with every part ({', '.join(parts)}) cut by {MAX_PART_RATIO}%; give at "
                        f"least that")
    dense_miou = validation_miou(model, prepared, context.device)
    print(f"planning {option} {budget.target:g} {budget.where} (dense {budget.text(dense_cost)}, val mIoU "
          f"{100 * dense_miou:.2f}%): each part cut alone by {tuning.importance_type} at {RATIO_STEP}% steps, "
          f"no fine-tuning", flush=True)
    rows = part_sensitivity(probe, parts, dense_miou)
    percents, cost = greedy_percents(rows, dense_cost, budget.target, probe.cost)
    return {"format": PLAN_FORMAT, "version": 1, "arch": arch, "budget": dataclasses.asdict(budget),
            "importance": tuning.importance_type, "p_value": tuning.p_value, "round_to": tuning.round_to,
            "parts": {part: {"prefix": prefix, "pruning_ratio": percents[prefix]} for part, prefix in parts.items()},
            "dense": {"cost": dense_cost, "val_miou": dense_miou}, "planned_cost": cost, "sensitivity": rows}


def uniform_ratio_for(budget, model, tuning):
    """The uniform --pruning_ratio (percent, in tenths) whose network just meets `budget`: the uniform network at
    equal cost that a per-part plan is compared with. Bisected on copies cut in one step by magnitude (a cost
    depends on the widths, not on which channels go) with tuning's --global_pruning and --round_to."""
    def cost(tenths):
        return budget.cost(magnitude_cut(model, tenths / 1000, tuning.round_to, tuning.global_pruning))

    refuse_unprunable(budget, budget.cost(model))
    low, high = 0, 10 * MAX_PART_RATIO
    floor = cost(high)
    if floor > budget.target:
        raise UserError(f"--target_{budget.kind} {budget.target:g} is below what uniform pruning reaches: "
                        f"{budget.text(floor)} {budget.where} at {MAX_PART_RATIO}%; give at least that")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if cost(middle) <= budget.target else (middle, high)
    return high / 10


def read_plan(path, model, arch):
    """A plan saved beside a checkpoint (NAME_plan.json), checked against this network: one line when it is not."""
    text = Path(require_path(path, "--plan file", "file")).read_text(errors="replace")
    try:
        plan = json.loads(text)
    except ValueError as error:
        raise UserError(f"{path} is not a pruning plan ({str(error)[:60]}); pass a NAME_plan.json that "
                        f"torchvision_pruning.py wrote") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("parts"), dict):
        raise UserError(f"{path} is not a pruning plan; pass a NAME_plan.json that torchvision_pruning.py wrote")
    if plan.get("arch") != arch:
        raise UserError(f"{path} was planned for a {plan.get('arch')} network, not this {arch}; plan it again with "
                        f"--target_gmacs or --target_latency_ms")
    known = set(network_parts(model).values())
    for part, entry in plan["parts"].items():
        if not isinstance(entry, dict) or entry.get("prefix") not in known or \
                not isinstance(entry.get("pruning_ratio"), (int, float)) or not 0 <= entry["pruning_ratio"] <= 99:
            raise UserError(f"{path}: part {part!r} is no part of this network with a ratio from 0 to 99 (damaged "
                            f"or edited plan)")
    return plan


def describe_plan(plan):
    """'backbone layer1 0%, ...' : the chosen ratio of every part."""
    return ", ".join(f"{part} {entry['pruning_ratio']:g}%" for part, entry in plan["parts"].items())


def save_plan(plan, path):
    text = json.dumps(plan, indent=1)
    replace_atomically(path, lambda temporary: Path(temporary).write_text(text))


def budget_line(plan, facts, options):
    """'budget: target ..., achieved ...': the achieved cost of the pruned network against the target."""
    budget = plan["budget"]
    if budget["kind"] == "gmacs":
        achieved, unit, dense = facts["macs"] / 1e9, "GMACs", facts["dense_macs"] / 1e9
    else:
        achieved, unit, dense = 1000 * facts["latency_seconds"], "ms", 1000 * facts["dense_latency_seconds"]
    where = f"at {options.measure_size}x{options.measure_size} px" + (f" on {options.device}" if unit == "ms" else "")
    return (f"budget: target {budget['target']:g} {unit} {where}; achieved {achieved:.3f} {unit} "
            f"({100 * achieved / budget['target']:.1f}% of the target; dense {dense:.3f} {unit})")


