"""--int8_target (issue 27): the cpu recipe (uint8 asymmetric activations, int8 per-channel weights: onnxruntime's
fast x86 kernels) and the tensorrt recipe (int8 symmetric, zero points 0: what trtexec --int8 takes), the target
recorded in the graph and shown by test.py and benchmark.py, --int8_float_layers, the study's flags."""
import contextlib
import io

import numpy as np
import onnx
import pandas as pd
import pytest

import benchmark
import export
import test as test_script
from utils import quantize
from utils.cli import UserError, options_from
from utils.onnx_model import OnnxNetwork
from utils.quantize import INT8_TARGETS, Int8Recipe


def _export(checkpoint, output, *flags):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        export.main([str(checkpoint), "--output", str(output), "--size", "64", "--device", "cpu", "--quiet",
                     *map(str, flags)])
    return buffer.getvalue()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, lively_mobilenet_checkpoint, dataset_dir):
    """The lively network's INT8 graph for each target, calibrated on val (dynamic axes, for benchmark.py's sizes)."""
    folder = tmp_path_factory.mktemp("targets")
    found = {}
    for target in INT8_TARGETS:
        printed = _export(lively_mobilenet_checkpoint, folder / f"{target}.onnx", "--int8", "--int8_target", target,
                          "--calib_data", dataset_dir / "val", "--calib_images", "2", "--dynamic")
        found[target] = {"path": folder / f"{target}_int8.onnx", "printed": printed, "fp32": folder / f"{target}.onnx"}
    return found


def _quantisers(graph):
    """[(QuantizeLinear or DequantizeLinear node, zero point array, is it a weight's)] of every Q/DQ node."""
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    rows = []
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            rows.append((node, initializers[node.input[2]], node.input[0] in initializers))
    return rows


def test_the_tensorrt_graph_is_s8s8_symmetric_with_every_zero_point_0(graphs):
    graph = onnx.load(str(graphs["tensorrt"]["path"]))
    quantisers = _quantisers(graph)
    assert len(quantisers) > 20
    assert not any(zero.any() for _, zero, _ in quantisers)  # symmetric everywhere: what trtexec --int8 takes
    assert {zero.dtype for _, zero, _ in quantisers} == {np.dtype(np.int8), np.dtype(np.int32)}  # int32: biases
    assert {p.key: p.value for p in graph.metadata_props}["cracksense.int8_target"] == "tensorrt"
    printed = graphs["tensorrt"]["printed"]
    assert "S8S8 QDQ for TensorRT (trtexec --int8): int8 weights per-channel, int8 symmetric activations" in printed
    assert "trtexec --onnx=tensorrt_int8.onnx --int8 --fp16 --saveEngine=tensorrt_int8.engine" in printed


def test_the_cpu_graph_is_u8s8_uint8_asymmetric_activations_int8_per_channel_weights(graphs):
    graph = onnx.load(str(graphs["cpu"]["path"]))
    quantisers = _quantisers(graph)
    activations = [zero for _, zero, weight in quantisers if not weight]
    weights = [zero for _, zero, weight in quantisers if weight]
    assert activations and all(zero.dtype == np.uint8 for zero in activations)
    assert any(zero.any() for zero in activations)  # asymmetric: ReLU outputs use 0..255, not 0..127
    assert weights and not any(zero.any() for zero in weights)  # symmetric int8 weights (and int32 biases)
    assert {zero.dtype for zero in weights} == {np.dtype(np.int8), np.dtype(np.int32)}
    assert any(zero.ndim == 1 and zero.size > 1 for zero in weights)  # one scale per output channel by default
    assert {p.key: p.value for p in graph.metadata_props}["cracksense.int8_target"] == "cpu"
    printed = graphs["cpu"]["printed"]
    assert "U8S8 QDQ for onnxruntime on a CPU: int8 weights per-channel, uint8 asymmetric activations" in printed
    assert "trtexec --onnx=cpu_int8.onnx --int8" not in printed  # TensorRT refuses asymmetric zero points
    assert "export with --int8_target tensorrt for an INT8 engine" in printed


def test_the_cpu_recipe_is_the_default(lively_mobilenet_checkpoint, dataset_dir):
    args = export.get_args_parser().parse_args([str(lively_mobilenet_checkpoint), "--int8", "--calib_data",
                                                str(dataset_dir / "val")])
    assert options_from(Int8Recipe, vars(args)) == Int8Recipe() and Int8Recipe().int8_target == "cpu"


def test_test_py_and_benchmark_rows_show_the_target(graphs, dataset_dir, tmp_path, capsys):
    assert OnnxNetwork(graphs["cpu"]["path"]).facts["precision"] == "int8 cpu U8S8"
    test_script.main([str(dataset_dir / "test"), "--weights", str(graphs["tensorrt"]["path"]), "--name", "trt",
                      "--workers", "0", "--device", "cpu", "--output_dir", str(tmp_path), "--quiet"])
    summary = pd.read_excel(tmp_path / "test" / "trt.xlsx", sheet_name="summary").set_index("item")["value"]
    assert summary["checkpoint format"] == "onnx graph (int8 tensorrt S8S8, onnxruntime)"
    scored = pd.read_excel(tmp_path / "model_test_results.xlsx").set_index("name").loc["trt"]
    benchmark.main([str(graphs["cpu"]["fp32"]), str(graphs["cpu"]["path"]), str(graphs["tensorrt"]["path"]),
                    "--size", "64", "96", "--runs", "1", "--warmup", "0", "--device", "cpu", "--test_data",
                    str(dataset_dir / "test"), "--output_dir", str(tmp_path), "--quiet"])
    table = pd.read_csv(tmp_path / "benchmark" / "benchmark.csv")
    assert list(table["dtype"]) == ["float32", "int8 cpu U8S8", "int8 tensorrt S8S8"] * 2
    assert list(table["size"]) == [64] * 3 + [96] * 3
    tensorrt = table.iloc[2]  # scored by test.py's loop at the test images' own 64 px: test.py's numbers
    assert tensorrt["test_miou"] == pytest.approx(scored["mIoU"], abs=1e-9)
    assert tensorrt["crack_lt_f1"] == pytest.approx(scored["tolerance F1"], abs=1e-9, nan_ok=True)
    printed = capsys.readouterr().out
    assert "int8 cpu U8S8" in printed and "test mIoU" in printed and "crack tol. F1" in printed


def test_int8_float_layers_keeps_the_most_sensitive_convolutions_in_float(lively_mobilenet_checkpoint, dataset_dir,
                                                                          tmp_path, monkeypatch):
    names = quantize.convolution_names
    measured = []

    def few_candidates(path):  # every convolution is measured in the real pass; five keep the test fast
        chosen = names(path)[:4] + names(path)[-1:]
        measured.extend(chosen)
        return chosen

    monkeypatch.setattr(quantize, "convolution_names", few_candidates)
    printed = _export(lively_mobilenet_checkpoint, tmp_path / "m.onnx", "--int8", "--calib_data", dataset_dir / "val",
                      "--calib_images", "2", "--int8_float_layers", "2")
    line = next(line for line in printed.splitlines() if line.startswith("kept in float"))
    kept = line.split(": ", 1)[1].split(", ")
    assert len(kept) == 2 and set(kept) <= set(measured)
    graph = onnx.load(str(tmp_path / "m_int8.onnx"))
    producers = {output: node.op_type for node in graph.graph.node for output in node.output}
    weights = {node.name: producers.get(node.input[1], "initializer") for node in graph.graph.node
               if node.op_type == "Conv"}
    assert all(weights[name] == "initializer" for name in kept)  # float weights: these convolutions run in float
    assert sum(source == "DequantizeLinear" for source in weights.values()) == len(weights) - 2
    assert "2 most sensitive convolution(s) in float" in printed


@pytest.mark.parametrize("changes, fragment", [
    ({"int8_target": "jetson"}, "--int8_target must be one of cpu, tensorrt, got 'jetson'"),
    ({"int8_float_layers": -1}, "--int8_float_layers cannot be negative"),
])
def test_int8_recipe_refuses_bad_values(changes, fragment):
    with pytest.raises(UserError, match=fragment):
        Int8Recipe(**changes)


@pytest.mark.parametrize("flags", [["--int8_target", "tensorrt"], ["--int8_float_layers", "3"]])
def test_export_refuses_recipe_flags_without_int8(mobilenet_checkpoint, tmp_path, flags):
    with pytest.raises(UserError, match="--int8_target, --int8_weights, .* are only used with --int8"):
        export.main([str(mobilenet_checkpoint), "--output", str(tmp_path / "m.onnx"), *flags])


def test_the_study_builds_its_int8_recipe_from_the_same_flags_and_records_it(lively_mobilenet_checkpoint,
                                                                             dataset_dir, tmp_path):
    import study
    from utils.study import StudyOptions, study_settings

    args = study.get_args_parser().parse_args(
        ["--state_dict", str(lively_mobilenet_checkpoint), "--data", str(dataset_dir / "train"), "--val_data",
         str(dataset_dir / "val"), "--test_data", str(dataset_dir / "test"), "--pruning_ratio", "50", "--int8",
         "--int8_target", "tensorrt", "--int8_float_layers", "1", "--name", "int8_recipe", "--output_dir",
         str(tmp_path)])
    options = options_from(StudyOptions, vars(args))
    assert options.int8_recipe == Int8Recipe(int8_target="tensorrt", int8_float_layers=1)
    recorded = study_settings(options)["int8_recipe"]  # what study.json keeps, so a resumed study keeps its recipe
    assert recorded["int8_target"] == "tensorrt" and recorded["int8_float_layers"] == 1
