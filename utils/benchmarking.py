"""Speed and size of deployed variants side by side: benchmark.py's run. Checkpoints and ONNX graphs are timed in
interleaved rounds in one process (utils.timing), with their GFLOP/s against the same process's GEMM rate and,
with --test_data, their test scores by the one evaluation loop.

Floor 6 (docs/ARCHITECTURE.md): export.py's side is utils.deploy.
"""
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import pyplot as plt
from torch import nn
from tqdm import tqdm

from utils import data
from utils.checkpoint import checkpoint_classes, load_model
from utils.cli import UserError, default_name, device_name, options_from, plain_name, progress_enabled, require_path
from utils.distributed import DistContext
from utils.engine import EvalSettings, evaluate
from utils.deploy import LogitsOnly, export_onnx, resolved_device
from utils.files import replace_atomically
from utils.model import count_macs, fold_batchnorm
from utils.onnx_model import OUTPUT_NAME, OnnxNetwork, is_onnx_path, onnx_input, onnx_session
from utils.recipe import eval_loader
from utils.report import write_csv
from utils.timing import WARMUP, forward_times, interleaved_times, time_calls


def latency_row(label, backend, facts, seconds, batch):
    """One table row: the model's facts and its median / p90 latency per batch."""
    median = float(np.median(seconds))
    return {"model": label, "backend": backend, **facts, "median_ms": 1000 * median,
            "p90_ms": 1000 * float(np.percentile(seconds, 90)), "images_per_s": batch / median}


def unique_labels(paths):
    """Short names for the checkpoints ('demo_best' for runs/demo/best.pth), numbered where they repeat."""
    labels = [default_name(path) for path in paths]
    return [f"{label}#{labels[:index].count(label) + 1}" if labels.count(label) > 1 else label
            for index, label in enumerate(labels)]


@dataclass
class Variant:
    """One checkpoint ready to time: its facts, the deployed network on the device, its input batch and the
    classes it predicts (data.ClassTable)."""
    label: str
    facts: dict
    network: nn.Module
    image: torch.Tensor
    classes: data.ClassTable


@dataclass(frozen=True)
class VariantSpec:
    """How every variant is prepared and timed, checked when made: a batch x 3 x size x size input on `device`
    (--device's text, resolved to a torch.device then), float16 with `half` (CUDA only), channels-last memory,
    BatchNorm folded, the output stride (None: the checkpoint's) and whether a pickled model may be read."""
    size: int = 512
    batch: int = 1
    device: torch.device | str = "auto"
    half: bool = False
    channels_last: bool = False
    fold_batchnorm: bool = True
    output_stride: int | None = None
    allow_pickle: bool = False

    def __post_init__(self):
        for option, low in (("size", 32), ("batch", 1)):
            if getattr(self, option) < low:
                raise UserError(f"--{option} must be at least {low}, got {getattr(self, option)}")
        resolved_device(self)
        if self.half and self.device.type != "cuda":
            raise UserError("--half runs float16 on a CUDA GPU only; on the CPU drop --half")

    @property
    def dtype(self):
        return torch.float16 if self.half else torch.float32


def prepare_variant(path, label, spec):
    """Load a checkpoint as deployed (main-head logits only), count its MACs, fold its BatchNorms
    (spec.fold_batchnorm), move it and its input to spec.device."""
    model, metadata = load_model(path, device="cpu", allow_pickle=spec.allow_pickle, stride=spec.output_stride)
    network = LogitsOnly(model, metadata["num_classes"]).eval()
    macs, params = count_macs(network, spec.size)
    if spec.fold_batchnorm:
        fold_batchnorm(network)
    facts = {"checkpoint": str(path), "arch": metadata["arch"], "pruned": bool(metadata.get("pruning")),
             "params_m": params / 1e6, "gmacs": macs / 1e9, "size": spec.size, "batch": spec.batch,
             "device": str(spec.device), "dtype": str(spec.dtype).replace("torch.", ""),
             "channels_last": spec.channels_last, "folded_bn": spec.fold_batchnorm}
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    network = network.to(spec.device, spec.dtype).to(memory_format=memory_format)
    image = torch.randn(spec.batch, 3, spec.size, spec.size, device=spec.device, dtype=spec.dtype)
    return Variant(label, facts, network, image.contiguous(memory_format=memory_format),
                   checkpoint_classes(metadata, str(path)))


def prepare_onnx_variant(path, label, spec):
    """An ONNX file of export.py as a variant: onnxruntime runs it (on the CUDA provider for a CUDA device),
    its facts come from the graph (MACs scaled to spec.size), and a graph of another fixed size is refused now.
    The graph's own precision holds: spec's half, channels_last, fold_batchnorm and output_stride do not apply."""
    network = OnnxNetwork(path, spec.device)
    facts = {"checkpoint": str(path), "arch": network.facts["arch"], "pruned": network.facts["pruned"],
             "params_m": network.facts["params"] / 1e6, "gmacs": network.macs(spec.size) / 1e9, "size": spec.size,
             "batch": spec.batch, "device": str(spec.device), "dtype": network.facts["precision"],
             "channels_last": False, "folded_bn": True}
    image = torch.randn(spec.batch, 3, spec.size, spec.size)
    network.feed(image)
    return Variant(label, facts, network, image, checkpoint_classes(network.facts, str(path)))


def backend(variant):
    return "onnxruntime" if isinstance(variant.network, OnnxNetwork) else "pytorch"


def _onnx_calls(variants, folder, device):
    """One onnxruntime call per variant, each exported into `folder` first."""
    calls = []
    for index, variant in enumerate(variants):
        network = variant.network.to(memory_format=torch.contiguous_format)
        onnx_path = export_onnx(network, Path(folder) / f"model_{index}.onnx", variant.facts["size"],
                                variant.facts["batch"])
        session = onnx_session(onnx_path, device)
        feed = onnx_input(session, variant.image)
        calls.append(lambda session=session, feed=feed: session.run([OUTPUT_NAME], feed))
    return calls


def test_scores(variant, split, tolerance_px, device):
    """What test.py --eval_size SIZE scores for the variant on the labelled split (the one evaluation loop at its
    input size, whole images): mIoU and the crack tolerance F1 (NaN without a crack class)."""
    dataset = data.S2DSDataset(split, data.EvalTransform(variant.facts["size"]), require_labels=True)
    data.require_same_classes(variant.classes, dataset, variant.facts["checkpoint"])
    classes = variant.classes
    settings = EvalSettings(classes.num_classes, tolerance_px=tolerance_px, crack_id=classes.crack_id, progress=False)
    loader = eval_loader(dataset, variant.facts["batch"], 0, DistContext(device=torch.device(device)))
    result = evaluate(variant.network, loader, device, settings)
    tolerance = result.tolerance.compute() if result.tolerance is not None else {}
    return {"test_miou": result.confusion.compute()["mean_iou"], "crack_lt_f1": tolerance.get("lt_f1", float("nan"))}


def time_variants(variants, runs, warmup, device, onnx=False):
    """Rows of every variant (checkpoints in PyTorch and .onnx files in onnxruntime, in the same interleaved
    rounds), then with onnx=True each checkpoint exported and timed in onnxruntime."""
    batch = variants[0].facts["batch"]
    times = forward_times([v.network for v in variants], [v.image for v in variants], runs, warmup, device)
    rows = [latency_row(v.label, backend(v), v.facts, seconds, batch) for v, seconds in zip(variants, times)]
    exported = [v for v in variants if backend(v) == "pytorch"]
    if onnx and exported:
        with tempfile.TemporaryDirectory() as folder:
            times = interleaved_times(_onnx_calls(exported, folder, device), runs, warmup, torch.device("cpu"))
        rows += [latency_row(v.label, "onnxruntime", v.facts, seconds, batch) for v, seconds in zip(exported, times)]
    return rows


def print_onnx_speedups(rows):
    """One line per onnxruntime row against the first onnxruntime row (e.g. INT8 against float32), where a
    checkpoint came first (else run_benchmark's lines already say it)."""
    onnx_rows = [row for row in rows if row["backend"] == "onnxruntime"]
    if rows[0]["backend"] == "onnxruntime":
        return  # already compared with the first row, which is the first onnxruntime row
    for row in onnx_rows[1:]:
        print(f"{row['model']} ({row['dtype']}, onnxruntime): {row['speedup']:.2f}x the speed of "
              f"{onnx_rows[0]['model']} ({onnx_rows[0]['dtype']}, onnxruntime) with {1 / row['macs_ratio']:.2f}x "
              f"fewer MACs")


INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and which of the flags INT8 kernels use it has, from /proc/cpuinfo (Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "CPU model and flags: /proc/cpuinfo not readable"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    present = [flag for flag in INT8_CPU_FLAGS if flag in flags]
    absent = [flag for flag in INT8_CPU_FLAGS if flag not in flags]
    return (f"CPU: {fields.get('model name', 'unknown')}, {os.cpu_count()} logical cores; INT8-relevant flags: "
            f"{' '.join(present) or 'none'}{f' (not: {chr(32).join(absent)})' if absent else ''}")


def add_ratios(rows):
    """Parameters and MACs as fractions of the first row of the same backend, and the speed-up over it."""
    first = {}
    for row in rows:
        base = first.setdefault(row["backend"], row)
        row["params_ratio"] = row["params_m"] / base["params_m"]
        row["macs_ratio"] = row["gmacs"] / base["gmacs"]
        row["speedup"] = base["median_ms"] / row["median_ms"]
    return rows


def gemm_gflops(device, dtype=torch.float32, side=None, runs=5):
    """The machine's matrix-multiply rate (GFLOP/s of a large square GEMM, median of `runs`): the ceiling a
    convolutional network's 2 x MACs / latency is judged against, measured in the benchmark's own process."""
    side = side or (8192 if torch.device(device).type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator).to(device, dtype) for _ in range(2))
    seconds = time_calls(lambda: torch.mm(a, b), runs, 2, device)
    return 2 * side**3 / float(np.median(seconds)) / 1e9


def add_throughput(rows, gemm):
    """GFLOP/s of each row (2 x MACs per image x batch / median latency) and its fraction of the GEMM rate."""
    for row in rows:
        row["gflops"] = 2 * row["gmacs"] * row["batch"] / (row["median_ms"] / 1000)
        row["gemm_fraction"] = row["gflops"] / gemm
    return rows


def benchmark_rows(paths, spec, runs=20, warmup=WARMUP, onnx=False, scoring=None, progress=True):
    """Every checkpoint (or .onnx file) measured in one process as `spec` says, so the numbers are comparable;
    with onnx=True each checkpoint also exported and timed in onnxruntime; with scoring (test split, tolerance px)
    each file also scored on that split after the timing (test_scores). Returns rows with ratios, GFLOP/s and the
    fraction of the same process's GEMM rate (in row["gemm_gflops"])."""
    variants = [prepare_onnx_variant(path, label, spec) if is_onnx_path(path) else
                prepare_variant(path, label, spec)
                for path, label in tqdm(list(zip(paths, unique_labels(paths))), desc="loading",
                                        disable=not progress_enabled(progress), dynamic_ncols=True)]
    rows = add_ratios(time_variants(variants, runs, warmup, spec.device, onnx))
    gemm = gemm_gflops(spec.device, spec.dtype)
    for row in rows:
        row["gemm_gflops"] = gemm
    if scoring:
        for row, variant in zip(rows, variants):  # the files' rows come first, in their order
            row.update(test_scores(variant, *scoring, spec.device))
    return add_throughput(rows, gemm)


TABLE_COLUMNS = (("model", "model", "{}"), ("backend", "backend", "{}"), ("dtype", "precision", "{}"),
                 ("params_m", "params (M)", "{:.2f}"),
                 ("gmacs", "GMACs", "{:.2f}"), ("median_ms", "median ms", "{:.1f}"), ("p90_ms", "p90 ms", "{:.1f}"),
                 ("images_per_s", "images/s", "{:.2f}"), ("params_ratio", "params x", "{:.2f}"),
                 ("macs_ratio", "MACs x", "{:.2f}"), ("speedup", "speed-up", "{:.2f}"), ("gflops", "GFLOP/s", "{:.1f}"),
                 ("gemm_fraction", "of GEMM", "{:.0%}"), ("test_miou", "test mIoU", "{:.2%}"),
                 ("crack_lt_f1", "crack tol. F1", "{:.2%}"))


def format_table(rows):
    """The rows as an aligned text table, columns as in TABLE_COLUMNS (the scores where measured; a row without
    them, a checkpoint timed exported with --onnx, shows '-')."""
    columns = [column for column in TABLE_COLUMNS if any(column[0] in row for row in rows)]
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))) for line in cells)


def plot_latency_vs_macs(rows, path, title=""):
    """Median latency (bar to p90) against GMACs; the dashed line is latency proportional to MACs
    from the first model, so a point under it ran faster than its MACs promise."""
    figure, axis = plt.subplots(figsize=(7, 4.8))
    for marker, backend in zip("os^", dict.fromkeys(row["backend"] for row in rows)):
        chosen = [row for row in rows if row["backend"] == backend]
        gmacs = np.array([row["gmacs"] for row in chosen])
        median = np.array([row["median_ms"] for row in chosen])
        p90 = np.array([row["p90_ms"] for row in chosen])
        points = axis.errorbar(gmacs, median, yerr=[np.zeros_like(median), p90 - median], fmt=marker,
                               capsize=3, label=backend)
        top = max(gmacs.max(), 1e-9) * 1.1
        axis.plot([0, top], [0, top * median[0] / max(gmacs[0], 1e-9)], "--", linewidth=1,
                  color=points[0].get_color(), alpha=0.6)
        for row in chosen:
            axis.annotate(row["model"], (row["gmacs"], row["median_ms"]), textcoords="offset points",
                          xytext=(5, 4), fontsize=8)
    axis.set(xlabel="GMACs per image", ylabel="latency per batch (ms, median; bar to p90)", title=title)
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(title="dashed: latency ∝ MACs", fontsize=8, title_fontsize=8)
    figure.tight_layout()
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


def write_benchmark(rows, folder, name, title=""):
    """CSV and plot under `folder`; returns (csv, png, how many existed before)."""
    csv_path, png_path = Path(folder) / f"{name}.csv", Path(folder) / f"{name}.png"
    existed = sum(path.exists() for path in (csv_path, png_path))
    write_csv(rows, str(csv_path))
    plot_latency_vs_macs(rows, png_path, title)
    return csv_path, png_path, existed


@dataclass(frozen=True)
class BenchmarkOptions:
    """What benchmark.py's run at one size needs, checked when made: the checkpoints and .onnx files to compare, how
    each is prepared and timed (`variant`), `runs` timed rounds after `warmup`, onnx: also time each checkpoint
    exported, with test_data each file also scored on that labelled split at the variant's size (test mIoU, crack
    tolerance F1 within lt_tolerance px), and where the table goes (OUTPUT_DIR/benchmark/NAME.csv and .png)."""
    checkpoints: tuple[str, ...]
    variant: VariantSpec
    runs: int = 20
    warmup: int = WARMUP
    onnx: bool = False
    test_data: str | None = None
    lt_tolerance: int = 4
    name: str = "benchmark"
    output_dir: str = "results"

    def __post_init__(self):
        for option, low in (("runs", 1), ("warmup", 0), ("lt_tolerance", 0)):
            if getattr(self, option) < low:
                raise UserError(f"--{option} must be at least {low}, got {getattr(self, option)}")
        plain_name(self.name, "--name")
        for path in self.checkpoints:
            if not os.path.isfile(path):
                raise UserError(f"checkpoint not found: {path}")
        if self.test_data is not None:
            require_path(self.test_data, "--test_data split", "dir")
            if self.variant.batch != 1 or self.variant.half:
                raise UserError("--test_data scores float32 networks one image per forward, as test.py does: drop "
                                "--batch and --half")

    @property
    def scoring(self):
        """(split, tolerance px) for benchmark_rows, None without --test_data."""
        return (self.test_data, self.lt_tolerance) if self.test_data else None


def benchmark_runs(values):
    """One BenchmarkOptions per --size (benchmark.py's parsed option values, `size` a list), the same files each."""
    return [options_from(BenchmarkOptions, values, size=size) for size in values["size"]]


def print_size_table(options, rows):
    """The table of one size's rows with its heading and the speed-up lines."""
    spec = options.variant
    print(f"\n{device_name(spec.device)}, batch {spec.batch} x {spec.size}x{spec.size} px, "
          f"{'float16' if spec.half else 'float32'}, {options.runs} runs after {options.warmup} warm-up, "
          f"BatchNorm {'folded' if spec.fold_batchnorm else 'kept'}, torch {torch.__version__}"
          + (f"; scored on {options.test_data} at {spec.size} px as test.py --eval_size {spec.size}"
             if options.test_data else ""))
    print(format_table(rows))
    print(f"GEMM rate of this device in this process: {rows[0]['gemm_gflops']:.1f} GFLOP/s "
          f"('of GEMM' = the network's 2 x MACs / latency as a fraction of it)")
    for row in rows[1:]:
        if row["backend"] == rows[0]["backend"]:
            print(f"{row['model']}: {row['speedup']:.2f}x the speed of {rows[0]['model']} with "
                  f"{1 / row['macs_ratio']:.2f}x fewer MACs ({row['speedup'] * row['macs_ratio']:.2f} of the MACs "
                  f"reduction) and {1 / row['params_ratio']:.2f}x fewer parameters")
    print_onnx_speedups(rows)


def run_benchmark(sizes):
    """benchmark.py: for each BenchmarkOptions in `sizes` (one per --size, the same files), every checkpoint
    measured in one process and printed as a table; all rows saved as one CSV and plot."""
    first = sizes[0]
    if first.variant.device.type == "cpu":
        print(cpu_description())
    rows = []
    for options in sizes:
        spec = options.variant
        size_rows = benchmark_rows(options.checkpoints, spec, options.runs, options.warmup, options.onnx,
                                   options.scoring)
        print_size_table(options, size_rows)
        rows += size_rows
    side = "/".join(str(options.variant.size) for options in sizes)
    title = f"{device_name(first.variant.device)}, batch {first.variant.batch} x {side} px"
    csv_path, png_path, existed = write_benchmark(rows, Path(first.output_dir) / "benchmark", first.name, title)
    print(f"wrote {csv_path} and {png_path}{' (replacing the previous ones)' if existed else ''}")

