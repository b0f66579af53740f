"""ONNX graphs as first-class models: export.py --int8 (QDQ static quantisation), test.py --weights X.onnx,
benchmark.py with .onnx files beside checkpoints, and .onnx refused where a PyTorch checkpoint is required."""
import re

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

import benchmark
import export
import inference
import test as test_script
import torchvision_pruning
import train
from conftest import REPO, assert_user_error, run_script
from utils.cli import UserError
from utils.benchmarking import cpu_description
from utils.onnx_model import OnnxNetwork, onnx_session
from utils.quantize import Int8Recipe


@pytest.fixture(scope="module")
def exported(tmp_path_factory, lively_mobilenet_checkpoint, dataset_dir):
    """lively_mobilenet exported at 64 px (the test images' size): float32 and INT8 calibrated on val."""
    folder = tmp_path_factory.mktemp("onnx")
    output = folder / "lively.onnx"
    printed = _export(lively_mobilenet_checkpoint, output, "--int8", "--calib_data", dataset_dir / "val",
                      "--calib_images", "2")
    return {"fp32": output, "int8": folder / "lively_int8.onnx", "printed": printed}


def _export(checkpoint, output, *flags):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        export.main([str(checkpoint), "--output", str(output), "--size", "64", "--device", "cpu", "--quiet",
                     *map(str, flags)])
    return buffer.getvalue()


def test_int8_export_writes_a_qdq_graph_that_onnxruntime_runs(exported):
    graph = onnx.load(str(exported["int8"]))
    operators = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators
    weights = {i.name: i for i in graph.graph.initializer}
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in weights.values())
    facts = {p.key: p.value for p in graph.metadata_props}
    assert facts["cracksense.precision"] == "int8" and facts["cracksense.arch"] == "deeplabv3_mobilenet_v3_large"

    logits = onnx_session(exported["int8"]).run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert logits.shape == (1, 7, 64, 64) and np.isfinite(logits).all()
    printed = exported["printed"]
    match = re.search(r"INT8 vs float32 predictions on 2 image\(s\) of .* at 64x64: pixel agreement "
                      r"([\d.]+)% \((meets|is BELOW) the 98% target\), mIoU ([\d.]+)%", printed)
    assert match, printed
    assert 0 < float(match.group(1)) <= 100 and 0 < float(match.group(3)) <= 100
    assert "calibrated on 2 image(s)" in printed
    assert "trtexec --onnx=lively_int8.onnx --int8" not in printed  # the default cpu recipe: no TensorRT engine
    assert "lively_int8.onnx is the cpu recipe, uint8 asymmetric, which TensorRT refuses" in printed


def _scored_miou(split, weights, output_dir, name):
    test_script.main([str(split), "--weights", str(weights), "--name", name, "--workers", "0", "--device", "cpu",
                      "--output_dir", str(output_dir), "--quiet"])
    table = pd.read_excel(output_dir / "model_test_results.xlsx")
    return table.set_index("name").loc[name]


def test_test_py_scores_an_onnx_graph_like_its_checkpoint(exported, lively_mobilenet_checkpoint, dataset_dir,
                                                          tmp_path, capsys):
    split = dataset_dir / "test"
    pth = _scored_miou(split, lively_mobilenet_checkpoint, tmp_path, "pth")
    fp32 = _scored_miou(split, exported["fp32"], tmp_path, "fp32")
    int8 = _scored_miou(split, exported["int8"], tmp_path, "int8")
    assert abs(fp32["mIoU"] - pth["mIoU"]) <= 0.001  # 0.1 points
    assert fp32["mIoU"] > 0 and fp32["MACs per image (all tiles)"] == pth["MACs per image (all tiles)"]
    assert fp32["params"] == pth["params"] and fp32["checkpoint"].endswith("lively.onnx")
    assert 0 <= int8["mIoU"] <= 1 and int8["latency per image (ms)"] > 0
    summary = pd.read_excel(tmp_path / "test" / "int8.xlsx", sheet_name="summary").set_index("item")["value"]
    assert summary["checkpoint format"] == "onnx graph (int8 cpu U8S8, onnxruntime)"
    capsys.readouterr()


def test_a_graph_with_a_tampered_class_table_is_refused_in_one_line(exported, dataset_dir, tmp_path):
    graph = onnx.load(str(exported["fp32"]))
    tables = [entry for entry in graph.metadata_props if entry.key == "cracksense.class_table"]
    assert len(tables) == 1 and tables[0].value.startswith("[[0, \"background\"")  # export.py stored S2DS's table
    tables[0].value = "[[0, \"background\""
    tampered = tmp_path / "tampered.onnx"
    onnx.save(graph, str(tampered))
    result = run_script("test.py", dataset_dir / "test", "--weights", tampered, "--device", "cpu", "--workers", "0",
                        "--output_dir", tmp_path)
    assert_user_error(result, "tampered.onnx", "class_table is damaged")
    assert not (tmp_path / "test").exists()


def test_onnx_network_refuses_images_of_another_size_than_its_fixed_graph(exported):
    network = OnnxNetwork(exported["fp32"])
    assert network(torch.zeros(1, 3, 64, 64)).shape == (1, 7, 64, 64)
    with pytest.raises(UserError, match=r"takes images of 1x3x64x64 only, got 1x3x64x96: export it with --dynamic"):
        network(torch.zeros(1, 3, 64, 96))
    assert network.macs((128, 128)) == 4 * network.macs(64)


def test_benchmark_times_onnx_files_beside_checkpoints_in_one_table(exported, lively_mobilenet_checkpoint,
                                                                   tmp_path, capsys):
    benchmark.main([str(lively_mobilenet_checkpoint), str(exported["fp32"]), str(exported["int8"]), "--size", "64",
                    "--runs", "2", "--warmup", "1", "--device", "cpu", "--output_dir", str(tmp_path), "--quiet"])
    printed = capsys.readouterr().out
    assert "CPU: " in printed and "INT8-relevant flags" in printed
    assert re.search(r"lively_int8 \(int8 cpu U8S8, onnxruntime\): [\d.]+x the speed of lively \(float32, "
                     r"onnxruntime\)",
                     printed), printed
    table = pd.read_csv(tmp_path / "benchmark" / "benchmark.csv")
    assert list(table["backend"]) == ["pytorch", "onnxruntime", "onnxruntime"]
    assert list(table["dtype"]) == ["float32", "float32", "int8 cpu U8S8"]
    np.testing.assert_allclose(table["gmacs"], table.loc[0, "gmacs"])
    assert (table["median_ms"] > 0).all()


def test_benchmark_refuses_an_onnx_graph_of_another_size(exported, tmp_path):
    with pytest.raises(UserError, match="takes images of 1x3x64x64 only"):
        benchmark.main([str(exported["fp32"]), "--size", "96", "--runs", "1", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("flags, fragment", [
    (["--int8"], "--int8 needs --calib_data SPLIT"),
    (["--calib_data", "SPLIT"], "--calib_data is only used with --int8"),
    (["--int8", "--calib_data", "SPLIT", "--half"], "--int8 and --half are two different graphs"),
    (["--int8", "--calib_data", "SPLIT", "--opset", "12"], "--int8 needs --opset 13 or later"),
    (["--int8", "--calib_data", "SPLIT", "--calib_images", "0"], "--calib_images must be at least 1"),
    (["--int8", "--calib_data", "MISSING"], "--calib_data split not found"),
    (["--int8_weights", "per_tensor"], "--int8_weights, --int8_reduce_range, --int8_calibration and"),
    (["--int8_reduce_range"], "--int8_reduce_range, --int8_calibration and --int8_float_layers are only used with"),
    (["--int8_calibration", "percentile"], "--int8_float_layers are only used with --int8"),
])
def test_export_int8_bad_inputs(mobilenet_checkpoint, dataset_dir, tmp_path, flags, fragment):
    flags = [str(dataset_dir / "val") if f == "SPLIT" else str(tmp_path / "nope") if f == "MISSING" else f
             for f in flags]
    with pytest.raises(UserError, match=re.escape(fragment)):
        export.main([str(mobilenet_checkpoint), "--output", str(tmp_path / "m.onnx"), *flags])
    assert not (tmp_path / "m.onnx").exists()


def test_export_int8_without_calibration_images_gives_one_line(mobilenet_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    (empty / "Images").mkdir(parents=True)
    result = run_script(REPO / "export.py", mobilenet_checkpoint, "--output", tmp_path / "m.onnx", "--size", "32",
                        "--int8", "--calib_data", empty, "--device", "cpu")
    assert_user_error(result, "holds no images")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m_int8.onnx").exists()  # refused before export


def test_export_int8_refuses_a_split_smaller_than_the_graphs_batch(mobilenet_checkpoint, dataset_dir, tmp_path):
    with pytest.raises(UserError, match="holds 2 image\\(s\\), fewer than the graph's batch of 4"):
        export.main([str(mobilenet_checkpoint), "--output", str(tmp_path / "m.onnx"), "--size", "32", "--batch", "4",
                     "--int8", "--calib_data", str(dataset_dir / "val"), "--device", "cpu", "--quiet"])
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m_int8.onnx").exists()


def test_export_int8_refuses_to_replace_an_existing_int8_file(mobilenet_checkpoint, dataset_dir, tmp_path):
    (tmp_path / "m_int8.onnx").write_bytes(b"keep me")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export.main([str(mobilenet_checkpoint), "--output", str(tmp_path / "m.onnx"), "--int8", "--calib_data",
                     str(dataset_dir / "val")])
    assert (tmp_path / "m_int8.onnx").read_bytes() == b"keep me" and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--amp"], "is an ONNX graph: it is scored as exported, without --amp"),
    (["--pruned_model", "P", "--use_pruned"], "without --pruned_model"),
])
def test_test_py_refuses_options_an_onnx_graph_cannot_take(exported, mobilenet_checkpoint, dataset_dir, tmp_path,
                                                          flags, fragment):
    flags = [str(mobilenet_checkpoint) if f == "P" else f for f in flags]
    with pytest.raises(UserError, match=re.escape(fragment)):
        test_script.main([str(dataset_dir / "test"), "--weights", str(exported["fp32"]), *flags,
                          "--output_dir", str(tmp_path)])


def test_test_py_refuses_an_onnx_file_that_is_not_from_export(dataset_dir, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    result = run_script(REPO / "test.py", dataset_dir / "test", "--weights", garbage, "--output_dir", tmp_path,
                        "--workers", "0", "--device", "cpu")
    assert_user_error(result, "cannot read", "as an ONNX graph")
    assert not (tmp_path / "test" / "garbage.xlsx").exists()


@pytest.mark.parametrize("script, argv", [
    (train, ["TRAIN", "VAL", "run", "--load_pretrained_weights", "ONNX", "--arch", "deeplabv3_mobilenet_v3_large",
             "--epochs", "1", "--workers", "0", "--device", "cpu"]),
    (torchvision_pruning, ["--state_dict", "ONNX", "--pruning_ratio", "10", "--device", "cpu"]),
    (inference, ["--state_dict", "ONNX", "--image", "IMAGE", "--save_figure", "--device", "cpu"]),
    (export, ["ONNX", "--output", "OUT"]),
])
def test_onnx_where_a_checkpoint_is_required_is_refused(exported, dataset_dir, tmp_path, script, argv):
    values = {"TRAIN": dataset_dir / "train", "VAL": dataset_dir / "val", "ONNX": exported["fp32"],
              "IMAGE": next((dataset_dir / "test" / "Images").iterdir()), "OUT": tmp_path / "again.onnx"}
    argv = [str(values.get(arg, arg)) for arg in argv] + ["--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="is an ONNX graph, not a PyTorch checkpoint: pass the .pth"):
        script.main(argv)


def test_onnx_as_a_training_checkpoint_exits_2_with_one_line(exported, dataset_dir, tmp_path):
    result = run_script(REPO / "train.py", dataset_dir / "train", dataset_dir / "val", "run",
                        "--load_pretrained_weights", exported["fp32"], "--arch", "deeplabv3_mobilenet_v3_large",
                        "--epochs", "1", "--workers", "0", "--device", "cpu", "--output_dir", tmp_path)
    assert_user_error(result, "is an ONNX graph, not a PyTorch checkpoint")


def test_cpu_description_names_the_model_and_the_int8_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    text = cpu_description(cpuinfo)
    assert "Test CPU 9000" in text and "flags: avx2 avx512f avx512_vnni (not: avx_vnni amx_int8)" in text


# --- how --int8 quantises: the recipe's options reach the written graph ------------------------------------

@pytest.fixture(scope="module")
def per_tensor_7bit(lively_mobilenet_checkpoint, dataset_dir, tmp_path_factory):
    """The lively network quantised with one scale per weight tensor, 7-bit weights and percentile-clipped
    activation ranges (the default graph of `exported` has one scale per output channel at full 8-bit range and
    MinMax ranges)."""
    output = tmp_path_factory.mktemp("recipes") / "tensors.onnx"
    printed = _export(lively_mobilenet_checkpoint, output, "--int8", "--calib_data", dataset_dir / "val",
                      "--calib_images", "2", "--int8_weights", "per_tensor", "--int8_reduce_range",
                      "--int8_calibration", "percentile")
    return {"graph": onnx.load(str(output.with_name("tensors_int8.onnx"))), "printed": printed}


def _conv_weights(graph):
    """(int8 weight, its scale) of every convolution: a quantised weight reaches its Conv through a
    DequantizeLinear whose inputs are the int8 tensor and its scale."""
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    pairs = []
    for conv in (node for node in graph.graph.node if node.op_type == "Conv"):
        dequantize = producers[conv.input[1]]
        assert dequantize.op_type == "DequantizeLinear", conv.name
        pairs.append((initializers[dequantize.input[0]], initializers[dequantize.input[1]]))
    return pairs


def test_int8_weights_per_channel_by_default_and_per_tensor_with_7_bits_on_request(exported, per_tensor_7bit):
    default = _conv_weights(onnx.load(str(exported["int8"])))
    tensors = _conv_weights(per_tensor_7bit["graph"])
    assert default and all(scale.shape == (weight.shape[0],) for weight, scale in default)  # one per output channel
    assert tensors and all(scale.ndim == 0 for _, scale in tensors)  # one scale per weight tensor
    assert all(weight.dtype == np.int8 for weight, _ in default + tensors)
    widest = {name: max(int(np.abs(weight.astype(np.int32)).max()) for weight, _ in pairs)
              for name, pairs in (("default", default), ("tensors", tensors))}
    assert widest["default"] == 127 and widest["tensors"] <= 64  # --int8_reduce_range: 7-bit weights
    assert ("int8: U8S8 QDQ for onnxruntime on a CPU: int8 weights per-channel, uint8 asymmetric activations, MinMax "
            "calibration" in exported["printed"])
    assert ("int8: U8S8 QDQ for onnxruntime on a CPU: 7-bit (reduced range) int8 weights per-tensor, uint8 asymmetric "
            "activations, Percentile calibration" in per_tensor_7bit["printed"])
    assert re.search(r"pixel agreement [\d.]+% \((meets|is BELOW) the 98% target\)", per_tensor_7bit["printed"])


def _activation_scales(graph):
    """{tensor: scale} of every QuantizeLinear of an activation (a tensor no initializer holds)."""
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    return {node.input[0]: float(initializers[node.input[1]]) for node in graph.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in initializers}


def test_percentile_calibration_clips_activation_ranges_below_minmax(exported, per_tensor_7bit):
    minmax = _activation_scales(onnx.load(str(exported["int8"])))
    percentile = _activation_scales(per_tensor_7bit["graph"])
    shared = set(minmax) & set(percentile)
    assert len(shared) > 10
    assert all(percentile[name] <= minmax[name] * (1 + 1e-6) for name in shared)
    # with 2 calibration images of 64 px the 99.999th percentile is the largest value for most tensors, not all
    assert any(percentile[name] < 0.99 * minmax[name] for name in shared)


def test_export_int8_weights_bad_value_exits_2_with_one_line(mobilenet_checkpoint, dataset_dir, tmp_path):
    result = run_script(REPO / "export.py", mobilenet_checkpoint, "--output", tmp_path / "m.onnx", "--int8",
                        "--calib_data", dataset_dir / "val", "--int8_weights", "per_row")
    assert_user_error(result, "--int8_weights", "invalid choice: 'per_row'")
    assert not (tmp_path / "m.onnx").exists()


def test_int8_recipe_is_checked_when_made():
    assert Int8Recipe() == Int8Recipe("cpu", "per_channel", False, "minmax", 0)
    with pytest.raises(UserError, match="--int8_weights must be one of per_tensor, per_channel, got 'per_row'"):
        Int8Recipe(int8_weights="per_row")
    with pytest.raises(UserError, match="--int8_calibration must be one of minmax, percentile, entropy"):
        Int8Recipe(int8_calibration="kl")
