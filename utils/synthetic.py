"""Generate a synthetic S2DS-format dataset: concrete texture, branching cracks a few px wide, areal defects.

The demo and the tests need data a model can learn from without the 743-patch download, so every
defect here is drawn with a look of its own and labelled exactly where it was drawn.
Output per split: Images/ (RGB PNG), Labels_grayscale/ (class ids) and Labels_RGB/ (class colours),
files numbered continuously across splits (000.png ...) like the published release.
"""
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils.cli import ArgumentParser, UserError, add_bool, add_quiet, progress_enabled, set_quiet
from utils.data import (CLASS_NAMES, CRACK_ID, GRAY_DIR, IMAGE_DIR, RGB_DIR, ClassTable, encode_rgb_label,
                        write_class_table)

MIN_SIZE = 32
MAX_SIZE = 4096
MIN_COUNT = 3
DEFAULT_SPLITS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
CRACK_SHARE = 0.7  # share of images with cracks; in S2DS about a third, more here so a demo learns them

CONTROL_POINT_ID = CLASS_NAMES.index("control_point")
# Areal classes in the order patches are handed out, so the first images already show each of them.
AREAL_IDS = tuple(CLASS_NAMES.index(name)
                  for name in ("spalling", "corrosion", "efflorescence", "vegetation", "control_point"))


def _smooth_noise(rng, size, cells):
    """Zero-mean, unit-variance noise with features about size/cells px wide (bicubic-upsampled grid)."""
    cells = max(2, int(cells))
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


@lru_cache(maxsize=None)
def _photo(name):
    """A greyscale texture photograph shipped inside scikit-image (no download), as float32."""
    from skimage import data as photos

    return getattr(photos, name)().astype(np.float32)


def _photo_texture(rng, name, size):
    """Zero-mean, unit-variance texture from a random crop of a real photo (gravel: aggregate, grass:
    leaves), rotated by a multiple of 90 degrees, so surfaces carry real, not only noise-made, detail."""
    photo = _photo(name)
    side = int(rng.uniform(0.3, 0.6) * min(photo.shape))
    y, x = (int(rng.integers(0, n - side + 1)) for n in photo.shape)
    crop = np.rot90(photo[y:y + side, x:x + side], int(rng.integers(0, 4)))
    field = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR))
    return (field - field.mean()) / (field.std() + 1e-6)


def _concrete(rng, size):
    """Grey concrete: blotches at two scales, aggregate from a gravel photo, a slight tint, dark pores."""
    base = rng.uniform(125, 175)
    value = base * (1 + 0.08 * _smooth_noise(rng, size, 3) + 0.05 * _smooth_noise(rng, size, size / 16)
                    + rng.uniform(0.03, 0.07) * _photo_texture(rng, "gravel", size))
    value += rng.normal(0, 5, (size, size))
    pores = Image.new("L", (size, size))
    draw = ImageDraw.Draw(pores)
    scale = size / 128
    for _ in range(rng.poisson(size * size / 800)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 1.5) * scale
        draw.ellipse((x - r, y - r, x + r, y + r), fill=1)
    value *= np.where(np.asarray(pores) > 0, rng.uniform(0.7, 0.85), 1.0)
    tint = 1 + rng.uniform(-0.04, 0.04, 3)
    return value[..., None] * tint


def _blob(rng, size, grid):
    """An irregular patch: an ellipse whose edge is pushed in and out by smoothed noise."""
    yy, xx = grid
    a = rng.uniform(0.14, 0.28) * size
    b = a * rng.uniform(0.5, 1.0)
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    angle = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    r2 = (u / a) ** 2 + (v / b) ** 2
    mask = (1 - r2 + 0.5 * _smooth_noise(rng, size, size / (0.6 * b)) > 0) & (r2 < 2)
    core = r2 < 1
    if mask.sum() < 0.4 * core.sum():  # noise ate most of it: keep the patch a patch
        mask |= core
    return mask


def _control_point(rng, size, grid):
    """A survey target: a black/white quartered disk at a random rotation; returns mask and colours."""
    yy, xx = grid
    r = rng.uniform(0.04, 0.08) * size
    cx, cy = rng.uniform(r, size - r, 2)
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    quarter = np.floor((np.arctan2(yy - cy, xx - cx) + rng.uniform(0, math.pi)) / (math.pi / 2)).astype(int)
    colours = np.where((quarter % 2 == 0)[..., None], 235.0, 20.0) * np.ones(3)
    return mask, colours


def _paint_vegetation(rng, image, mask, size):
    """Green, leafy: a grass photo modulates brightness, dark gaps between leaves."""
    leaves = _photo_texture(rng, "grass", size)
    green = np.array([rng.uniform(50, 90), rng.uniform(110, 160), rng.uniform(35, 70)])
    shade = 1 + 0.25 * leaves + rng.normal(0, 0.08, leaves.shape)
    shade = np.where(leaves < -1.0, 0.45, shade)
    image[mask] = (green * shade[..., None])[mask]


def _paint_efflorescence(rng, image, mask, size):
    """Whitish chalky bloom laid over the concrete with patchy opacity."""
    alpha = np.clip(0.65 + 0.15 * _smooth_noise(rng, size, size / 12), 0.45, 0.9)[..., None]
    chalk = np.array([228.0, 226.0, 216.0]) + rng.normal(0, 6, image.shape)
    image[mask] = ((1 - alpha) * image + alpha * chalk)[mask]


def _paint_corrosion(rng, image, mask, size):
    """Orange-brown rust: two rust tones mixed by noise, nearly opaque."""
    mix = np.clip(0.5 + 0.35 * _smooth_noise(rng, size, size / 10), 0, 1)[..., None]
    light = np.array([rng.uniform(165, 195), rng.uniform(80, 105), rng.uniform(30, 50)])
    dark = np.array([rng.uniform(95, 120), rng.uniform(45, 60), rng.uniform(20, 35)])
    rust = mix * light + (1 - mix) * dark + rng.normal(0, 7, image.shape)
    alpha = rng.uniform(0.8, 0.95)
    image[mask] = ((1 - alpha) * image + alpha * rust)[mask]


def _paint_spalling(rng, image, mask, size):
    """A recessed rough patch: darker, coarse texture, shadow on the rim facing the light."""
    rough = 0.12 * _smooth_noise(rng, size, size / 8) + rng.normal(0, 0.06, (size, size))
    recessed = image * (rng.uniform(0.55, 0.7) + rough)[..., None]
    d = max(2, round(size / 40))
    shifted = np.zeros_like(mask)
    shifted[d:, d:] = mask[:-d, :-d]
    shadow = mask & ~shifted  # the upper-left rim, where the broken edge hides the light
    recessed[shadow] *= 0.55
    image[mask] = recessed[mask]


_PAINT = {
    CLASS_NAMES.index("vegetation"): _paint_vegetation,
    CLASS_NAMES.index("efflorescence"): _paint_efflorescence,
    CLASS_NAMES.index("corrosion"): _paint_corrosion,
    CLASS_NAMES.index("spalling"): _paint_spalling,
}


def _walk(rng, start, angle, length, step):
    """A crack's course: the heading wanders about its start direction (no loops), jagged step to step."""
    x, y = start
    points, headings = [(x, y)], [angle]
    drift = 0.0
    for _ in range(max(2, int(length / step))):
        drift = float(np.clip(0.85 * drift + rng.normal(0, 0.15), -0.9, 0.9))
        heading = angle + drift + rng.normal(0, 0.25)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        points.append((x, y))
        headings.append(angle + drift)
    return points, headings


def _draw_crack(rng, draws, start, angle, length, width, step, depth=0):
    """One crack with up to two branches, each narrower and shorter, branching once more.

    `draws` is (label canvas, dark-core canvas): the core, half as wide, gets the deepest shadow.
    """
    points, headings = _walk(rng, start, angle, length, step)
    draws[0].line(points, fill=1, width=width, joint="curve")
    draws[1].line(points, fill=1, width=max(1, width // 2), joint="curve")
    if depth == 2:
        return
    for _ in range(rng.integers(0, 3 - depth)):
        i = int(rng.integers(len(points) // 4, len(points)))
        side = 1 if rng.random() < 0.5 else -1
        _draw_crack(rng, draws, points[i], headings[i] + side * rng.uniform(0.4, 1.0),
                    length * rng.uniform(0.3, 0.6), max(2, round(width * 0.7)), step, depth + 1)


def _crack_masks(rng, size, count):
    """`count` cracks 2-5 px wide at 128 px (widths and lengths scale with the image), as S2DS cracks
    look in its 1024 px patches scaled down; returns the labelled mask and its darker core."""
    canvases = [Image.new("L", (size, size)) for _ in range(2)]
    draws = [ImageDraw.Draw(canvas) for canvas in canvases]
    scale = size / 128
    for _ in range(count):
        width = max(2, round(rng.choice((2, 3, 4, 5), p=(0.3, 0.3, 0.25, 0.15)) * scale))
        start = tuple(rng.uniform(0.1, 0.9, 2) * size)
        _draw_crack(rng, draws, start, rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.0) * size,
                    width, max(1.0, 2 * scale))
    crack, core = (np.asarray(canvas) > 0 for canvas in canvases)
    return crack, core & crack


def _shade_cracks(rng, image, crack, core):
    """Cracks are shadows: the rim darkened, the core darker still, with some variation along them."""
    depth = rng.uniform(0.3, 0.45)
    factor = np.where(core, depth, 0.5 * (1 + depth)) + rng.normal(0, 0.04, crack.shape)
    image[crack] *= np.clip(factor, 0.2, 0.8)[crack][:, None]


def _sample(rng, size, areal_ids, with_cracks):
    """One image (uint8 RGB) and its class ids; each thing drawn also overwrites the label below it.

    Order: areal patches, then cracks across them, then control points (stickers on top).
    """
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _concrete(rng, size)
    ids = np.zeros((size, size), dtype=np.uint8)
    for class_id in (c for c in areal_ids if c != CONTROL_POINT_ID):
        mask = _blob(rng, size, grid)
        _PAINT[class_id](rng, image, mask, size)
        ids[mask] = class_id
    if with_cracks:
        crack, core = _crack_masks(rng, size, int(rng.integers(1, 4)))
        _shade_cracks(rng, image, crack, core)
        ids[crack] = CRACK_ID
    for _ in range(areal_ids.count(CONTROL_POINT_ID)):
        mask, colours = _control_point(rng, size, grid)
        image[mask] = colours[mask]
        ids[mask] = CONTROL_POINT_ID
    image *= (1 + 0.06 * _smooth_noise(rng, size, 2))[..., None]  # uneven lighting over everything
    image += rng.normal(0, 2.5, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), ids


def split_counts(count, splits=DEFAULT_SPLITS):
    """Images per split in proportion to the fractions, at least one each, summing to `count`."""
    total = sum(fraction for _, fraction in splits)
    counts = [max(1, round(count * fraction / total)) for _, fraction in splits]
    while sum(counts) > count:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < count:
        counts[0] += 1
    return dict(zip((name for name, _ in splits), counts))


def _check_args(out, count, size, seed, splits):
    """Refuse bad values and any existing non-empty split folder before a single file is written."""
    if not splits or len({name for name, _ in splits}) != len(splits) or any(f <= 0 for _, f in splits):
        raise UserError(f"splits must be distinct names with positive fractions, got {splits}")
    if count < max(MIN_COUNT, len(splits)):
        raise UserError(f"--count {count} is too small: each of the {len(splits)} splits needs an image, "
                        f"so use at least {max(MIN_COUNT, len(splits))}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size {size} is out of range; use {MIN_SIZE} to {MAX_SIZE} px")
    if seed < 0:
        raise UserError(f"--seed {seed} is negative; use 0 or more")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another OUT_DIR")
    for name, _ in splits:
        target = out / name
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UserError(f"{target} already exists and is not empty; choose another OUT_DIR "
                            f"(nothing was written)")


BINARY_CLASSES = ClassTable(("background", "crack"), ((0, 0, 0), (255, 255, 255)))


def _write_labels(folders, file_name, ids, binary):
    """S2DS: Labels_grayscale (ids) and Labels_RGB (colours); binary: one 0/255 mask under Labels_RGB, as Crack500,
    DeepCrack and CFD publish them."""
    if binary:
        Image.fromarray(np.where(ids == CRACK_ID, 255, 0).astype(np.uint8)).save(folders[2] / file_name)
        return
    Image.fromarray(ids).save(folders[1] / file_name)
    Image.fromarray(encode_rgb_label(ids)).save(folders[2] / file_name)


def generate(out_dir, count, size, seed=0, splits=DEFAULT_SPLITS, progress=False, binary=False):
    """Write `count` size x size samples into out_dir/<split>/{Images,Labels_grayscale,Labels_RGB}/; `binary`:
    cracks on plain concrete only, 0/255 masks under Labels_RGB/ and out_dir/classes.csv (background, crack).

    Deterministic: image k draws from its own numpy Generator seeded by (seed, k), so the same
    arguments give byte-identical files. Every split is checked before anything is written, and
    an existing non-empty split is refused, never overwritten. Returns {split: number of images}.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    _check_args(out, count, size, seed, splits)
    counts = split_counts(count, splits)
    if binary:
        out.mkdir(parents=True, exist_ok=True)
        write_class_table(BINARY_CLASSES, out)
    digits = max(3, len(str(count - 1)))
    handed_out = 0  # areal patches so far; patches cycle through AREAL_IDS
    bar = tqdm(total=count, desc="generating", disable=not progress_enabled(progress))
    index = 0
    for name, number in counts.items():
        folders = [out / name / folder for folder in (IMAGE_DIR, GRAY_DIR, RGB_DIR)]
        for folder in folders[::2] if binary else folders:
            folder.mkdir(parents=True, exist_ok=True)
        for _ in range(number):
            rng = np.random.default_rng((seed, index))
            patches = int(rng.integers(0, 3))
            if handed_out < len(AREAL_IDS):  # until every areal class has appeared once
                patches = max(patches, 1)
            areal_ids = [] if binary else [AREAL_IDS[(handed_out + j) % len(AREAL_IDS)] for j in range(patches)]
            handed_out += len(areal_ids)
            image, ids = _sample(rng, size, areal_ids, index == 0 or rng.random() < CRACK_SHARE)
            file_name = f"{index:0{digits}d}.png"
            Image.fromarray(image).save(folders[0] / file_name)
            _write_labels(folders, file_name, ids, binary)
            index += 1
            bar.update()
    bar.close()
    return counts


def main(argv=None):
    parser = ArgumentParser(prog="python -m utils.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write train/, val/ and test/ into")
    parser.add_argument("--count", type=int, default=30,
                        help=f"total number of images, split 60/20/20, at least {MIN_COUNT} (default: 30)")
    parser.add_argument("--size", type=int, default=128,
                        help=f"image side in px, {MIN_SIZE} to {MAX_SIZE} (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files (default: 0)")
    add_bool(parser, "--binary", False, "a binary crack dataset as Crack500/DeepCrack/CFD come: background and crack, "
                                        "0/255 masks under Labels_RGB/, classes.csv beside the splits")
    add_quiet(parser)
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    counts = generate(args.out_dir, args.count, args.size, args.seed, progress=True, binary=args.binary)
    folders = f"{IMAGE_DIR}/, {RGB_DIR}/ (0/255 masks)" if args.binary else f"{IMAGE_DIR}/, {GRAY_DIR}/, {RGB_DIR}/"
    for name, number in counts.items():
        print(f"wrote {Path(args.out_dir) / name}: {number} image(s) of {args.size}x{args.size} px ({folders})")


if __name__ == "__main__":
    from utils.cli import run_main

    run_main(main)
