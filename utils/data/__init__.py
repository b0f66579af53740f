"""S2DS data: the class table, label decoding, the split dataset and its joint transforms.

Model-free: imports no model code (docs/ARCHITECTURE.md, floor 1). The dataset commands
(check, rgb2gray, prepare) live in utils/data/__main__.py. The class order is the one the published thesis code wrote
into Labels_grayscale, so existing grayscale labels and 8-output weights stay valid.
"""
import contextlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from utils.cli import UserError, progress_enabled

# id, name, colour in Labels_RGB (docs/ARCHITECTURE.md, "Data")
CLASSES = (
    (0, "background", (0, 0, 0)),
    (1, "control_point", (0, 0, 255)),
    (2, "vegetation", (0, 255, 0)),
    (3, "efflorescence", (0, 255, 255)),
    (4, "corrosion", (255, 255, 0)),
    (5, "spalling", (255, 0, 0)),
    (6, "crack", (255, 255, 255)),
)
CLASS_NAMES = tuple(name for _, name, _ in CLASSES)
PALETTE = np.array([colour for _, _, colour in CLASSES], dtype=np.uint8)
NUM_CLASSES = len(CLASSES)
CRACK_ID = CLASS_NAMES.index("crack")
BACKGROUND_ID = CLASS_NAMES.index("background")
IGNORE_INDEX = 255

IMAGE_DIR = "Images"
GRAY_DIR = "Labels_grayscale"
RGB_DIR = "Labels_RGB"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

CLASSES_FILE = "classes.csv"
CRACK, BACKGROUND = "crack", "background"
_SNAP_THRESHOLD = 128
_UNKNOWN = -1


@dataclass(frozen=True)
class ClassTable:
    """The classes of a dataset (ids 0..N-1 in order): names and Labels_RGB colours, each channel 0 or 255 so
    that a colour snapped at 128 per channel (JPEG-damaged labels too) names one class. Metrics for cracks apply
    to the class named `crack`; a table without one has none. Stored in checkpoints as plain rows."""
    names: tuple
    colours: tuple

    def __post_init__(self):
        if not 2 <= len(self.names) <= 8 or len(self.colours) != len(self.names):
            raise UserError(f"a class table needs 2 to 8 classes, each with a colour; got {len(self.names)} names "
                            f"and {len(self.colours)} colours")
        if len(set(self.names)) != len(self.names) or not all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in self.names):
            raise UserError(f"class names must be distinct lowercase words (letters, digits, _): {list(self.names)}")
        if any(len(c) != 3 or any(v not in (0, 255) for v in c) for c in self.colours) or \
                len(set(map(tuple, self.colours))) != len(self.colours):
            raise UserError(f"class colours must be distinct and use 0 or 255 per channel (labels are decoded by "
                            f"snapping each channel at 128): {[tuple(c) for c in self.colours]}")

    @property
    def num_classes(self):
        return len(self.names)

    @property
    def palette(self):
        return np.array(self.colours, dtype=np.uint8)

    @property
    def crack_id(self):
        """The id of the class named crack, or None (crack metrics are then left out)."""
        return self.names.index(CRACK) if CRACK in self.names else None

    @property
    def background_id(self):
        return self.names.index(BACKGROUND) if BACKGROUND in self.names else None

    def rows(self):
        """[[id, name, r, g, b], ...]: classes.csv's rows, and what a checkpoint stores (plain, weights_only)."""
        return [[index, name, *map(int, colour)] for index, (name, colour) in enumerate(zip(self.names, self.colours))]

    @classmethod
    def from_rows(cls, rows, source="class table"):
        """The table of `rows` ([id, name, r, g, b], ids 0..N-1 in order); a bad table is a one-line error."""
        try:
            rows = sorted(([int(r[0]), str(r[1]).strip(), tuple(int(v) for v in r[2:5])] for r in rows),
                          key=lambda row: row[0])
        except (TypeError, ValueError, IndexError):
            raise UserError(f"{source}: every row must be id,name,R,G,B with integer id and colour") from None
        if [row[0] for row in rows] != list(range(len(rows))):
            raise UserError(f"{source}: class ids must be 0, 1, 2, ... without gaps, got {[row[0] for row in rows]}")
        try:
            return cls(tuple(row[1] for row in rows), tuple(row[2] for row in rows))
        except UserError as error:
            raise UserError(f"{source}: {error}") from None

    def code_to_id(self):
        """Snapped 3-bit colour code (r*4 + g*2 + b) -> class id (-1: no class has that colour)."""
        table = np.full(8, _UNKNOWN, dtype=np.int16)
        for index, (r, g, b) in enumerate(self.colours):
            table[(r >= _SNAP_THRESHOLD) * 4 + (g >= _SNAP_THRESHOLD) * 2 + (b >= _SNAP_THRESHOLD)] = index
        return table


def require_same_classes(network_classes, split, network):
    """Refuse a split (a dataset with .classes and .root) whose class table is not the network's (`network` names
    it): its outputs would mean other classes."""
    if split.classes != network_classes:
        raise UserError(f"{network} predicts {network_classes.num_classes} classes ({', '.join(network_classes.names)}) "
                        f"but {split.root} has {split.classes.num_classes} ({', '.join(split.classes.names)}); use "
                        f"data of the network's classes")


S2DS_CLASSES = ClassTable(CLASS_NAMES, tuple(colour for _, _, colour in CLASSES))


def read_class_table(split_dir):
    """The classes of the dataset that holds `split_dir`: classes.csv (columns id,name,R,G,B) in the folder that
    holds train/val/test (or in the split itself), S2DS's seven classes when there is none."""
    for folder in (Path(split_dir), Path(split_dir).parent):
        path = folder / CLASSES_FILE
        if path.is_file():
            try:
                lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as error:
                raise DatasetError(f"cannot read {path}: {error}") from None
            header = [cell.strip().lower() for cell in lines[0].split(",")] if lines else []
            if header != ["id", "name", "r", "g", "b"]:
                raise DatasetError(f"{path} must start with the header id,name,R,G,B")
            return ClassTable.from_rows([line.split(",") for line in lines[1:]], str(path))
    return S2DS_CLASSES


def write_class_table(classes, split_parent):
    """classes.csv of `classes` in the folder that holds a dataset's splits."""
    text = "id,name,R,G,B\n" + "".join(",".join(map(str, row)) + "\n" for row in classes.rows())
    (Path(split_parent) / CLASSES_FILE).write_text(text, encoding="utf-8")

class DatasetError(UserError):
    """A dataset problem that names the file at fault."""

def list_images(folder):
    """Image files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

def read_image(path, upright=False):
    """An RGB uint8 array; an unreadable or too large file is a DatasetError naming it. `upright` applies the
    EXIF orientation, so a phone photo comes as it is displayed (labelled S2DS images are read as stored)."""
    try:
        with Image.open(path) as image:
            return np.array((ImageOps.exif_transpose(image) if upright else image).convert("RGB"))
    except Image.DecompressionBombError as error:
        raise DatasetError(f"image {path} is too large to open safely ({error}); scale it down first") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None

_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height

def image_size(path, upright=False):
    """(width, height) from the file header, without decoding the pixels; as displayed when `upright`."""
    try:
        with Image.open(path) as image:
            turned = upright and image.getexif().get(_EXIF_ORIENTATION) in _TURNED
            return image.size[::-1] if turned else image.size
    except Image.DecompressionBombError as error:
        raise DatasetError(f"image {path} is too large to open safely ({error}); scale it down first") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None

def decode_rgb_label(rgb, source="label", classes=S2DS_CLASSES):
    """Class ids from an RGB label, each channel snapped at 128 (a 0/255 binary mask reads as background/crack
    under a table whose crack is white); colours of no class are an error."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DatasetError(f"RGB label {source} is not a colour image")
    bits = (rgb[..., :3] >= _SNAP_THRESHOLD).astype(np.uint8)
    ids = classes.code_to_id()[bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]]
    unknown = ids == _UNKNOWN
    if unknown.any():
        y, x = np.argwhere(unknown)[0]
        colour = tuple(int(c) for c in rgb[y, x, :3])
        raise DatasetError(f"unknown label colour {colour} at pixel (x={x}, y={y}) in {source} "
                           f"({int(unknown.sum())} such pixels); known colours: "
                           + ", ".join(f"{n} {tuple(c)}" for n, c in zip(classes.names, classes.colours)))
    return ids.astype(np.uint8)

def encode_rgb_label(ids, classes=S2DS_CLASSES):
    """The Labels_RGB colours of a class-id array (ignore shown as black)."""
    safe = np.where(ids < classes.num_classes, ids, 0)
    return classes.palette[safe]

def read_label(path, rgb=None, classes=S2DS_CLASSES):
    """Class ids (uint8, 255 = ignore) of `classes` from a label file, checked.

    rgb=None decides by folder: files under Labels_RGB/ are decoded by colour, others read as ids.
    """
    path = Path(path)
    if rgb is None:
        rgb = path.parent.name == RGB_DIR
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB") if rgb else image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read label {path}: {error}") from None
    if rgb:
        return decode_rgb_label(array, path, classes)
    if array.ndim == 3:
        raise DatasetError(f"grayscale label {path} has colour channels; put it under {RGB_DIR}/ "
                           f"or convert it with: python -m utils.data rgb2gray SPLIT_DIR")
    bad = (array >= classes.num_classes) & (array != IGNORE_INDEX)
    if bad.any():
        values = sorted(int(v) for v in np.unique(array[bad]))[:5]
        hint = f"; a 0/255 binary mask belongs under {RGB_DIR}/ (white = crack)" if 255 in values or \
            set(values) == {255} else ""
        raise DatasetError(f"label {path} has class ids {values} out of range 0-{classes.num_classes - 1} "
                           f"(255 = ignore){hint}")
    return array.astype(np.uint8)

@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path | None

    @property
    def name(self):
        return self.image.stem

def label_stem(path):
    """A label's image stem: S2DS release labels are named NNN_lab.png."""
    return re.sub(r"_lab$", "", path.stem)

def find_samples(split_dir, require_labels=True, problems=None):
    """Pair Images/ with Labels_grayscale/ (preferred) or Labels_RGB/ by file stem, checking sizes.

    A pairing or size problem raises DatasetError; when a `problems` list is given it is appended
    there instead and the sample is skipped, so a check can report every problem at once.
    """
    def refuse(message):
        if problems is None:
            raise DatasetError(message)
        problems.append(message)

    split = Path(split_dir)
    if not split.is_dir():
        raise DatasetError(f"dataset folder not found: {split}")
    image_dir = split / IMAGE_DIR
    if not image_dir.is_dir():
        raise DatasetError(f"{split} has no {IMAGE_DIR}/ folder; a split holds {IMAGE_DIR}/ and "
                           f"{GRAY_DIR}/ or {RGB_DIR}/")
    images = list_images(image_dir)
    if not images:
        raise DatasetError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    label_dir = next((split / d for d in (GRAY_DIR, RGB_DIR) if (split / d).is_dir()), None)
    if label_dir is None:
        if require_labels:
            raise DatasetError(f"{split} has no labels: expected {GRAY_DIR}/ or {RGB_DIR}/ beside {IMAGE_DIR}/")
        return [Sample(p, None) for p in images]
    labels = {}
    for path in list_images(label_dir):
        labels.setdefault(label_stem(path), path)
    for stem in sorted(set(labels) - {p.stem for p in images}):
        refuse(f"label {labels[stem]} has no image in {image_dir} (files are paired by name)")
    samples = []
    for image in images:
        label = labels.get(image.stem)
        if label is None:
            refuse(f"image {image} has no label in {label_dir} (files are paired by name)")
            continue
        try:
            if image_size(image) != image_size(label):
                refuse(f"size mismatch: image {image} is {image_size(image)} but label {label} is "
                       f"{image_size(label)}")
                continue
        except DatasetError as error:
            refuse(str(error))
            continue
        samples.append(Sample(image, label))
    return samples


def boundary_ignore(mask, width, classes=S2DS_CLASSES):
    """Set a band of `width` px around areal defects (classes other than background and crack) to ignore, as the
    S2DS authors do."""
    if width <= 0:
        return mask
    tensor = torch.as_tensor(mask)
    areal = tensor != IGNORE_INDEX
    for special in (classes.background_id, classes.crack_id):
        if special is not None:
            areal &= tensor != special
    areal = areal.float()[None, None]
    kernel = 2 * width + 1
    grown = F.max_pool2d(areal, kernel, stride=1, padding=width)
    shrunk = -F.max_pool2d(-areal, kernel, stride=1, padding=width)
    band = (grown - shrunk)[0, 0].bool()
    out = tensor.clone()
    out[band] = IGNORE_INDEX
    return out if isinstance(mask, torch.Tensor) else out.numpy()

class S2DSDataset(torch.utils.data.Dataset):
    """One split folder; returns (image float tensor, mask long tensor, index)."""

    def __init__(self, split_dir, transform=None, require_labels=True, boundary_px=0):
        self.root = Path(split_dir)
        self.classes = read_class_table(split_dir)
        self.samples = find_samples(split_dir, require_labels)
        self.transform = transform
        self.boundary_px = boundary_px

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """The raw image (H,W,3 uint8) and mask (H,W uint8) of one sample."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.label is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        else:
            mask = read_label(sample.label, classes=self.classes)
            if self.boundary_px:
                mask = boundary_ignore(mask, self.boundary_px, self.classes)
        return image, mask

    def __getitem__(self, index):
        """Sample `index`; or (index, seed), as utils.recipe's training loader draws them: the random transform
        then follows that seed alone, whichever data-loading process makes the sample."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        image, mask = self.load(index)
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)).long())
        if self.transform is not None:
            with seeded_randomness(seed):
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), index


@contextlib.contextmanager
def seeded_randomness(seed):
    """Python's and torch's CPU random draws inside follow `seed` (None: left as they are); both states are put back
    after, so the caller's own random streams go on as if nothing had been drawn."""
    if seed is None:
        yield
        return
    python_state, torch_state = random.getstate(), torch.random.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.random.set_rng_state(torch_state)

class RandomScale:
    """Rescale image and mask together by a random factor (mask with nearest neighbour)."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    def __call__(self, image, mask):
        factor = random.uniform(self.low, self.high)
        height, width = image.shape[-2:]
        size = [max(1, round(height * factor)), max(1, round(width * factor))]
        return TF.resize(image, size, antialias=True), TF.resize(mask, size)

class RandomRot90:
    """Rotate image and mask together by a random multiple of 90 degrees (cracks have no up)."""

    def __call__(self, image, mask):
        turns = random.randint(0, 3)
        if turns == 0:
            return image, mask
        return (tv_tensors.wrap(torch.rot90(image, turns, dims=(-2, -1)), like=image),
                tv_tensors.wrap(torch.rot90(mask, turns, dims=(-2, -1)), like=mask))

def normalization():
    """uint8 image -> float in [0, 1] -> ImageNet mean/std: the one input normalisation of every script
    (training, evaluation, inference; export documents it as the ONNX graph's input contract)."""
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(MEAN, STD)]


_NORMALIZE = v2.Compose(normalization())


def image_to_tensor(image):
    """An (H,W,3) uint8 photo as the normalised (3,H,W) float tensor the networks were trained on."""
    return _NORMALIZE(tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
                      ).as_subclass(torch.Tensor)


class ClassAwareCrop:
    """A random crop (padded with ignore when the image is smaller) drawn again, up to `tries` times, while one
    class covers more than `cat_max_ratio` of its labelled pixels: small crops of a mostly-background photo are
    mostly background, and a thin rare class (crack) is then seldom seen. mmsegmentation's RandomCrop rule
    (the last draw is kept when none passes); cat_max_ratio None or >= 1 is a plain random crop."""

    def __init__(self, crop_size, cat_max_ratio=None, tries=10):
        self.crop_size, self.cat_max_ratio, self.tries = crop_size, cat_max_ratio, tries

    def _dominated(self, mask):
        counts = torch.bincount(mask.flatten(), minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]
        labelled = int(counts.sum())
        return labelled > 0 and int(counts.max()) > self.cat_max_ratio * labelled

    def __call__(self, image, mask):
        height, width = image.shape[-2:]
        pad_h, pad_w = max(0, self.crop_size - height), max(0, self.crop_size - width)
        if pad_h or pad_w:
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
            height, width = image.shape[-2:]
        for attempt in range(self.tries if self.cat_max_ratio and self.cat_max_ratio < 1 else 1):
            top = random.randint(0, height - self.crop_size)
            left = random.randint(0, width - self.crop_size)
            crop = TF.crop(mask, top, left, self.crop_size, self.crop_size)
            if attempt == self.tries - 1 or not self.cat_max_ratio or not self._dominated(crop):
                break
        return TF.crop(image, top, left, self.crop_size, self.crop_size), crop


DEFAULT_SCALE_RANGE = (0.5, 2.0)


def train_transform(crop_size, scale=DEFAULT_SCALE_RANGE, cat_max_ratio=None):
    """Random scale, class-aware random crop (mask padded with ignore), flips, rot90, photometric jitter."""
    return v2.Compose([
        RandomScale(*scale),
        ClassAwareCrop(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        RandomRot90(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.02),
        *normalization(),
    ])


def training_set(split_dir, crop_size, scale=DEFAULT_SCALE_RANGE, cat_max_ratio=None):
    """The training split with train_transform's crop never larger than its smallest image side: padding a
    96 px image to a 512 px crop is 96% padding, several times the time and memory for nothing."""
    dataset = S2DSDataset(split_dir)
    smallest = min(min(image_size(sample.image)) for sample in dataset.samples)
    if crop_size > smallest:
        print(f"--crop_size {crop_size} exceeds the smallest image side of {dataset.root} ({smallest} px); "
              f"cropping {smallest} px instead", flush=True)
        crop_size = smallest
    low, high = scale
    if not 0 < low <= high:
        raise UserError(f"--scale_range needs 0 < LOW <= HIGH, got {low:g} {high:g}")
    if cat_max_ratio is not None and not 0 < cat_max_ratio <= 1:
        raise UserError(f"--cat_max_ratio must be in (0, 1], got {cat_max_ratio:g}")
    dataset.transform = train_transform(crop_size, scale, cat_max_ratio)
    return dataset


class EvalTransform:
    """The whole image, optionally resized (shorter side = eval_size); the mask stays native."""

    def __init__(self, eval_size=None):
        self.eval_size = eval_size
        self.normalize = _NORMALIZE

    def __call__(self, image, mask):
        if self.eval_size:
            image = TF.resize(image, self.eval_size, antialias=True)
        return self.normalize(image), mask

def collate(batch):
    """Stack same-sized samples; images of different sizes stay lists (evaluation handles both)."""
    images, masks, indices = zip(*batch)
    indices = torch.tensor(indices)
    if len({tuple(i.shape) for i in images}) == 1 and len({tuple(m.shape) for m in masks}) == 1:
        return torch.stack(images), torch.stack(masks), indices
    return list(images), list(masks), indices

def label_statistics(dataset, progress=True):
    """Per-class pixel and image counts over a split, reading every label (which also checks it)."""
    from tqdm import tqdm

    count = dataset.classes.num_classes
    pixels = np.zeros(count, dtype=np.int64)
    images = np.zeros(count, dtype=np.int64)
    ignored = 0
    for sample in tqdm(dataset.samples, desc="reading labels", disable=not progress_enabled(progress), leave=False):
        mask = read_label(sample.label, classes=dataset.classes)
        counts = np.bincount(mask.ravel(), minlength=256)
        pixels += counts[:count]
        images += counts[:count] > 0
        ignored += int(counts[IGNORE_INDEX])
    return pixels, images, ignored

def class_weights(pixel_counts):
    """ENet-style weights 1 / ln(1.02 + frequency): rare crack gets ~48x, background ~1.6x."""
    frequency = pixel_counts / max(1, pixel_counts.sum())
    return torch.tensor(1.0 / np.log(1.02 + frequency), dtype=torch.float32)
