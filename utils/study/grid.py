"""The study's grid: its variants (criterion x norm x ratio x schedule, and the budgets of --target_gmacs), their
names, and the seeds each runs with.

Floor 4 (docs/ARCHITECTURE.md): plain values only; what a criterion needs comes from utils.prune_ops' IMPORTANCES.
"""
import math
from dataclasses import dataclass

from utils.cli import UserError
from utils.prune_ops import importance_name, importance_spec, ratio_fraction

DENSE, TWIN = "dense", "dense_finetuned"
INT8 = "_int8"  # the suffix of a variant's INT8 row, before _seed<S>
ONNX = "_onnx"  # ... and of its float32 graph's row: INT8's control, the same runtime without quantisation
ONNX_FLOAT = "float32 (onnxruntime)"  # that row's precision; "float32" alone is the PyTorch checkpoint


@dataclass(frozen=True)
class Variant:
    """One cell of the grid: criterion, norm (None where the criterion has none), percent removed, steps; or, for
    a --target_gmacs value, that budget met by a per-part plan (budgeted) or by the uniform ratio of equal GMACs
    (ratio None: found when the study runs)."""
    importance: str
    p_value: int | None
    ratio: float | None
    steps: int
    target_gmacs: float | None = None
    budgeted: bool = False

    @property
    def name(self):
        norm = f"_l{self.p_value}" if self.p_value is not None else ""
        amount = (f"{self.ratio:g}pct" if self.target_gmacs is None else
                  f"{self.target_gmacs:g}gmacs_{'budgeted' if self.budgeted else 'uniform'}")
        return f"{self.importance.lower()}{norm}_{amount}_{self.steps}step"

    @property
    def family(self):
        """The line it belongs to in study.png: criterion, norm and schedule (budgeted plans on a line of their
        own; the uniform network of a budget's GMACs on its criterion's uniform line)."""
        norm = f" L{self.p_value}" if self.p_value is not None else ""
        return (f"{self.importance}{norm}{', budgeted' if self.budgeted else ''}, "
                f"{self.steps} step{'s' if self.steps > 1 else ''}")

    @property
    def budget_key(self):
        """Where the study keeps what it found for a budget: the uniform ratio of equal GMACs (one per budget), or
        the per-part plan (one per budget and criterion); None for a plain ratio."""
        if self.target_gmacs is None:
            return None
        norm = f" L{self.p_value}" if self.p_value is not None else ""
        return f"{self.importance}{norm} plan @ {self.target_gmacs:g}" if self.budgeted else \
            f"uniform @ {self.target_gmacs:g}"


def run_name(variant_name, seed):
    """The manifest key and checkpoint stem of one (variant, seed): 'magnitude_l2_30pct_1step_seed1'."""
    return f"{variant_name}_seed{seed}"


def check_seeds(seeds):
    """Distinct, non-negative seeds: a repeated one would count the same run twice in the spread."""
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise UserError(f"--seeds repeats {repeated[0]}: each seed runs every variant once, so a repeat would count "
                        f"one run twice in the spread; give distinct seeds (e.g. --seeds 1 2 3)")
    if any(seed < 0 for seed in seeds):
        raise UserError(f"--seeds must be non-negative integers, got {min(seeds)}")
    return list(seeds)


def variant_grid(importance_type, p_value, pruning_ratio, iterative_steps, target_gmacs=()):
    """The variants in the order they run, each checked; a bad value or an empty grid is a one-line UserError.
    Each --target_gmacs value adds, per criterion and schedule, the budget met by uniform pruning and by a plan."""
    criteria = list(dict.fromkeys(importance_name(name) for name in importance_type))
    for ratio in pruning_ratio:
        ratio_fraction(ratio)
        if ratio == 0:
            raise UserError("--pruning_ratio 0 prunes nothing; the dense rows are in the study anyway")
    bad_targets = [target for target in target_gmacs if not 0 < target < math.inf]  # NaN too
    if bad_targets:
        raise UserError(f"--target_gmacs must be a positive number of GMACs, got {bad_targets[0]:g}")
    for option, values in (("p_value", p_value), ("iterative_steps", iterative_steps)):
        bad = [value for value in values if value < 1]
        if bad:
            raise UserError(f"--{option} must be at least 1, got {bad[0]}")
    norms = list(dict.fromkeys(p_value))
    controls = [name for name in criteria if importance_spec(name).control]
    if controls and len(norms) > 1:
        raise UserError(f"--importance_type {controls[0]} has no norm, so a --p_value sweep "
                        f"({' '.join(map(str, norms))}) gives its control no matching rows; sweep the norm without "
                        f"{controls[0]}, or give one --p_value")
    grid = []
    for importance in criteria:
        for p in (norms if importance_spec(importance).uses_p_value else [None]):
            for steps in dict.fromkeys(iterative_steps):
                grid += [Variant(importance, p, float(ratio), steps) for ratio in dict.fromkeys(pruning_ratio)]
                grid += [Variant(importance, p, None, steps, float(target), budgeted)
                         for target in dict.fromkeys(target_gmacs) for budgeted in (False, True)]
    if not grid:
        raise UserError("the grid is empty: give at least one --importance_type and --iterative_steps, and a "
                        "--pruning_ratio or a --target_gmacs")
    return grid
