"""The option groups several scripts share, declared once with one help text each (system, output, model file,
tiling, pruning, fine-tuning, measurement). Each script adds the groups it needs to its own parser; what a
script alone has stays in that script."""
from utils.cli import add_bool
from utils.finetune import FINETUNE_DEFAULTS
from utils.model import add_output_stride_option
from utils.prune_ops import importances_help
from utils.quantize import CALIBRATIONS, INT8_TARGETS, WEIGHT_SCALES, Int8Recipe
from utils.recipe import recipe_fields


def add_system_options(parser, workers=None):
    """--device, and --workers where the script loads data (`workers`: its default)."""
    group = parser.add_argument_group("system")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    if workers is not None:
        group.add_argument("--workers", type=int, default=workers, help="data-loading processes (default: %(default)s)")
    return group


def add_output_options(group, replaces=None):
    """--output_dir, and --overwrite where a script refuses to replace its outputs (`replaces`: what it replaces)."""
    group.add_argument("--output_dir", default="results", help="where every output goes (default: %(default)s)")
    if replaces is not None:
        add_bool(group, "--overwrite", False, f"replace {replaces}")


def add_allow_pickle(group):
    add_bool(group, "--allow_pickle", False, "accept a whole pickled model (unpickling runs code from the file)")


def add_trained_network_options(parser, weights_flag, weights_help):
    """The "model" group of the scripts that run a trained network: its weights under the script's seed name
    (`weights_flag`), --pruned_model/--use_pruned (utils.checkpoint's rule), --output_stride, --allow_pickle."""
    group = parser.add_argument_group("model")
    group.add_argument(weights_flag, metavar="W.pth", help=weights_help)
    group.add_argument("--pruned_model", metavar="P.pth",
                       help=f"pruned network whose architecture holds {weights_flag} (or, alone, is used)")
    add_bool(group, "--use_pruned", False, "use the architecture of --pruned_model (the seed's flag)")
    add_output_stride_option(group)
    add_allow_pickle(group)
    return group


def add_tiling_options(group, tile_help):
    """--tile (its help says when the script tiles), --stride and --tile_batch: utils.model.Tiling."""
    group.add_argument("--tile", type=int, default=None, metavar="PX", help=tile_help)
    group.add_argument("--stride", type=int, default=None, metavar="PX",
                       help="largest step between tiles; windows are spread evenly and overlaps blended "
                            "(default: 7/8 of the tile)")
    group.add_argument("--tile_batch", type=int, default=1, metavar="N",
                       help="tiles per forward: more keeps a GPU busy, costs N times the memory (default: %(default)s)")


def add_pruning_options(group, grid=False):
    """How channels are chosen; with `grid` (study.py) the criterion, norm, ratio and schedule take lists."""
    many = {"nargs": "+"} if grid else {}
    group.add_argument("--pruning_ratio", type=float, required=not grid, default=[] if grid else None,
                       metavar="PERCENT", **many,
                       help="percent of channels to remove, 1 to 99 (50 halves every prunable layer)")
    group.add_argument("--importance_type", default=["Magnitude"] if grid else "Magnitude", metavar="NAME", **many,
                       help=f"channel ranking (any case): {importances_help()} (default: Magnitude)")
    group.add_argument("--p_value", type=int, default=[2] if grid else 2, metavar="P", **many,
                       help="norm of Magnitude/LAMP/FPGM: 1 = L1, 2 = L2; the others have none (default: 2)")
    group.add_argument("--iterative_steps", type=int, default=[1] if grid else 1, metavar="N", **many,
                       help="reach the ratio in this many equal steps (default: 1)")
    add_bool(group, "--global_pruning", False, "rank channels across layers instead of removing the same share "
                                               "from each")
    group.add_argument("--round_to", type=int, default=None, metavar="N",
                       help="keep channel counts multiples of N (8 or 16 suit TensorRT and tensor cores, 32 INT8)")


def add_recipe_options(parser, not_given):
    """The training recipe's option group, one option per utils.recipe.Recipe field (its help and type from the
    field): what train.py trains with and what pruning and the study fine-tune with. Every option defaults to None
    (not given), which the run settles; `not_given` says how, in each help."""
    group = parser.add_argument_group("training recipe (utils.recipe.Recipe)", f"an option not given: {not_given}")
    for item in recipe_fields():
        default = item.default if not isinstance(item.default, tuple) else " ".join(map(str, item.default))
        group.add_argument(f"--{item.name}", default=None, help=f"{item.metadata['help']} (default: {default})",
                           **item.metadata["argparse"])
    return group


def add_finetune_options(group):
    """How long pruned networks are fine-tuned (utils.finetune.FinetuneBudget), and their BatchNorm recalibration;
    the recipe they fine-tune with is add_recipe_options'."""
    defaults = FINETUNE_DEFAULTS
    group.add_argument("--finetune_steps", type=int, default=defaults["finetune_steps"], metavar="N",
                       help="optimisation steps of fine-tuning after pruning (poly schedule over them), validated every "
                            "--finetune_val_every steps on --val_data and the best kept; 0: none (default: %(default)s)")
    group.add_argument("--finetune_minutes", type=float, default=None, metavar="M",
                       help="instead of --finetune_steps: as many steps as fit in M minutes, sized from the first "
                            "steps' measured cost")
    group.add_argument("--finetune_val_every", type=int, default=defaults["finetune_val_every"], metavar="N",
                       help="validate every N fine-tuning steps and keep the best (and the last); 0: only at the end "
                            "(default: %(default)s)")
    group.add_argument("--step_finetune_steps", type=int, default=defaults["step_finetune_steps"], metavar="N",
                       help="fine-tuning steps after each step of a schedule of several --iterative_steps but the last "
                            "(default: %(default)s)")
    group.add_argument("--bn_recalibrate", type=int, default=defaults["bn_recalibrate"], metavar="N",
                       help="after every pruning step, re-estimate BatchNorm statistics on N training batches without "
                            "gradients (needs --data; 0: off) (default: %(default)s)")
    group.add_argument("--calib_batches", type=int, default=8,
                       help="batches whose loss gradients rank channels for Taylor, fresh before every step "
                            "(default: %(default)s)")
    group.add_argument("--calib_mode", default="eval", choices=("eval", "train"),
                       help="BatchNorm while Taylor's gradients are taken: eval (running statistics, as deployed) "
                            "or train (batch statistics; the loss is then blind to the scale of a convolution "
                            "followed by BatchNorm, which weakens the ranking) (default: %(default)s)")


def add_measurement_options(group):
    """--measure_size and --latency_runs: MACs and utils.timing's latency of the deployed networks."""
    group.add_argument("--measure_size", type=int, default=512,
                       help="image side in px at which MACs and latency are measured (default: %(default)s)")
    group.add_argument("--latency_runs", type=int, default=5,
                       help="interleaved timing rounds of the deployed networks (median); 0 skips "
                            "(default: %(default)s)")


def add_int8_recipe_options(group):
    """How --int8 quantises (utils.quantize.Int8Recipe, whose defaults these are): for which runtime, weight scales,
    7-bit weights, activation calibration, convolutions kept in float."""
    default = Int8Recipe()
    group.add_argument("--int8_target", choices=tuple(INT8_TARGETS), default=default.int8_target,
                       help="where the INT8 graph will run: cpu = onnxruntime on an x86 or ARM CPU (U8S8: uint8 "
                            "asymmetric activations, int8 weights; what this project's benchmark.py, test.py and "
                            "study run, and on x86 the only INT8 faster than float32), tensorrt = a TensorRT engine, "
                            "e.g. on a Jetson (S8S8: int8 symmetric activations, zero points 0, what trtexec --int8 "
                            "takes) (default: %(default)s; docs/deployment_int8.md)")
    group.add_argument("--int8_weights", choices=WEIGHT_SCALES, default=default.int8_weights,
                       help="--int8's weight scales: one per weight tensor or one per output channel (default: "
                            "%(default)s; docs/deployment_int8.md has the measured levers)")
    add_bool(group, "--int8_reduce_range", default.int8_reduce_range,
             "--int8 with 7-bit weights: no int16 saturation in the uint8 x int8 multiply-add of x86 CPUs without "
             "VNNI (avx2 only)")
    group.add_argument("--int8_calibration", choices=tuple(CALIBRATIONS), default=default.int8_calibration,
                       help="--int8's activation ranges: the largest value seen (minmax), or clipped at onnxruntime's "
                            "99.999th percentile (percentile) or by entropy (default: %(default)s)")
    group.add_argument("--int8_float_layers", type=int, default=default.int8_float_layers, metavar="N",
                       help="keep in float the N convolutions whose quantisation alone costs the most agreement with "
                            "float32 on the calibration images, measured one at a time (one extra quantisation per "
                            "convolution: minutes for a ResNet) (default: %(default)s)")
