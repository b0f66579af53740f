"""The one checkpoint format (docs/ARCHITECTURE.md, "Checkpoints"): self-describing, pickle-free, atomic.

Also reads the older kinds of file people have: a plain state_dict (the thesis' *_weights.pth,
possibly with an 8th "boundary" output) and, only behind --allow_pickle, a whole pickled model.
"""
import os
import pickle
import re

import torch

from utils.cli import UserError
from utils.data import S2DS_CLASSES, ClassTable
from utils.distributed import unwrap
from utils.files import refuse_existing, replace_atomically
from utils.model import ARCHS, build, has_aux, output_stride, set_output_stride, tag
from utils.prune_ops import replay_pruning_history

FORMAT = "cracksense-checkpoint"
VERSION = 1


def save_atomic(obj, path):
    """torch.save through a temporary file beside `path`, then os.replace."""
    def write(temporary):
        try:
            torch.save(obj, temporary)
        except RuntimeError as error:  # torch.save reports a full disk or an unwritable file this way
            if not re.search(r"writ|open|PytorchStreamWriter", str(error)):
                raise
            raise UserError(f"cannot write {path}: {str(error).splitlines()[0]}; check free space and "
                            f"permissions (nothing was replaced)") from None

    replace_atomically(str(path), write)


def make_checkpoint(model, arch, classes=S2DS_CLASSES, pruning=None, **extra):
    """The checkpoint dict: everything needed to rebuild the network and name its outputs (the ClassTable
    `classes` as plain rows), plus training state in `extra`."""
    model = unwrap(model)
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "num_classes": classes.num_classes,
        "num_outputs": classes.num_classes,
        "classes": list(classes.names),
        "class_table": classes.rows(),
        "aux_loss": getattr(model, "aux_classifier", None) is not None,
        "output_stride": output_stride(model),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if pruning is not None:
        checkpoint["pruning"] = pruning
    checkpoint.update(extra)
    return checkpoint


def _strip_prefix(state_dict):
    """Keys saved from DataParallel/DistributedDataParallel carry a 'module.' prefix."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def infer_arch(state_dict):
    """The architecture of a plain state_dict: the ARCHS entry whose signature its keys show (a head key, a backbone
    key, and the ResNet's layer3 block count where it has one)."""
    keys = list(state_dict.keys())
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    for arch, entry in ARCHS.items():
        head, backbone, layer3 = entry.signature
        if any(k.startswith(head) for k in keys) and any(k.startswith(backbone) for k in keys) and \
                (layer3 is None or (blocks and max(blocks) + 1 == layer3)):
            return arch
    raise UserError(f"cannot tell the architecture of this state_dict (its keys match none of {', '.join(ARCHS)})")


def _num_outputs(state_dict, arch):
    """The class count of a plain state_dict: the output channels of the architecture's first head present."""
    for head in ARCHS[arch].heads:
        if f"{head}.weight" in state_dict:
            return int(state_dict[f"{head}.weight"].shape[0])
    raise UserError("cannot find the classifier weight in this state_dict")


def _from_state_dict(state_dict, source):
    state_dict = _strip_prefix(state_dict)
    arch = infer_arch(state_dict)
    outputs = _num_outputs(state_dict, arch)
    classes = S2DS_CLASSES.num_classes if outputs == S2DS_CLASSES.num_classes + 1 else outputs  # thesis' 8th
    return {
        "format": "state_dict", "version": 0, "arch": arch,
        "num_classes": classes, "num_outputs": outputs,
        "classes": list(S2DS_CLASSES.names[:classes]),
        "aux_loss": any(k.startswith("aux_classifier.") for k in state_dict),
        "model": state_dict, "source": source,
    }


def read_checkpoint(path, allow_pickle=False):
    """Any checkpoint kind as a normalised dict (format, arch, num_classes, num_outputs, model, ...).

    A pickled whole model comes back under the key "module" as well, ready to use.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.lower().endswith(".onnx"):
        raise UserError(f"{path} is an ONNX graph, not a PyTorch checkpoint: pass the .pth it was exported from "
                        f"(test.py --weights and benchmark.py take .onnx files)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():
            raise UserError(f"cannot read checkpoint {path}: not a PyTorch file, or a damaged one") from None
        if not allow_pickle:
            raise UserError(f"{path} is a pickled whole model; loading it runs code stored in the file. "
                            f"If you trust it, pass --allow_pickle") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except OSError as error:
        raise UserError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception as error:  # the unpickler fails on a damaged or foreign file in many ways (IndexError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch file, or a damaged one ({reason})") from None
    if isinstance(obj, torch.nn.Module):
        checkpoint = _from_state_dict(obj.state_dict(), path)
        checkpoint["format"] = "pickled_model"
        checkpoint["module"] = tag(obj, checkpoint["arch"])
        return checkpoint
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    if obj.get("format") == FORMAT:
        return _checked(obj, path)
    if "model" in obj and _is_state_dict(obj["model"]):
        return _from_state_dict(obj["model"], path)
    if _is_state_dict(obj):
        return _from_state_dict(obj, path)
    raise UserError(f"{path} is neither a CrackSense checkpoint nor a model state_dict")


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _checked(checkpoint, path):
    """A CrackSense checkpoint whose fields have the types the readers rely on, or a one-line refusal."""
    def refuse(problem):
        raise UserError(f"{path} is a damaged or edited checkpoint: {problem}")

    version = checkpoint.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        refuse(f"'version' is {version!r}, not an integer")
    if version > VERSION:
        raise UserError(f"{path} was written by a newer CrackSense (format version {version})")
    if checkpoint.get("arch") not in ARCHS:
        refuse(f"unknown arch {checkpoint.get('arch')!r}")
    for key in ("num_classes", "num_outputs"):
        value = checkpoint.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(f"'{key}' is {value!r}, not a positive integer")
    if not _is_state_dict(checkpoint.get("model")):
        refuse("'model' is missing or is not a dict of tensors")
    pruning = checkpoint.get("pruning")
    if pruning is not None and not (isinstance(pruning, list) and all(_is_history_entry(e) for e in pruning)):
        refuse("'pruning' is not a list of [layer name, is output channels, [indices]]")
    if "class_table" in checkpoint:
        try:
            table = ClassTable.from_rows(checkpoint["class_table"], "'class_table'")
        except UserError as error:
            refuse(str(error))
        if table.num_classes != checkpoint["num_classes"]:
            refuse(f"'class_table' has {table.num_classes} classes but 'num_classes' is {checkpoint['num_classes']}")
    return checkpoint


def checkpoint_classes(checkpoint, path="the checkpoint"):
    """The ClassTable a checkpoint (or load_model's metadata) records; S2DS's for files from before class tables
    (and thesis state_dicts), which all have its seven classes. Another class count without a table is refused."""
    if checkpoint.get("class_table"):
        return ClassTable.from_rows(checkpoint["class_table"], f"{path}: 'class_table'")
    if checkpoint.get("num_classes") == S2DS_CLASSES.num_classes:
        return S2DS_CLASSES
    raise UserError(f"{path} predicts {checkpoint.get('num_classes')} classes but records no class table (only "
                    f"S2DS's {S2DS_CLASSES.num_classes} classes are known without one); retrain it with this version")


def _is_history_entry(entry):
    return (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], bool) and isinstance(entry[2], (list, tuple))
            and all(isinstance(i, int) and not isinstance(i, bool) for i in entry[2]))


RESUME_KEYS = ("optimizer", "lr_scheduler", "epoch", "best_metric", "metrics")
# What only resuming needs; a deployed or shared file goes without it (AdamW's state alone is twice the weights).
TRAINING_STATE = ("optimizer", "lr_scheduler", "scaler", "epochs_without_improvement")


def for_deployment(checkpoint):
    """The checkpoint without its training state: the network, its metadata and its history, nothing more."""
    return {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE}


def require_resume_state(checkpoint, path):
    """A --resume needs train.py's own last.pth: refuse a file without the training state, in one line."""
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if checkpoint.get("format") != FORMAT or missing:
        raise UserError(f"{path} holds no training state to resume ({', '.join(missing) or 'not a train.py run'} "
                        f"missing); drop --resume and pass it with --load_pretrained_weights, or use --overwrite")
    if isinstance(checkpoint["epoch"], bool) or not isinstance(checkpoint["epoch"], int):
        raise UserError(f"{path} is a damaged checkpoint: 'epoch' is {checkpoint['epoch']!r}")
    return checkpoint


def build_from_checkpoint(checkpoint):
    """A network of the checkpoint's architecture (pruned if it says so), without its weights loaded."""
    model = build(checkpoint["arch"], checkpoint["num_outputs"], init="none",
                  aux_loss=checkpoint.get("aux_loss", has_aux(checkpoint["arch"])),
                  stride=checkpoint.get("output_stride"))  # absent before strides were recorded: 8
    if checkpoint.get("pruning"):
        replay_pruning_history(model, checkpoint["pruning"])
    return model


def load_weights(model, state_dict, source):
    """load_state_dict with a one-line message when the shapes or keys disagree."""
    state_dict = _strip_prefix(state_dict)
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        key = mismatched[0]
        raise UserError(f"{source} does not fit this network: {key} is {tuple(state_dict[key].shape)} there, "
                        f"{tuple(own[key].shape)} here ({len(mismatched)} tensors differ; another arch, "
                        f"class count or pruning?)")
    missing = [k for k in own if k not in state_dict and not k.startswith("aux_classifier.")]
    unexpected = [k for k in state_dict if k not in own and not k.startswith("aux_classifier.")]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(f"{source} does not fit this network: {'missing' if missing else 'unexpected'} "
                        f"key {key} ({len(missing)} missing, {len(unexpected)} unexpected)")
    model.load_state_dict(state_dict, strict=False)
    return model


def strip_for_deployment(source, target, overwrite=False):
    """Write `source` without its training state to `target` (atomically, an existing target only with
    overwrite); returns the keys dropped. Only our own format: a plain state_dict holds no training state."""
    refuse_existing([target], overwrite, "choose another OUT")
    checkpoint = read_checkpoint(source)
    if checkpoint["format"] != FORMAT:
        raise UserError(f"{source} is a plain state_dict, not a CrackSense checkpoint: it holds weights only, "
                        f"nothing to strip")
    stripped = for_deployment(checkpoint)
    save_atomic(stripped, target)
    return [key for key in checkpoint if key not in stripped]


def load_model(path, device="cpu", allow_pickle=False, stride=None):
    """(model in eval mode, metadata) from any checkpoint kind; metadata["class_table"] holds its classes' rows
    (checkpoint_classes). The network runs at the output stride its checkpoint records (8 when it records none)
    unless `stride` overrides it."""
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    checkpoint["class_table"] = checkpoint_classes(checkpoint, path).rows()
    if "module" in checkpoint:
        model = checkpoint.pop("module")
    else:
        model = load_weights(build_from_checkpoint(checkpoint), checkpoint["model"], path)
    if stride is not None:
        set_output_stride(model, stride)
    metadata = {k: v for k, v in for_deployment(checkpoint).items() if k != "model"}
    metadata.update(path=str(path), output_stride=output_stride(model))
    return model.to(device).eval(), metadata


def check_model_options(weights, pruned_model, use_pruned, weights_option="--weights"):
    """The one rule for --weights/--pruned_model/--use_pruned, checked before anything is loaded.

    W alone: a self-describing checkpoint or plain state_dict. P alone: the pruned checkpoint itself.
    W with P and --use_pruned: W's weights in P's pruned architecture (the seed's form). W with P but
    without --use_pruned is ambiguous and refused.
    """
    if use_pruned and not pruned_model:
        raise UserError("--use_pruned needs --pruned_model P.pth (the pruned architecture)")
    if not weights and not pruned_model:
        raise UserError(f"no model given: pass {weights_option} W.pth (or --pruned_model P.pth)")
    if weights and pruned_model and not use_pruned:
        raise UserError(f"{weights_option} and --pruned_model given without --use_pruned: add --use_pruned to load "
                        f"{weights_option}'s weights into the pruned architecture of --pruned_model, or pass only "
                        f"one of them")


def load_for_inference(weights=None, pruned_model=None, use_pruned=False, device="cpu", allow_pickle=False,
                       weights_option="--weights", stride=None):
    """(model in eval mode, metadata) by check_model_options' rule, for test.py, inference.py and the study;
    `stride` overrides the output stride the checkpoint records (load_model)."""
    check_model_options(weights, pruned_model, use_pruned, weights_option)
    if not pruned_model:
        return load_model(weights, device=device, allow_pickle=allow_pickle, stride=stride)
    model, metadata = load_model(pruned_model, allow_pickle=allow_pickle, stride=stride)
    if weights:
        checkpoint = read_checkpoint(weights, allow_pickle=allow_pickle)
        load_weights(model, checkpoint["model"], weights)
        metadata = {**metadata, "weights_path": str(weights)}
    return model.to(device).eval(), metadata
