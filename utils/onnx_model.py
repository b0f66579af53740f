"""An ONNX graph written by export.py as a network: its onnxruntime session, the facts export.py stored in it,
and a module whose forward runs the graph.

test.py scores an ONNX file (float32, float16 or INT8) through the one evaluation loop and benchmark.py times it
in the one timing, so both need it to look like the PyTorch network it came from: image batch in, logits out.
"""
import json

import numpy as np
import torch
from torch import nn

from utils.cli import UserError

INPUT_NAME, OUTPUT_NAME = "image", "logits"
FACTS_PREFIX = "cracksense."
# What export.py writes into the graph's metadata_props (strings), so a graph describes itself without the
# checkpoint it came from: MACs are counted by PyTorch at the traced size (macs_size x macs_size).
FACT_TYPES = {"arch": str, "num_classes": int, "pruned": lambda text: text == "True", "params": int, "macs": int,
              "macs_size": int, "precision": str, "source": str}
# Stored where present, each with its (write, read) pair: the class table as JSON ([[id, name, r, g, b], ...], as
# checkpoints keep it), so test.py scores a graph of a dataset with its own classes (graphs written before it have
# S2DS's seven classes); an INT8 graph's target (utils.quantize.INT8_TARGETS: cpu or tensorrt; INT8 graphs written
# before it are S8S8 symmetric, the tensorrt recipe, and say nothing).
OPTIONAL_FACTS = {"class_table": (json.dumps, json.loads), "int8_target": (str, str)}
# How a graph's precision reads to the user where its INT8 target is known: "int8 cpu U8S8"
INT8_KINDS = {"cpu": "U8S8", "tensorrt": "S8S8"}


def is_onnx_path(path):
    return path is not None and str(path).lower().endswith(".onnx")


def facts_metadata(facts):
    """The facts as (key, text) pairs for the graph's metadata_props."""
    return ([(FACTS_PREFIX + key, str(facts[key])) for key in FACT_TYPES if key in facts]
            + [(FACTS_PREFIX + key, write(facts[key])) for key, (write, _) in OPTIONAL_FACTS.items() if key in facts])


def onnx_session(path, device="cpu"):
    """An onnxruntime session on the CUDA provider when asked for and present (on the GPU `device` names, else the
    current one: a torchrun process's own), else the CPU."""
    import onnxruntime as ort

    providers, device = ["CPUExecutionProvider"], torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        index = torch.cuda.current_device() if device.index is None else device.index
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    # onnxruntime's worker threads otherwise keep spinning after a run, taking the cores from whatever runs next:
    # a PyTorch network timed right after an ONNX graph in interleaved rounds measured 1.8x slower than itself.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def onnx_input(session, tensor):
    """The feed of one image batch, in the graph's input type (float16 graphs take float16)."""
    wanted = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    return {INPUT_NAME: tensor.detach().cpu().numpy().astype(wanted)}


def read_facts(session, path):
    """export.py's facts from a session's metadata; a graph without them is refused in one line."""
    stored = session.get_modelmeta().custom_metadata_map
    missing = [key for key in FACT_TYPES if FACTS_PREFIX + key not in stored]
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if missing or names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise UserError(f"{path} is not a graph written by this version of export.py (no {', '.join(missing) or 'image/logits'} "
                        f"facts in it); export the checkpoint again with export.py")
    facts = {key: parse(stored[FACTS_PREFIX + key]) for key, parse in FACT_TYPES.items()}
    for key, (_, read) in OPTIONAL_FACTS.items():
        if FACTS_PREFIX + key in stored:
            try:
                facts[key] = read(stored[FACTS_PREFIX + key])
            except json.JSONDecodeError:
                raise UserError(f"{path}: its {key} is damaged (not JSON); export the checkpoint again with "
                                f"export.py") from None
    if facts.get("int8_target") in INT8_KINDS:  # what test.py's and benchmark.py's rows show
        facts["precision"] = f"{facts['precision']} {facts['int8_target']} {INT8_KINDS[facts['int8_target']]}"
    return facts


def open_session(path, device="cpu"):
    """(session, facts) of an ONNX file, with one-line refusals for a missing or unreadable file."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    try:
        session = onnx_session(path, device)
    except ort_errors.NoSuchFile:
        raise UserError(f"ONNX file not found: {path}") from None
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail) as error:
        reason = str(error).splitlines()[0][:160]
        raise UserError(f"cannot read {path} as an ONNX graph ({reason}); export it again with export.py") from None
    return session, read_facts(session, path)


class OnnxNetwork(nn.Module):
    """An ONNX graph as a module: forward(image batch) -> logits tensor on the images' device, computed by
    onnxruntime. It has no parameters to train; its facts (arch, params, MACs, precision) come from the graph."""

    def __init__(self, path, device="cpu"):
        super().__init__()
        self.path = str(path)
        self.session, self.facts = open_session(path, device)
        self.input_shape = self.session.get_inputs()[0].shape  # ints, or names for the dynamic axes

    def __deepcopy__(self, memo):
        return self  # an onnxruntime session cannot be copied, and running it changes nothing in it

    def macs(self, size):
        """MACs of one image of `size` ((height, width) or a side): the count PyTorch made at export, scaled by
        the pixels (a fully convolutional network's cost grows with them; DeepLabV3's pooled ASPP branch, well
        under 1% of it, does not)."""
        height, width = (size, size) if isinstance(size, int) else size
        return round(self.facts["macs"] * height * width / self.facts["macs_size"] ** 2)

    def feed(self, images):
        """The graph's input for this batch; a batch of another size than a fixed-size graph's is refused."""
        expected = [d if isinstance(d, int) else None for d in self.input_shape]
        actual = list(images.shape)
        if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
            shape = "x".join(str(d) if isinstance(d, int) else "N" for d in self.input_shape)
            raise UserError(f"{self.path} takes images of {shape} only, got {'x'.join(map(str, actual))}: export it "
                            f"with --dynamic (or --size/--batch of these images), or pass --eval_size/--tile to match")
        return onnx_input(self.session, images)

    def run(self, feed):
        """The logits (numpy) for a prepared feed: what benchmark.py times."""
        return self.session.run([OUTPUT_NAME], feed)[0]

    def forward(self, images):
        logits = self.run(self.feed(images))
        return torch.from_numpy(logits.astype(np.float32, copy=False)).to(images.device)
