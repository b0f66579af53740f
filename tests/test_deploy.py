"""export.py (ONNX + onnxruntime parity) and benchmark.py (table, CSV, plot) on small models."""
import dataclasses
import typing

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

import benchmark
import export
from conftest import REPO, assert_user_error, run_script
from utils.checkpoint import load_model
from utils.cli import UserError, options_from
from utils.benchmarking import BenchmarkOptions, VariantSpec, add_ratios, add_throughput, benchmark_runs, format_table
from utils.deploy import ExportOptions, LogitsOnly, check_parity, parity_passed, trtexec_command


def test_export_matches_pytorch_in_onnxruntime(tmp_path, lively_mobilenet_checkpoint, capsys):
    output = tmp_path / "model.onnx"
    export.main([str(lively_mobilenet_checkpoint), "--output", str(output), "--size", "64", "--dynamic",
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "parity check passed" in printed
    assert "trtexec --onnx=model.onnx --fp16 --saveEngine=model.engine --minShapes=image:1x3x32x32" in printed

    graph = onnx.load(str(output))
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["logits"]
    model, _ = load_model(lively_mobilenet_checkpoint)
    rows = check_parity(LogitsOnly(model, 7).eval(), output, [(1, 64, 64), (2, 40, 56)])
    for row in rows:
        assert row["max_abs_diff"] < 1e-3 and row["argmax_agreement"] > 0.999, row


def test_half_export_stores_float16_and_agrees(tmp_path, lively_mobilenet_checkpoint, capsys):
    output = tmp_path / "half.onnx"
    export.main([str(lively_mobilenet_checkpoint), "--output", str(output), "--size", "64", "--half",
                 "--device", "cpu"])
    assert "parity check passed" in capsys.readouterr().out
    image_type = onnx.load(str(output)).graph.input[0].type.tensor_type
    assert image_type.elem_type == onnx.TensorProto.FLOAT16
    assert [d.dim_value for d in image_type.shape.dim] == [1, 3, 64, 64]


def test_parity_rule_float32_is_relative_to_the_logits_scale_and_float16_needs_98_percent_agreement():
    def row(diff, agreement, scale=10.0):
        return {"max_abs_diff": diff, "argmax_agreement": agreement, "max_abs_logit": scale}

    assert parity_passed([row(5e-4, 0.9995)], half=False)
    assert not parity_passed([row(3e-3, 1.0)], half=False)  # over 1e-3 + 1e-4 x 10
    assert parity_passed([row(2.15e-2, 1.0, scale=4.35e4)], half=False)  # issue 27's correct demo graph
    assert not parity_passed([row(5.0, 1.0, scale=4.35e4)], half=False)
    assert not parity_passed([row(2e-2, 1.0, scale=4.35e4), row(2e-2, 1.0)], half=False)  # each shape its own scale
    assert not parity_passed([row(0.0, 0.998)], half=False)
    assert parity_passed([row(2e-2, 0.99)], half=True)
    assert not parity_passed([row(0.0, 0.97)], half=True)


@pytest.fixture(scope="module")
def large_logit_checkpoint(lively_mobilenet_checkpoint, tmp_path_factory):
    """The lively network with its last convolution scaled by 1e4: correct logits up to about 1.3e4, on which
    float32 rounding alone differs from PyTorch by more than 1e-3."""
    checkpoint = torch.load(lively_mobilenet_checkpoint, weights_only=True)
    checkpoint["model"]["classifier.4.weight"] = checkpoint["model"]["classifier.4.weight"] * 1e4
    path = tmp_path_factory.mktemp("large") / "large.pth"
    torch.save(checkpoint, path)
    return path


def test_export_passes_a_correct_graph_with_large_logits_and_the_check_fails_a_wrong_one(large_logit_checkpoint,
                                                                                        tmp_path, capsys):
    output = tmp_path / "large.onnx"
    export.main([str(large_logit_checkpoint), "--output", str(output), "--size", "64", "--device", "cpu"])
    assert "parity check passed" in capsys.readouterr().out
    model, _ = load_model(large_logit_checkpoint)
    reference = LogitsOnly(model, 7).eval()
    rows = check_parity(reference, output, [(1, 64, 64)])
    assert rows[0]["max_abs_logit"] > 1e3 and rows[0]["max_abs_diff"] > 1e-3  # the old absolute rule failed it
    with torch.no_grad():  # a wrong graph: one class's bias off by 1% of the logits' scale
        reference.model.classifier[4].bias[1] += 0.01 * rows[0]["max_abs_logit"]
    assert not parity_passed(check_parity(reference, output, [(1, 64, 64)]), half=False)


def test_export_refuses_to_replace_an_existing_file(tmp_path, mobilenet_checkpoint):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"keep me")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export.main([str(mobilenet_checkpoint), "--output", str(output)])
    assert output.read_bytes() == b"keep me"


def test_export_of_a_missing_checkpoint_gives_one_line(tmp_path):
    result = run_script(REPO / "export.py", tmp_path / "missing.pth", "--output", tmp_path / "m.onnx")
    assert_user_error(result, "checkpoint not found")
    assert not (tmp_path / "m.onnx").exists()


def test_trtexec_line_for_a_static_graph():
    assert trtexec_command("out/r101.onnx", 512, False) == "trtexec --onnx=r101.onnx --fp16 --saveEngine=r101.engine"


def test_benchmark_prints_its_table_and_writes_csv_and_plot(tmp_path, mobilenet_checkpoint,
                                                            lively_mobilenet_checkpoint, capsys):
    benchmark.main([str(mobilenet_checkpoint), str(lively_mobilenet_checkpoint), "--size", "64", "--runs", "2",
                    "--warmup", "1", "--onnx", "--device", "cpu", "--output_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    for column in ("params (M)", "GMACs", "median ms", "p90 ms", "images/s", "MACs x", "speed-up", "GFLOP/s",
                   "of GEMM"):
        assert column in header
    assert "GEMM rate of this device in this process: " in printed
    assert "lively_mobilenet: " in printed and "x the speed of deeplabv3_mobilenet_v3_large" in printed
    table = pd.read_csv(tmp_path / "benchmark" / "benchmark.csv")
    assert list(table["backend"]) == ["pytorch", "pytorch", "onnxruntime", "onnxruntime"]
    assert (table["median_ms"] > 0).all() and (table["p90_ms"] >= table["median_ms"]).all()
    np.testing.assert_allclose(table["macs_ratio"], 1.0)
    assert table.loc[0, "speedup"] == 1.0
    assert (table["gemm_gflops"] > 0).all() and table["folded_bn"].all()
    np.testing.assert_allclose(table["gflops"] / table["gemm_gflops"], table["gemm_fraction"])
    assert (tmp_path / "benchmark" / "benchmark.png").stat().st_size > 0


def test_benchmark_table_ratios_are_against_the_first_row_of_each_backend():
    rows = [{"model": "dense", "backend": "pytorch", "params_m": 60.0, "gmacs": 100.0, "median_ms": 200.0,
             "p90_ms": 210.0, "images_per_s": 5.0, "batch": 1},
            {"model": "half", "backend": "pytorch", "params_m": 30.0, "gmacs": 50.0, "median_ms": 110.0,
             "p90_ms": 120.0, "images_per_s": 9.1, "batch": 1}]
    add_throughput(add_ratios(rows), gemm=2000.0)
    assert rows[1]["macs_ratio"] == 0.5 and rows[1]["speedup"] == pytest.approx(200 / 110)
    assert rows[0]["gflops"] == pytest.approx(1000.0) and rows[0]["gemm_fraction"] == pytest.approx(0.5)
    lines = format_table(rows).splitlines()
    assert lines[2].split()[:2] == ["half", "pytorch"] and lines[2].split()[-3:] == ["1.82", "909.1", "45%"]


@pytest.mark.parametrize("argv, fragment", [
    (["missing.pth"], "checkpoint not found: missing.pth"),
    (["CKPT", "--half", "--device", "cpu"], "--half runs float16 on a CUDA GPU only"),
    (["CKPT", "--runs", "0"], "--runs must be at least 1"),
    (["CKPT", "--size", "64", "16"], "--size must be at least 32, got 16"),
    (["CKPT", "--test_data", "MISSING"], "--test_data split not found"),
    (["CKPT", "--test_data", "SPLIT", "--batch", "2"], "--test_data scores float32 networks one image per forward"),
])
def test_benchmark_bad_inputs(tmp_path, mobilenet_checkpoint, dataset_dir, argv, fragment):
    values = {"CKPT": str(mobilenet_checkpoint), "MISSING": str(tmp_path / "nope"), "SPLIT": str(dataset_dir / "test")}
    argv = [values.get(arg, arg) for arg in argv]
    with pytest.raises(UserError, match=fragment.replace("+", r"\+")):
        benchmark.main([*argv, "--output_dir", str(tmp_path)])
    assert not (tmp_path / "benchmark").exists()


def _option_fields(spec):
    """The names options_from fills from a command line: every field, nested option dataclasses opened."""
    hints = typing.get_type_hints(spec)
    for field in dataclasses.fields(spec):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _option_fields(hints[field.name])
        else:
            yield field.name


@pytest.mark.parametrize("script, spec", [(export, ExportOptions), (benchmark, BenchmarkOptions)])
def test_every_field_of_a_scripts_options_is_one_of_its_flags(script, spec):
    """A field without a flag would silently keep its default whatever the user typed (a renamed flag, a typo)."""
    dests = {action.dest for action in script.get_args_parser()._actions}
    assert set(_option_fields(spec)) - dests == set()


def test_export_options_from_a_command_line_are_checked_once_and_frozen(tmp_path, mobilenet_checkpoint):
    args = export.get_args_parser().parse_args([str(mobilenet_checkpoint), "--output_dir", str(tmp_path),
                                                "--device", "cpu"])
    options = options_from(ExportOptions, vars(args))
    assert options.onnx_path == tmp_path / "export" / f"{mobilenet_checkpoint.stem}.onnx"
    assert options.device.type == "cpu" and options.precision == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.size = 64
    with pytest.raises(UserError, match="--size must be a multiple of 8"):
        dataclasses.replace(options, size=60)


def test_benchmark_options_build_the_variant_spec_from_the_same_flags(mobilenet_checkpoint):
    args = benchmark.get_args_parser().parse_args([str(mobilenet_checkpoint), "--size", "64", "--batch", "2",
                                                   "--channels_last", "--fold_batchnorm", "False",
                                                   "--output_stride", "16", "--device", "cpu"])
    [options] = benchmark_runs(vars(args))
    assert options.checkpoints == (str(mobilenet_checkpoint),)
    assert options.variant == VariantSpec(64, 2, "cpu", channels_last=True, fold_batchnorm=False, output_stride=16)
    two = benchmark.get_args_parser().parse_args([str(mobilenet_checkpoint), "--size", "64", "96"])
    assert [options.variant.size for options in benchmark_runs(vars(two))] == [64, 96]
    with pytest.raises(UserError, match="--batch must be at least 1"):
        VariantSpec(64, 0, "cpu")
