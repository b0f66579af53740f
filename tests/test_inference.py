"""inference.py: every mode writes the right files at the right size, folders and patterns, tiling, bad inputs."""
import numpy as np
import pytest
import torch
import torch_pruning as tp
from PIL import Image
from torch import nn

import inference
from conftest import REPO, assert_user_error, run_script
from utils import data, model as models
from utils.checkpoint import load_model, make_checkpoint, save_atomic
from utils.cli import UserError, options_from, run_main
from utils.inference import InferenceOptions, predict
from utils.model import Tiling, forward_logits, sliding_window_logits
from utils.visualize import blend, side_by_side_size


def write_photo(path, width, height, seed=0):
    """A random RGB photo (smooth enough that a network sees structure, not just noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(path)
    return path


def run_inference(tmp_path, *argv):
    inference.main([*map(str, argv), "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    return tmp_path / "out" / "inference"


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory, lively_mobilenet_checkpoint):
    """The lively MobileNet with 30% of its channels removed, saved with its pruning history."""
    model, metadata = load_model(lively_mobilenet_checkpoint)
    pruner = tp.pruner.MagnitudePruner(model, torch.randn(1, 3, 64, 64), importance=tp.importance.MagnitudeImportance(),
                                       pruning_ratio=0.3, ignored_layers=models.head_layers(model))
    pruner.step()
    path = tmp_path_factory.mktemp("pruned") / "pruned.pth"
    save_atomic(make_checkpoint(model, metadata["arch"], pruning=pruner.pruning_history()), path)
    return path


def test_seed_command_runs_verbatim_on_resnet101(tmp_path, monkeypatch, resnet101_checkpoint, capsys):
    photo = write_photo(tmp_path / "IMG.png", 72, 56)
    monkeypatch.chdir(tmp_path)
    inference.main(["--state_dict", str(resnet101_checkpoint), "--image", "IMG.png", "--mode", "overlay",
                    "--save_figure"])
    overlay = np.array(Image.open(tmp_path / "results" / "inference" / "IMG_deeplabv3_resnet101_overlay.png"))
    assert overlay.shape[0] >= 56 and overlay.shape[1] > 72  # the photo, its legend in a strip beside it
    printed = capsys.readouterr().out
    assert "IMG.png: 72x56 px, whole" in printed and "classes:" in printed
    assert Image.open(photo).size == (72, 56)


def test_each_mode_writes_a_png_of_the_right_size(tmp_path, lively_mobilenet_checkpoint):
    photo = write_photo(tmp_path / "site.jpg", 96, 72)
    folder = run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo,
                           "--mode", "side_by_side", "overlay", "save_mask", "--save_figure", "True")
    assert Image.open(folder / "site_lively_mobilenet_side_by_side.png").size == side_by_side_size(72, 96)
    assert Image.open(folder / "site_lively_mobilenet_mask.png").mode == "L"
    assert Image.open(folder / "site_lively_mobilenet_mask.png").size == (96, 72)
    assert Image.open(folder / "site_lively_mobilenet_mask_rgb.png").size == (96, 72)
    ids = np.array(Image.open(folder / "site_lively_mobilenet_mask.png"))
    overlay = np.array(Image.open(folder / "site_lively_mobilenet_overlay.png").convert("RGB"))
    photo_pixels = blend(np.array(Image.open(photo).convert("RGB")), ids)
    np.testing.assert_array_equal(overlay[:72, :96], photo_pixels)  # the legend hides none of the photo


def test_save_mask_holds_the_prediction_in_the_palette(tmp_path, lively_mobilenet_checkpoint):
    photo = write_photo(tmp_path / "wall.png", 80, 64, seed=1)
    folder = run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo,
                           "--mode", "save_mask")
    ids = np.array(Image.open(folder / "wall_lively_mobilenet_mask.png"))
    rgb = np.array(Image.open(folder / "wall_lively_mobilenet_mask_rgb.png"))
    model, _ = load_model(lively_mobilenet_checkpoint)
    expected = predict(model, np.array(Image.open(photo).convert("RGB")), data.NUM_CLASSES, torch.device("cpu"))
    np.testing.assert_array_equal(ids, expected)
    assert len(np.unique(ids)) > 1, "the lively model should predict several classes"
    np.testing.assert_array_equal(rgb, data.encode_rgb_label(ids))
    assert {tuple(c) for c in rgb.reshape(-1, 3)} <= {tuple(c) for c in data.PALETTE}
    assert not (folder / "wall_lively_mobilenet_overlay.png").exists()


def test_a_folder_is_processed_whole_and_a_pattern_selects(tmp_path, lively_mobilenet_checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (width, height) in enumerate(((64, 64), (80, 48), (48, 96))):
        write_photo(photos / f"p{index}.png", width, height, seed=index)
    (photos / "notes.txt").write_text("not a photo")
    folder = run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photos,
                           "--mode", "save_mask")
    for index, size in enumerate(((64, 64), (80, 48), (48, 96))):
        assert Image.open(folder / f"p{index}_lively_mobilenet_mask.png").size == size
    printed = capsys.readouterr().out
    assert printed.count(" px, whole, ") == 3 and "wrote 6 file(s)" in printed

    run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photos / "p[12].png",
                  "--mode", "save_mask")
    printed = capsys.readouterr().out
    assert "p0.png" not in printed and "p1.png" in printed and "p2.png" in printed
    assert "(4 replaced earlier outputs of the same name)" in printed


def test_seed_command_on_a_pruned_checkpoint(tmp_path, pruned_checkpoint, capsys):
    photo = write_photo(tmp_path / "IMG.png", 64, 64)
    folder = run_inference(tmp_path, "--state_dict", pruned_checkpoint, "--image", photo, "--mode", "overlay",
                           "--save_figure")
    assert (folder / "IMG_pruned_overlay.png").is_file()
    run_inference(tmp_path, "--state_dict", pruned_checkpoint, "--pruned_model", pruned_checkpoint,
                  "--use_pruned", "--image", photo, "--mode", "side_by_side", "--save_figure")
    assert (f"model: pruned (pruned) deeplabv3_mobilenet_v3_large, weights {pruned_checkpoint} in the pruned "
            f"architecture of {pruned_checkpoint}") in capsys.readouterr().out
    assert (folder / "IMG_pruned_side_by_side.png").is_file()


def test_a_second_model_leaves_the_first_models_outputs_untouched(tmp_path, lively_mobilenet_checkpoint,
                                                                  pruned_checkpoint, capsys):
    photo = write_photo(tmp_path / "032.png", 64, 64)
    modes = ("--mode", "overlay", "side_by_side", "save_mask", "--save_figure")
    folder = run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, *modes)
    first = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert sorted(first) == ["032_lively_mobilenet_mask.png", "032_lively_mobilenet_mask_rgb.png",
                             "032_lively_mobilenet_overlay.png", "032_lively_mobilenet_side_by_side.png"]
    assert "model: lively_mobilenet (dense) deeplabv3_mobilenet_v3_large" in capsys.readouterr().out
    run_inference(tmp_path, "--state_dict", pruned_checkpoint, "--image", photo, *modes)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name in first} == first
    assert len(list(folder.iterdir())) == 8
    printed = capsys.readouterr().out
    assert "model: pruned (pruned)" in printed and "replaced" not in printed
    run_inference(tmp_path, "--state_dict", pruned_checkpoint, "--image", photo, "--mode", "save_mask",
                  "--name", "field_v2")
    assert (folder / "032_field_v2_mask.png").is_file()
    with pytest.raises(UserError, match="--name"):
        run_inference(tmp_path, "--state_dict", pruned_checkpoint, "--image", photo, "--name", "../x")


def test_one_tile_the_size_of_the_image_equals_the_whole_image(lively_mobilenet_checkpoint):
    """A single window covering the image sees exactly what the whole-image pass sees; the blend weight
    multiplies and divides out, so only float32 rounding (~1e-6 on logits of ~10) may differ."""
    model, _ = load_model(lively_mobilenet_checkpoint)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = forward_logits(model, image, data.NUM_CLASSES)
        tiled = sliding_window_logits(model, image, data.NUM_CLASSES, Tiling(64, 32))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict(model, photo, data.NUM_CLASSES, torch.device("cpu"), Tiling(64)),
                                  predict(model, photo, data.NUM_CLASSES, torch.device("cpu")))


class PixelwiseNet(nn.Module):
    """Output at a pixel depends on that pixel only (1x1 convolutions); dict output like torchvision's."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, data.NUM_CLASSES, 1))

    def forward(self, image):
        return {"out": self.layers(image)}


def test_overlapping_tiles_blend_back_to_the_whole_image_prediction():
    """With no context across pixels every tile predicts the same logits wherever it sits, so the blended
    overlaps must reproduce the whole-image logits up to float32 rounding (1e-5): any seam, gap or wrong
    weight normalisation shows up here. (A real network differs near tile borders: less context.)"""
    torch.manual_seed(0)
    model = PixelwiseNet().eval()
    photo = np.random.default_rng(1).integers(0, 256, (76, 100, 3), dtype=np.uint8)
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = forward_logits(model, image, data.NUM_CLASSES)
        tiled = sliding_window_logits(model, image, data.NUM_CLASSES, Tiling(32, 20))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(predict(model, photo, data.NUM_CLASSES, torch.device("cpu"), Tiling(32, 20)),
                                  predict(model, photo, data.NUM_CLASSES, torch.device("cpu")))


def test_photos_above_max_size_are_tiled_at_full_size(tmp_path, lively_mobilenet_checkpoint, capsys):
    photo = write_photo(tmp_path / "big.png", 100, 60)
    folder = run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, "--mode",
                           "save_mask", "--max_size", "64", "--tile", "48", "--stride", "32")
    assert "big.png: 100x60 px, tiled 48 px" in capsys.readouterr().out
    assert Image.open(folder / "big_lively_mobilenet_mask.png").size == (100, 60)


def test_stride_alone_applies_to_the_tiles_of_photos_above_max_size(tmp_path, lively_mobilenet_checkpoint, capsys):
    """--stride without --tile steps the DEFAULT_TILE windows of a photo tiled for its size (1100 px across:
    3 windows at the default stride, 7 at 100 px)."""
    photo = write_photo(tmp_path / "long.png", 1100, 40)
    run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, "--mode", "save_mask",
                  "--max_size", "64", "--stride", "100")
    assert "long.png: 1100x40 px, tiled 512 px, 7 windows" in capsys.readouterr().out


def test_inference_options_are_settled_when_made():
    parse = inference.get_args_parser().parse_args
    options = options_from(InferenceOptions, vars(parse("--state_dict runs/demo/best.pth --image a.png "
                                                        "--mode Side-By-Side save_mask overlay overlay".split())))
    assert options.mode == ("side_by_side", "save_mask", "overlay") and options.name == "demo_best"
    assert options.network.state_dict == "runs/demo/best.pth" and options.tiling() == Tiling(512, None, 1)
    with pytest.raises(UserError, match="--stride must be between 1 and the tile side"):
        options_from(InferenceOptions, vars(parse("--state_dict W.pth --image a.png --stride 600".split())))
    with pytest.raises(UserError, match="--use_pruned"):
        options_from(InferenceOptions, vars(parse("--state_dict W.pth --pruned_model P.pth --image a.png".split())))


def test_figures_without_display_or_save_figure_say_to_use_save_figure(tmp_path, monkeypatch,
                                                                         lively_mobilenet_checkpoint):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    photo = write_photo(tmp_path / "a.png", 64, 64)
    with pytest.raises(UserError, match="add --save_figure"):
        run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, "--mode", "overlay")
    assert not (tmp_path / "out").exists()


def test_an_input_is_never_written_over(tmp_path, lively_mobilenet_checkpoint):
    folder = tmp_path / "out" / "inference"
    folder.mkdir(parents=True)
    write_photo(folder / "a.png", 64, 64)
    write_photo(folder / "a_lively_mobilenet_overlay.png", 64, 64, seed=5)
    before = (folder / "a_lively_mobilenet_overlay.png").read_bytes()
    with pytest.raises(UserError, match="would overwrite the input image"):
        run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", folder, "--save_figure")
    assert (folder / "a_lively_mobilenet_overlay.png").read_bytes() == before


def test_half_is_refused_on_the_cpu(tmp_path, lively_mobilenet_checkpoint):
    photo = write_photo(tmp_path / "a.png", 64, 64)
    with pytest.raises(UserError, match="--half runs float16 on a CUDA GPU only"):
        run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, "--half",
                      "--mode", "save_mask")


class Finished:
    """What a user sees of run_main(main, argv): exit status and stderr, as assert_user_error expects."""

    def __init__(self, argv, capsys):
        capsys.readouterr()
        try:
            run_main(inference.main, [str(arg) for arg in argv])
            self.returncode = 0
        except SystemExit as exit_:
            self.returncode = exit_.code
        self.stderr = capsys.readouterr().err


BAD_INPUTS = {"not an image": (("--image", "notes.txt"), "cannot read image"),
              "unknown mode": (("--image", "a.png", "--mode", "sideways"), "unknown --mode 'sideways'"),
              "missing checkpoint": (("--image", "a.png", "--state_dict", "missing.pth"), "checkpoint not found"),
              "empty folder": (("--image", "empty"), "holds no images")}


@pytest.fixture
def bad_input_folder(tmp_path, monkeypatch):
    write_photo(tmp_path / "a.png", 64, 64)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_missing_image_gives_one_line_and_status_2(bad_input_folder, mobilenet_checkpoint):
    result = run_script(REPO / "inference.py", "--state_dict", mobilenet_checkpoint, "--image", "missing.png",
                        "--mode", "overlay", "--save_figure", cwd=bad_input_folder)
    assert_user_error(result, "image not found: missing.png")
    assert not (bad_input_folder / "results").exists()


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_give_one_line_and_status_2(bad_input_folder, mobilenet_checkpoint, capsys, case):
    """In-process through run_main, the same path `python inference.py` takes (a subprocess costs ~5 s)."""
    argv, fragment = BAD_INPUTS[case]
    if "--state_dict" not in argv:
        argv += ("--state_dict", mobilenet_checkpoint)
    if "--mode" not in argv:
        argv += ("--mode", "save_mask")
    assert_user_error(Finished(argv, capsys), fragment)
    assert not (bad_input_folder / "results").exists()


def test_max_size_zero_predicts_a_large_photo_whole_and_tiles_say_what_they_cost(tmp_path, capsys,
                                                                                 lively_mobilenet_checkpoint):
    photo = write_photo(tmp_path / "wide.png", 130, 70)
    folder = run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, "--mode",
                           "save_mask", "--max_size", "0")
    assert "wide.png: 130x70 px, whole" in capsys.readouterr().out
    whole = np.array(Image.open(next(folder.glob("wide*_mask.png"))))
    model, _ = load_model(lively_mobilenet_checkpoint)
    np.testing.assert_array_equal(whole, predict(model.eval(), np.array(Image.open(photo)), data.NUM_CLASSES,
                                                 torch.device("cpu"), max_size=0))
    run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, "--mode", "save_mask",
                  "--tile", "48", "--stride", "32", "--tile_batch", "4")
    # windows of at most 48 px spread evenly: 4 across 130 px (45 px wide), 2 down 70 px (43 px high)
    assert "wide.png: 130x70 px, tiled 48 px, 8 windows, 1.70x the photo's pixels" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [(["--max_size", "16"], "--max_size must be 0"),
                                            (["--tile_batch", "0"], "--tile_batch must be at least 1")])
def test_bad_tiling_options_are_one_line_errors(tmp_path, lively_mobilenet_checkpoint, argv, fragment):
    photo = write_photo(tmp_path / "p.png", 40, 40)
    with pytest.raises(UserError, match=fragment):
        run_inference(tmp_path, "--state_dict", lively_mobilenet_checkpoint, "--image", photo, *argv)
