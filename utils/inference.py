"""inference.py's logic: find the photos, predict each at its full size (tiled when large), write or show outputs.

Every prediction has the photo's own height and width: small photos go through the network whole,
photos whose longer side exceeds --max_size (or every photo, when --tile is given) go through
sliding_window_logits, whose accumulator lives on the CPU so a 6000x4000 px photo fits a Jetson.
"""
import glob
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from matplotlib import pyplot as plt
from PIL import Image
from tqdm import tqdm

from utils.checkpoint import check_model_options, checkpoint_classes, load_for_inference
from utils.cli import (UserError, check_batch_memory, default_name, plain_name, progress_enabled, require_path,
                       resolve_device)
from utils.data import (IMAGE_EXTENSIONS, S2DS_CLASSES, ClassTable, encode_rgb_label, image_size, image_to_tensor,
                        list_images, read_image)
from utils.model import Tiling, fold_batchnorm, forward_logits, sliding_window_logits, strip_aux_head, tile_cost
from utils.files import replace_atomically
from utils.visualize import (class_shares, format_share, has_display, overlay_figure, save_figure,
                             side_by_side_figure, use_window_backend)

MODES = ("side_by_side", "overlay", "save_mask")
FIGURE_MODES = ("side_by_side", "overlay")
DEFAULT_TILE = 512
DEFAULT_MAX_SIZE = 1024
OUTPUT_FOLDER = "inference"


def parse_modes(values):
    """--mode values, also accepting 'side-by-side' and any case; an unknown one is a one-line error."""
    modes = []
    for value in values:
        mode = value.strip().lower().replace("-", "_")
        if mode not in MODES:
            raise UserError(f"unknown --mode {value!r}; choose from {', '.join(MODES)}")
        if mode not in modes:
            modes.append(mode)
    return modes


@dataclass(frozen=True)
class NetworkOptions:
    """The network inference.py runs, as deployed: its files by utils.checkpoint's rule (checked when made), the
    output stride override, float16 (`half`, CUDA only) and channels-last weights."""
    state_dict: str | None
    pruned_model: str | None
    use_pruned: bool
    allow_pickle: bool
    output_stride: int | None
    half: bool
    channels_last: bool

    def __post_init__(self):
        check_model_options(self.state_dict, self.pruned_model, self.use_pruned, "--state_dict")


@dataclass(frozen=True)
class InferenceOptions:
    """What inference.py's run is made of, built from its command line by cli.options_from and checked when made
    (one-line UserErrors). Normalised here and nowhere later: `mode` by parse_modes, `name` defaults to one from
    the weights file (cli.default_name: 'demo_best' from runs/demo/best.pth), so two models' outputs for one
    photo never share a file name. `tile` None tiles only photos longer than `max_size`, at DEFAULT_TILE with
    `stride`, so the tiling is not a utils.model.Tiling until a photo is tiled (`tiling()`)."""
    network: NetworkOptions
    image: str
    max_size: int
    tile: int | None
    stride: int | None
    tile_batch: int
    mode: tuple
    save_figure: bool
    show: bool | None
    alpha: float
    name: str | None
    output_dir: str
    device: str

    def __post_init__(self):
        object.__setattr__(self, "mode", tuple(parse_modes(self.mode)))
        check_batch_memory(self.tile_batch, self.tile, "--tile_batch x --tile")
        if self.stride is not None and not 0 < self.stride <= (self.tile or DEFAULT_TILE):
            raise UserError(f"--stride must be between 1 and the tile side ({self.tile or DEFAULT_TILE} px)")
        if self.max_size != 0 and self.max_size < 32:
            raise UserError(f"--max_size must be 0 (never tile on its own) or at least 32 px, got {self.max_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be between 0 and 1, got {self.alpha}")
        self.tiling()  # --tile and --tile_batch by Tiling's own rules, before any work
        network = self.network
        object.__setattr__(self, "name", plain_name(self.name or default_name(network.state_dict
                                                                             or network.pruned_model), "--name"))

    def tiling(self):
        """The windows of a tiled photo: --tile, or DEFAULT_TILE for a photo tiled for its size."""
        return Tiling(self.tile or DEFAULT_TILE, self.stride, self.tile_batch)


@dataclass(frozen=True)
class FigureStyle:
    """What every figure of one run shares: the overlay's opacity, the model's label in captions, whether
    figures are also shown in a window, and the network's classes (names and colours, from its checkpoint)."""
    alpha: float
    label: str
    show: bool
    classes: ClassTable = S2DS_CLASSES


def find_images(spec):
    """The photos named by --image: one file, every image in a folder (not recursive), or a glob pattern."""
    path = Path(spec)
    if not path.exists() and any(char in spec for char in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"no file matches --image {spec!r}")
        images = [p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise UserError(f"--image {spec!r} matches {len(matches)} file(s) but no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        return images
    require_path(spec, "image")
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"point --image at a file, a folder of photos or a pattern like 'photos/*.jpg'")
        return images
    return [path]


def output_paths(output_dir, image_path, modes, name):
    """{mode: [paths]} under OUTPUT_DIR/inference/: <stem>_<name>_<mode>.png, and for save_mask the two
    masks <stem>_<name>_mask.png and <stem>_<name>_mask_rgb.png."""
    folder = Path(output_dir) / OUTPUT_FOLDER
    stem = f"{image_path.stem}_{name}"
    paths = {}
    for mode in modes:
        if mode == "save_mask":
            paths[mode] = [folder / f"{stem}_mask.png", folder / f"{stem}_mask_rgb.png"]
        else:
            paths[mode] = [folder / f"{stem}_{mode}.png"]
    return paths


def plan_outputs(images, output_dir, modes, write_figures, name):
    """{mode: paths to write} per image (none for figures only shown), refusing a run that would
    write over an input image or write one file twice."""
    inputs = {p.resolve() for p in images}
    owner = {}
    plans = []
    for image in images:
        plan = output_paths(output_dir, image, modes, name)
        for mode, paths in plan.items():
            if mode in FIGURE_MODES and not write_figures:
                plan[mode] = []
            for path in plan[mode]:
                resolved = path.resolve()
                if resolved in inputs:
                    raise UserError(f"writing {path} would overwrite the input image; choose another --output_dir")
                if resolved in owner:
                    raise UserError(f"{owner[resolved]} and {image} would both write {path}; run them "
                                    f"separately with different --output_dir")
                owner[resolved] = image
        plans.append(plan)
    return plans


def scanned_folders(spec, images):
    """The folders --image reads as a whole: the folder itself, or each matched file's folder for a pattern; none
    for a single photo (only that file is read)."""
    path = Path(spec)
    if path.is_dir():
        return [path]
    if path.is_file():
        return []
    return sorted({image.parent for image in images})


def refuse_output_inside_input(folders, output_folder):
    """Outputs written into a folder that --image reads (or below it) would be read as photos by the next run of
    the same command, so such an output folder is refused before any work."""
    target = Path(output_folder).resolve()
    for folder in folders:
        if target == folder.resolve() or folder.resolve() in target.parents:
            raise UserError(f"the output folder {output_folder} is inside the input folder {folder}: the next run "
                            f"would read its own masks and figures as photos; choose an --output_dir outside "
                            f"{folder}")


def check_images(images):
    """Read every header before loading the model, so a bad file stops the run before any work."""
    return [image_size(path, upright=True) for path in images]


def to_batch(image, device, dtype):
    """(H,W,3) uint8 -> normalised (1,3,H,W) tensor by the dataset's own normalisation."""
    return image_to_tensor(image)[None].to(device, dtype)


def uses_tiles(height, width, tile, max_size):
    """Tiles when --tile was given, or automatically when the longer side exceeds --max_size (never
    automatically with --max_size 0: a photo that fits in memory is cheapest whole)."""
    return tile is not None or 0 < max_size < max(height, width)


@torch.no_grad()
def predict(model, image, num_classes, device, tiling=Tiling(), max_size=DEFAULT_MAX_SIZE, dtype=torch.float32):
    """Class ids (H,W uint8) of an (H,W,3) uint8 photo at its own size; whole or tiled as `tiling` says (see
    uses_tiles: a photo longer than `max_size` is tiled at DEFAULT_TILE when `tiling` gives no tile), with a
    progress bar of the tiles."""
    height, width = image.shape[:2]
    batch = to_batch(image, device, dtype)
    if not uses_tiles(height, width, tiling.tile, max_size):
        return forward_logits(model, batch, num_classes, size=(height, width)).argmax(1)[0].byte().cpu().numpy()
    if tiling.tile is None:
        tiling = replace(tiling, tile=DEFAULT_TILE)
    bar = tqdm(total=tile_cost(height, width, tiling.tile, tiling.stride)[0], desc="tiles", unit="tile", leave=False,
               disable=not progress_enabled(), dynamic_ncols=True)

    def count_tiles(_, inputs, __):  # a forward hook's return value would replace the output: return None
        bar.update(inputs[0].shape[0])

    hook = model.register_forward_hook(count_tiles)
    try:
        logits = sliding_window_logits(model, batch, num_classes, tiling, size=(height, width))
    finally:
        hook.remove()
        bar.close()
    return logits.argmax(1)[0].byte().numpy()


def save_png(array, path):
    """A uint8 array (H,W class ids or H,W,3 colours) as a lossless PNG, atomically."""
    replace_atomically(str(path), lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def display_plan(options):
    """Whether the figures of InferenceOptions `options` are shown in a window; refuses a run whose figures would
    go nowhere."""
    figures = any(mode in FIGURE_MODES for mode in options.mode)
    show = (not options.save_figure) if options.show is None else options.show
    if not figures or not show:
        return False
    if not has_display():
        raise UserError("no display to show the figures on (over SSH?): add --save_figure to write them to "
                        f"{Path(options.output_dir) / OUTPUT_FOLDER}/")
    use_window_backend()
    return True


def load_network(network, device):
    """The network of NetworkOptions `network` as deployed (eval mode, aux head dropped, BatchNorm folded,
    channels-last weights with --channels_last: activations follow the weights' layout), its metadata and its
    compute dtype."""
    if network.half and device.type != "cuda":
        raise UserError("--half runs float16 on a CUDA GPU only; on the CPU drop --half (float32 is used)")
    model, metadata = load_for_inference(network.state_dict, network.pruned_model, network.use_pruned, device,
                                         network.allow_pickle, "--state_dict", network.output_stride)
    fold_batchnorm(strip_aux_head(model).eval())
    dtype = torch.float16 if network.half else torch.float32
    memory_format = torch.channels_last if network.channels_last else torch.contiguous_format
    return model.to(dtype, memory_format=memory_format), metadata, dtype


def model_label(name, metadata):
    """'demo_best (dense)': what every figure caption and console line calls the model."""
    return f"{name} ({'pruned' if metadata.get('pruning') else 'dense'})"


def describe_tiling(height, width, tile, stride):
    """'tiled 512 px, 35 windows, 1.28x the photo's pixels': what the overlap costs."""
    count, cost = tile_cost(height, width, tile, stride)
    return f"tiled {tile} px, {count} window{'s' if count > 1 else ''}, {cost:.2f}x the photo's pixels"


def describe_model(name, metadata, device, dtype):
    """The console's model line: the name the outputs carry, and the weights file that made them."""
    if metadata.get("weights_path"):
        source = f"weights {metadata['weights_path']} in the pruned architecture of {metadata['path']}"
    else:
        source = f"weights {metadata['path']}"
    return (f"{model_label(name, metadata)} {metadata['arch']}, {source}, on {device} "
            f"({str(dtype).replace('torch.', '')})")


def write_outputs(image_path, image, ids, plan, title, style):
    """Save (and/or show, as FigureStyle `style` says) one photo's outputs, captioned with the model's label;
    returns the paths written."""
    written = []
    for mode, paths in plan.items():
        if mode == "save_mask":
            save_png(ids, paths[0])
            save_png(encode_rgb_label(ids, style.classes), paths[1])
            written += paths
            continue
        if mode == "overlay":
            figure = overlay_figure(image, ids, style.alpha, style.label, style.classes)
        else:
            figure = side_by_side_figure(image, ids, title, f"prediction: {style.label}", style.classes)
        if paths:
            save_figure(figure, paths[0])
            written += paths
        if style.show:
            figure.canvas.manager.set_window_title(f"{image_path.name} ({mode}, {style.label})")
            plt.show()
        plt.close(figure)
    return written


def run(options):
    """The whole inference run of InferenceOptions `options`; prints the model, then one line per photo with its
    time and classes."""
    images = find_images(options.image)
    plans = plan_outputs(images, options.output_dir, options.mode, options.save_figure, options.name)
    folder = Path(options.output_dir) / OUTPUT_FOLDER
    refuse_output_inside_input(scanned_folders(options.image, images), folder)
    sizes = check_images(images)
    show = display_plan(options)
    device = resolve_device(options.device)
    model, metadata, dtype = load_network(options.network, device)
    classes = checkpoint_classes(metadata, metadata["path"])
    style = FigureStyle(options.alpha, model_label(options.name, metadata), show, classes)
    print(f"model: {describe_model(options.name, metadata, device, dtype)}")
    planned = [path for plan in plans for paths in plan.values() for path in paths]
    existing = sum(path.exists() for path in planned)
    written = []
    progress = len(images) > 1
    for image_path, (width, height), plan in tqdm(list(zip(images, sizes, plans)), desc="images",
                                                  disable=not progress_enabled(progress), dynamic_ncols=True):
        image = read_image(image_path, upright=True)  # as displayed: EXIF orientation applied
        tiled = uses_tiles(height, width, options.tile, options.max_size)
        started = time.perf_counter()
        ids = predict(model, image, classes.num_classes, device, options.tiling() if tiled else Tiling(), options.max_size,
                      dtype)
        seconds = time.perf_counter() - started
        found = ", ".join(f"{name} {format_share(share)}" for _, name, share in class_shares(ids, classes))
        how = describe_tiling(height, width, options.tiling().tile, options.stride) if tiled else "whole"
        tqdm.write(f"{image_path.name}: {width}x{height} px, {how}, {seconds:.2f} s; classes: {found}")
        title = f"{image_path.name} · {width}x{height} px · {style.label} {metadata['arch']}"
        written += write_outputs(image_path, image, ids, plan, title, style)
    if written:
        replaced = f" ({existing} replaced earlier outputs of the same name)" if existing else ""
        print(f"wrote {len(written)} file(s) to {folder}/{replaced}")
