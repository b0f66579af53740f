"""The synthetic dataset: deterministic, in S2DS layout, with labels that match what was drawn."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize

from utils.cli import UserError, run_main
from utils.data import (CRACK_ID, GRAY_DIR, IMAGE_DIR, NUM_CLASSES, RGB_DIR, S2DSDataset, read_image,
                        read_label)
from utils.synthetic import generate, main, split_counts

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One 20-image dataset shared by the read-only checks."""
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, 20, SIZE, seed=0)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate(tmp_path / name, 3, 64, seed=seed)
    first, again, other = (_files(tmp_path / name) for name in "abc")
    assert first == again
    assert first.keys() == other.keys()
    assert first != other


def test_split_counts_keep_proportions_and_give_every_split_an_image():
    assert split_counts(3) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(10) == {"train": 6, "val": 2, "test": 2}
    assert split_counts(30) == {"train": 18, "val": 6, "test": 6}
    assert sum(split_counts(7).values()) == 7


def test_layout_pairing_numbering_and_sizes(dataset):
    out, counts = dataset
    assert counts == {"train": 12, "val": 4, "test": 4}
    names = []
    for split, number in counts.items():
        listings = [sorted(p.name for p in (out / split / folder).iterdir())
                    for folder in (IMAGE_DIR, GRAY_DIR, RGB_DIR)]
        assert listings[0] == listings[1] == listings[2]
        assert len(listings[0]) == number
        names += listings[0]
        for name in listings[0]:
            modes = [Image.open(out / split / folder / name).mode for folder in (IMAGE_DIR, GRAY_DIR, RGB_DIR)]
            sizes = {Image.open(out / split / folder / name).size for folder in (IMAGE_DIR, GRAY_DIR, RGB_DIR)}
            assert modes == ["RGB", "L", "RGB"]
            assert sizes == {(SIZE, SIZE)}
    assert names == [f"{i:03d}.png" for i in range(20)]  # continuous across train, val, test


def test_grayscale_and_rgb_labels_agree(dataset):
    out, _ = dataset
    for gray in out.glob(f"*/{GRAY_DIR}/*.png"):
        np.testing.assert_array_equal(read_label(gray), read_label(gray.parent.parent / RGB_DIR / gray.name))


def test_cracks_are_lines_a_few_px_wide_and_darker_than_background(dataset):
    out, _ = dataset
    with_cracks = 0
    for gray in out.glob(f"*/{GRAY_DIR}/*.png"):
        ids = read_label(gray)
        crack = ids == CRACK_ID
        if not crack.any():
            continue
        with_cracks += 1
        assert crack.mean() < 0.15
        width = crack.sum() / skeletonize(crack).sum()  # area over centre-line length
        assert 1.5 < width < 6, f"{gray.name}: cracks {width:.1f} px wide on average"
        brightness = read_image(gray.parent.parent / IMAGE_DIR / gray.name).mean(axis=2)
        assert brightness[crack].mean() < 0.75 * brightness[ids == 0].mean()
    assert with_cracks >= 5


def test_every_class_appears_in_train(dataset):
    out, _ = dataset
    present = set()
    for gray in (out / "train" / GRAY_DIR).iterdir():
        present |= set(np.unique(read_label(gray)).tolist())
    assert present == set(range(NUM_CLASSES))


def test_dataset_class_loads_a_generated_split(dataset):
    out, counts = dataset
    data = S2DSDataset(out / "train")
    assert len(data) == counts["train"]
    image, mask, index = data[0]
    assert tuple(image.shape) == (3, SIZE, SIZE)
    assert tuple(mask.shape) == (SIZE, SIZE)
    assert index == 0 and int(mask.max()) < NUM_CLASSES


def test_refuses_to_overwrite_a_non_empty_split(tmp_path):
    generate(tmp_path, 3, 64)
    image = tmp_path / "val" / IMAGE_DIR / "001.png"
    before = image.read_bytes()
    with pytest.raises(UserError, match="not empty"):
        generate(tmp_path, 3, 64, seed=9)
    assert image.read_bytes() == before


def test_checks_every_split_before_writing_anything(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate(tmp_path, 3, 64)
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("count, size", [(2, 64), (3, 16)])
def test_refuses_bad_values(tmp_path, count, size):
    with pytest.raises(UserError):
        generate(tmp_path, count, size)


def test_cli_bad_value_is_one_line_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "utils.synthetic", str(tmp_path / "out"), "--size", "16"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--size 16" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_too_small_count_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(tmp_path / "out"), "--count", "2"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_writes_and_reports_each_split(tmp_path, capsys):
    main([str(tmp_path), "--count", "3", "--size", "64", "--seed", "4"])
    printed = capsys.readouterr().out
    for split in ("train", "val", "test"):
        assert f"{tmp_path / split}: 1 image(s)" in printed
        assert (tmp_path / split / GRAY_DIR).is_dir()
