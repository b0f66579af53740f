"""Dataset commands: `python -m utils.data check|rgb2gray|prepare`.

    python -m utils.data check SPLIT_DIR               per-class pixel/image table and every problem found
    python -m utils.data rgb2gray SPLIT_DIR            write Labels_grayscale/ from Labels_RGB/
    python -m utils.data prepare RELEASE_DIR OUT_DIR   the published S2DS release -> train/val/test folders

A run-floor module (docs/ARCHITECTURE.md): it uses the dataset module below it and nothing above.
"""
import os
import shutil
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.cli import ArgumentParser, add_quiet, progress_enabled, run_main, set_quiet
from utils.data import (GRAY_DIR, IGNORE_INDEX, IMAGE_DIR, IMAGE_EXTENSIONS, RGB_DIR, DatasetError, find_samples,
                        label_stem, list_images, read_class_table, read_image, read_label)


def _check(split_dir):
    """Print a per-class table of pixels and images, and every problem found; exit 1 on problems."""
    problems = []
    classes = read_class_table(split_dir)
    samples = find_samples(split_dir, problems=problems)
    pixels = np.zeros(classes.num_classes, dtype=np.int64)
    images = np.zeros(classes.num_classes, dtype=np.int64)
    ignored, grayscale, binary_looking = 0, 0, []
    for sample in tqdm(samples, desc="checking", leave=False, disable=not progress_enabled()):
        try:
            read_image(sample.image)
            mask = read_label(sample.label, classes=classes)
        except DatasetError as error:
            problems.append(str(error))
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        pixels += counts[:classes.num_classes]
        images += counts[:classes.num_classes] > 0
        ignored += int(counts[IGNORE_INDEX])
        if sample.label.parent.name == GRAY_DIR:
            grayscale += 1
            if counts[IGNORE_INDEX] and counts[[0, IGNORE_INDEX]].sum() == mask.size:  # only 0 and 255
                binary_looking.append(sample.label)
    if binary_looking and len(binary_looking) == grayscale:
        problems.append(f"every {GRAY_DIR}/ label holds only 0 and 255 (e.g. {binary_looking[0]}): 255 is read as "
                        f"'ignore', so the cracks of a 0/255 binary mask would never be learnt; put such masks under "
                        f"{RGB_DIR}/ (white = crack) with a classes.csv naming background and crack")
    total = max(1, pixels.sum())
    label_dirs = sorted({s.label.parent.name for s in samples})
    print(f"{split_dir}: {len(samples)} paired images, labels from {', '.join(label_dirs) or 'nowhere'}")
    print(f"{'id':>3} {'class':<14} {'pixels':>14} {'share':>9} {'images':>7}")
    for class_id, name in enumerate(classes.names):
        print(f"{class_id:>3} {name:<14} {pixels[class_id]:>14,d} {100 * pixels[class_id] / total:>8.3f}% "
              f"{images[class_id]:>7d}")
    print(f"{'':>3} {'ignored (255)':<14} {ignored:>14,d} {100 * ignored / max(1, total + ignored):>8.3f}% "
          f"of all pixels")
    if problems:
        print(f"{len(problems)} problem(s):")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("no problems found")
    return 0



@contextmanager
def _staged(final):
    """A hidden sibling of `final` to write into, renamed into place only when the block succeeds, so a failed
    or killed run never leaves half a folder behind (a killed run's leftover is cleared by the next run)."""
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.replace(staging, final)


def _rgb2gray(split_dir):
    """Write Labels_grayscale/ from Labels_RGB/; refuses to overwrite an existing grayscale label."""
    split = Path(split_dir)
    rgb_dir, gray_dir = split / RGB_DIR, split / GRAY_DIR
    if not rgb_dir.is_dir():
        raise DatasetError(f"{split} has no {RGB_DIR}/ folder to convert")
    sources = list_images(rgb_dir)
    targets = [gray_dir / f"{label_stem(p)}.png" for p in sources]
    existing = [t for t in targets if t.exists()]
    if existing:
        raise DatasetError(f"{existing[0]} already exists ({len(existing)} file(s)); move {gray_dir} "
                           f"away first, nothing was written")
    if gray_dir.exists() and (not gray_dir.is_dir() or any(gray_dir.iterdir())):
        raise DatasetError(f"{gray_dir} already exists and is not empty; move it away first, nothing was written")
    with _staged(gray_dir) as staging:
        for source, target in tqdm(list(zip(sources, targets)), desc="rgb2gray", disable=not progress_enabled()):
            Image.fromarray(read_label(source, classes=read_class_table(split))).save(staging / target.name)
    print(f"wrote {len(targets)} grayscale labels to {gray_dir}")
    return 0



PUBLISHED_SPLITS = (("train", 0, 562), ("val", 563, 649), ("test", 650, 742))



def _prepare(release_dir, out_dir):
    """Turn the published release (NNN.png beside NNN_lab.png) into train/val/test split folders."""
    release, out = Path(release_dir), Path(out_dir)
    if not release.is_dir():
        raise DatasetError(f"release folder not found: {release}")
    files = [p for p in release.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    labels = {p.stem[:-4]: p for p in files if p.stem.endswith("_lab")}
    images = {p.stem: p for p in files if not p.stem.endswith("_lab")}
    if not images:
        raise DatasetError(f"{release} holds no NNN.png images")
    for stem in sorted(images):
        if stem not in labels:
            raise DatasetError(f"image {images[stem]} has no {stem}_lab label in {release}")
        if not stem.isdigit():
            raise DatasetError(f"{images[stem]} is not named by the published numbering (NNN.png)")
    for stem in sorted(set(labels) - set(images)):
        raise DatasetError(f"label {labels[stem]} has no image {stem}.png in {release}")
    for split, _, _ in PUBLISHED_SPLITS:
        if (out / split).exists() and any((out / split).iterdir()):
            raise DatasetError(f"{out / split} already exists and is not empty; choose another OUT_DIR")
    counts = {}
    with ExitStack() as stack:
        staging = {split: stack.enter_context(_staged(out / split)) for split, _, _ in PUBLISHED_SPLITS}
        for stem in tqdm(sorted(images), desc="prepare", disable=not progress_enabled()):
            number = int(stem)
            split = next((s for s, low, high in PUBLISHED_SPLITS if low <= number <= high), None)
            if split is None:
                raise DatasetError(f"{images[stem]}: number {number} is outside the published 000-742")
            ids = read_label(labels[stem], rgb=True)
            for folder in (IMAGE_DIR, RGB_DIR, GRAY_DIR):
                (staging[split] / folder).mkdir(exist_ok=True)
            shutil.copy2(images[stem], staging[split] / IMAGE_DIR / images[stem].name)
            shutil.copy2(labels[stem], staging[split] / RGB_DIR / f"{stem}{labels[stem].suffix}")
            Image.fromarray(ids).save(staging[split] / GRAY_DIR / f"{stem}.png")
            counts[split] = counts.get(split, 0) + 1
    print(f"wrote {out}: " + ", ".join(f"{s} {counts.get(s, 0)}" for s, _, _ in PUBLISHED_SPLITS))
    return 0



def main(argv=None):
    parser = ArgumentParser(prog="python -m utils.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="per-class table of pixels and images, and any problems")
    check.add_argument("split_dir", metavar="SPLIT_DIR")
    to_gray = commands.add_parser("rgb2gray", help="write Labels_grayscale/ from Labels_RGB/")
    to_gray.add_argument("split_dir", metavar="SPLIT_DIR")
    prepare = commands.add_parser("prepare", help="published release -> train/val/test split folders")
    prepare.add_argument("release_dir", metavar="RELEASE_DIR")
    prepare.add_argument("out_dir", metavar="OUT_DIR")
    for command in (check, to_gray, prepare):
        add_quiet(command)
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    if args.command == "check":
        status = _check(args.split_dir)
    elif args.command == "rgb2gray":
        status = _rgb2gray(args.split_dir)
    else:
        status = _prepare(args.release_dir, args.out_dir)
    if status:
        sys.exit(status)

if __name__ == "__main__":
    run_main(main)
