"""utils.data: class table, label decoding, pairing, transforms and the data command-line helpers."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from conftest import assert_user_error, run_script
from utils import data
from utils.cli import UserError
from utils.data.__main__ import main as data_main
from utils.synthetic import generate


def save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def make_split(root, names=("a", "b"), size=16, label_dir=data.GRAY_DIR):
    for index, name in enumerate(names):
        save(np.full((size, size, 3), 100 + index), root / data.IMAGE_DIR / f"{name}.png")
        label = np.full((size, size), index % data.NUM_CLASSES)
        if label_dir == data.RGB_DIR:
            label = data.encode_rgb_label(label)
        save(label, root / label_dir / f"{name}.png")
    return root


def test_class_table_matches_design():
    assert data.CLASS_NAMES == ("background", "control_point", "vegetation", "efflorescence", "corrosion",
                                "spalling", "crack")
    assert data.PALETTE.tolist() == [[0, 0, 0], [0, 0, 255], [0, 255, 0], [0, 255, 255], [255, 255, 0],
                                     [255, 0, 0], [255, 255, 255]]
    assert data.IGNORE_INDEX == 255 and data.CRACK_ID == 6


def test_rgb_decoding_snaps_noisy_channels_at_128():
    noisy = np.array([[[12, 30, 201], [250, 240, 233], [140, 10, 3], [127, 128, 0]]], dtype=np.uint8)
    assert data.decode_rgb_label(noisy).tolist() == [[1, 6, 5, 2]]


def test_rgb_roundtrip_of_every_class():
    ids = np.arange(data.NUM_CLASSES, dtype=np.uint8)[None]
    assert np.array_equal(data.decode_rgb_label(data.encode_rgb_label(ids)), ids)


def test_unknown_colour_names_file_and_colour():
    magenta = np.array([[[0, 0, 0], [255, 0, 255]]], dtype=np.uint8)
    with pytest.raises(data.DatasetError, match=r"unknown label colour \(255, 0, 255\).*x=1.*lab.png"):
        data.decode_rgb_label(magenta, "lab.png")


def test_grayscale_ids_out_of_range_refused(tmp_path):
    path = save(np.array([[0, 6, 255, 9]]), tmp_path / data.GRAY_DIR / "x.png")
    with pytest.raises(data.DatasetError, match=r"x.png has class ids \[9\]"):
        data.read_label(path)


def test_pairs_by_stem_not_position(tmp_path):
    split = tmp_path / "split"
    save(np.zeros((8, 8, 3)), split / data.IMAGE_DIR / "b.jpg")
    save(np.zeros((8, 8, 3)), split / data.IMAGE_DIR / "a.png")
    save(np.full((8, 8), 2), split / data.GRAY_DIR / "b_lab.png")
    save(np.full((8, 8), 1), split / data.GRAY_DIR / "a.png")
    dataset = data.S2DSDataset(split)
    assert [(s.image.name, s.label.name) for s in dataset.samples] == [("a.png", "a.png"), ("b.jpg", "b_lab.png")]
    assert int(dataset[1][1][0, 0]) == 2


def test_rgb_labels_used_when_no_grayscale(tmp_path):
    dataset = data.S2DSDataset(make_split(tmp_path, ("p", "q"), label_dir=data.RGB_DIR))
    image, mask, index = dataset[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert mask.dtype == torch.int64 and mask.unique().tolist() == [1] and index == 1


@pytest.mark.parametrize("problem, message", [
    ("missing_dir", "dataset folder not found"),
    ("no_images_dir", "has no Images/ folder"),
    ("no_labels", "has no labels"),
    ("image_without_label", "has no label"),
    ("label_without_image", "has no image"),
    ("size_mismatch", "size mismatch"),
    ("corrupt_png", "cannot read image"),
])
def test_bad_splits_name_the_problem(tmp_path, problem, message):
    split = make_split(tmp_path / "split")
    if problem == "missing_dir":
        split = tmp_path / "nowhere"
    elif problem == "no_images_dir":
        (split / data.IMAGE_DIR).rename(split / "Imgs")
    elif problem == "no_labels":
        (split / data.GRAY_DIR).rename(split / "other")
    elif problem == "image_without_label":
        save(np.zeros((16, 16, 3)), split / data.IMAGE_DIR / "c.png")
    elif problem == "label_without_image":
        save(np.zeros((16, 16)), split / data.GRAY_DIR / "c.png")
    elif problem == "size_mismatch":
        save(np.zeros((12, 16)), split / data.GRAY_DIR / "b.png")
    elif problem == "corrupt_png":
        (split / data.IMAGE_DIR / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(data.DatasetError, match=message):
        data.S2DSDataset(split)


def test_truncated_image_fails_on_read_naming_file(tmp_path):
    split = make_split(tmp_path, size=64)
    path = split / data.IMAGE_DIR / "a.png"
    save(np.random.default_rng(0).integers(0, 255, (64, 64, 3)), path)
    path.write_bytes(path.read_bytes()[:200])
    dataset = data.S2DSDataset(split)
    with pytest.raises(data.DatasetError, match="cannot read image .*a.png"):
        dataset[0]


def test_train_transform_crops_and_pads_mask_with_ignore():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.full((3, 20, 20), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.full((20, 20), 3, dtype=torch.long))
    out_image, out_mask = data.train_transform(64, scale=(1.0, 1.0))(image, mask)
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert out_mask.shape == (64, 64) and set(out_mask.unique().tolist()) == {3, data.IGNORE_INDEX}
    assert (out_mask == 3).sum() == 400


@pytest.mark.parametrize("transform", [data.RandomRot90(), data.RandomScale(0.5, 2.0)])
def test_geometric_transforms_keep_image_and_mask_aligned(transform):
    ids = torch.zeros(32, 48, dtype=torch.long)
    ids[4:12, 30:44] = 5
    ids[20:30, 2:6] = 6
    image = tv_tensors.Image((ids * 40).to(torch.uint8).expand(3, -1, -1).clone())
    for seed in range(6):
        torch.manual_seed(seed)
        import random
        random.seed(seed)
        out_image, out_mask = transform(image, tv_tensors.Mask(ids))
        assert out_image.shape[-2:] == out_mask.shape[-2:]
        assert set(out_mask.unique().tolist()) <= {0, 5, 6}
        interior = out_image[0][out_mask == 6].float()
        assert interior.median() == 240


def test_eval_transform_resizes_image_only():
    image = tv_tensors.Image(torch.zeros(3, 100, 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(100, 200, dtype=torch.long))
    out_image, out_mask = data.EvalTransform(50)(image, mask)
    assert out_image.shape == (3, 50, 100) and out_mask.shape == (100, 200)


def test_collate_keeps_different_sizes_as_lists():
    small = (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long), 0)
    large = (torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.long), 1)
    images, masks, indices = data.collate([small, large])
    assert isinstance(images, list) and indices.tolist() == [0, 1]
    stacked, _, _ = data.collate([small, small])
    assert stacked.shape == (2, 3, 4, 4)


def test_boundary_ignore_bands_areal_defects_but_not_cracks():
    mask = np.zeros((11, 11), dtype=np.uint8)
    mask[3:8, 3:8] = 4
    mask[:, 10] = data.CRACK_ID
    out = data.boundary_ignore(mask, 1)
    assert out[5, 5] == 4 and out[3, 3] == 255 and out[2, 2] == 255 and out[1, 1] == 0
    assert (out[:, 10] == data.CRACK_ID).all()
    assert np.array_equal(data.boundary_ignore(mask, 0), mask)


def test_class_weights_favour_rare_crack():
    weights = data.class_weights(np.array([880, 10, 10, 10, 40, 49, 1]))
    assert weights[data.CRACK_ID] > 40 and weights[0] < 2 and weights.argmax() == data.CRACK_ID


def test_check_command_prints_per_class_table(dataset_dir):
    result = run_script("-m", "utils.data", "check", dataset_dir / "train")
    assert result.returncode == 0, result.stderr
    assert "crack" in result.stdout and "no problems found" in result.stdout


def test_check_command_lists_problems(tmp_path):
    split = make_split(tmp_path)
    (split / data.GRAY_DIR / "b.png").write_bytes(b"garbage")
    save(np.full((16, 16), 9), split / data.GRAY_DIR / "a.png")
    result = run_script("-m", "utils.data", "check", split)
    assert result.returncode == 1
    assert "2 problem(s)" in result.stdout and "cannot read image" in result.stdout
    assert "out of range" in result.stdout


def test_check_command_names_binary_masks_under_grayscale_labels(tmp_path):
    crack = np.zeros((16, 16))
    crack[4:12, 7] = 255  # a 0/255 mask: its crack would be read as "ignore"
    for root, second in ((tmp_path / "binary", crack), (tmp_path / "s2ds", np.where(crack, 6, 0))):
        split = make_split(root)
        save(crack, split / data.GRAY_DIR / "a.png")
        save(second, split / data.GRAY_DIR / "b.png")
    binary = run_script("-m", "utils.data", "check", tmp_path / "binary")
    assert binary.returncode == 1 and "1 problem(s)" in binary.stdout, binary.stdout
    assert "only 0 and 255" in binary.stdout and "Labels_RGB/" in binary.stdout
    assert re.search(r"ignored \(255\) +16 ", binary.stdout), binary.stdout  # 8 px in each of the two masks
    mixed = run_script("-m", "utils.data", "check", tmp_path / "s2ds")  # ids 0/6 beside one 0/255 file: S2DS-like
    assert mixed.returncode == 0 and "no problems found" in mixed.stdout, mixed.stdout


def test_rgb2gray_writes_matching_labels_and_refuses_overwrite(tmp_path):
    generate(tmp_path / "ds", count=3, size=32)
    split = tmp_path / "ds" / "train"
    original = {p.name: np.array(Image.open(p)) for p in (split / data.GRAY_DIR).iterdir()}
    for path in (split / data.GRAY_DIR).iterdir():
        path.unlink()
    (split / data.GRAY_DIR).rmdir()
    data_main(["rgb2gray", str(split)])
    assert {p.name: np.array(Image.open(p)).tolist() for p in (split / data.GRAY_DIR).iterdir()} == \
        {name: array.tolist() for name, array in original.items()}
    before = (split / data.GRAY_DIR / "000.png").read_bytes()
    assert_user_error(run_script("-m", "utils.data", "rgb2gray", split), "already exists")
    assert (split / data.GRAY_DIR / "000.png").read_bytes() == before


def test_prepare_splits_release_by_published_numbering(tmp_path):
    generate(tmp_path / "gen", count=3, size=32)
    release = tmp_path / "release"
    release.mkdir()
    sources = sorted((tmp_path / "gen").glob("*/Images/*.png"))
    for source, number in zip(sources, (5, 600, 700)):
        (release / f"{number:03d}.png").write_bytes(source.read_bytes())
        rgb = source.parent.parent / data.RGB_DIR / source.name
        (release / f"{number:03d}_lab.png").write_bytes(rgb.read_bytes())
    data_main(["prepare", str(release), str(tmp_path / "out")])
    for split, number in (("train", 5), ("val", 600), ("test", 700)):
        dataset = data.S2DSDataset(tmp_path / "out" / split)
        assert [s.name for s in dataset.samples] == [f"{number:03d}"]
        assert dataset.samples[0].label.parent.name == data.GRAY_DIR
    assert_user_error(run_script("-m", "utils.data", "prepare", release, tmp_path / "out"), "not empty")


# --- class tables from the data (classes.csv) ------------------------------------------------------------

def test_binary_dataset_reads_its_own_classes_and_its_0_255_masks(tmp_path):
    """A binary crack set as Crack500/DeepCrack/CFD publish it: classes.csv beside the splits, 0/255 masks under
    Labels_RGB/; the masks read as background 0 and crack 1, checked against the masks written."""
    generate(tmp_path, count=6, size=64, seed=3, binary=True)
    dataset = data.S2DSDataset(tmp_path / "train")
    assert dataset.classes.names == ("background", "crack") and dataset.classes.crack_id == 1
    masks = [np.array(Image.open(sample.label)) for sample in dataset.samples]
    assert {int(value) for mask in masks for value in np.unique(mask)} == {0, 255}
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(dataset.load(index)[1], (mask == 255).astype(np.uint8))
    assert data.read_class_table(tmp_path / "val") == dataset.classes
    assert data.read_class_table(tmp_path / "other" / "train") == data.S2DS_CLASSES  # none in it or above: S2DS


def test_class_table_rows_round_trip_and_crack_is_found_by_name():
    table = data.ClassTable(("background", "spall", "crack"), ((0, 0, 0), (255, 0, 0), (255, 255, 255)))
    assert data.ClassTable.from_rows(table.rows()) == table
    assert (table.crack_id, table.background_id, table.num_classes) == (2, 0, 3)
    assert data.ClassTable(("sound", "rust"), ((0, 0, 0), (255, 0, 0))).crack_id is None
    ids = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(data.decode_rgb_label(data.encode_rgb_label(ids, table), classes=table)[:, :1],
                                  ids[:, :1])


@pytest.mark.parametrize("text, fragment", [
    ("id,name\n0,background\n", "header id,name,R,G,B"),
    ("id,name,R,G,B\n0,background,0,0,0\n2,crack,255,255,255\n", "without gaps"),
    ("id,name,R,G,B\n0,background,0,0,0\n1,crack,200,200,200\n", "0 or 255"),
    ("id,name,R,G,B\n0,background,0,0,0\n1,Crack!,255,255,255\n", "lowercase words"),
    ("id,name,R,G,B\n0,background,0,0,0\n", "2 to 8 classes"),
    ("id,name,R,G,B\n0,background,0,0,0\n1,crack,x,0,0\n", "integer id and colour"),
])
def test_bad_classes_csv_is_one_line_naming_the_file(tmp_path, text, fragment):
    (tmp_path / "train").mkdir()
    (tmp_path / "classes.csv").write_text(text)
    with pytest.raises(UserError, match=fragment) as error:
        data.read_class_table(tmp_path / "train")
    assert "classes.csv" in str(error.value) and "\n" not in str(error.value)

