"""Issue 10, reliability: bad inputs and a hostile environment give one line and exit 2, never a traceback,
never a write or delete outside the output folder, and never block the same command from running again."""
import errno
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import assert_user_error, run_script
from utils import data, model as models, training
from utils.checkpoint import (load_model, make_checkpoint, read_checkpoint, require_resume_state, save_atomic)
from utils.cli import UserError, environment_message, resolve_device, run_main
from utils.data import read_image, image_size
from utils.data.__main__ import main as data_main
from utils.files import release, replace_atomically, reserve
from utils.report import append_results_row, check_results_workbook

MOBILENET = "deeplabv3_mobilenet_v3_large"


def _exits_with_one_line(capsys, error):
    """run_main on a main that raises `error`: exit 2 and one stderr line, which is returned."""
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --- one place turns the environment's errors into one line --------------------------------------------

@pytest.mark.parametrize("error, fragments", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/last.pth"), ("/out/last.pth", "disk is full")),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x.csv"), ("/ro/x.csv", "read-only")),
    (PermissionError(errno.EACCES, "Permission denied", "/locked"), ("/locked", "permission denied")),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/out/file/runs"), ("/out/file/runs", "a file stands")),
    (FileExistsError(errno.EEXIST, "File exists", "/out/runs"), ("/out/runs", "in the way")),
    (Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit"), ("too large", "400000000")),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 30000000000 bytes."), ("out of memory", "eval")),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), ("out of memory",)),
    (MemoryError(), ("out of memory",)),
])
def test_environment_errors_are_one_line_naming_path_and_cause(capsys, error, fragments):
    line = _exits_with_one_line(capsys, error)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), line


@pytest.mark.parametrize("error", [KeyError("model"), TypeError("bad operand"), RuntimeError("shape mismatch"),
                                   IndexError("list index out of range")])
def test_programming_errors_keep_their_traceback(error):
    assert environment_message(error) is None

    def main(argv):
        raise error

    with pytest.raises(type(error)):
        run_main(main, [])


@pytest.mark.parametrize("name", ["mps", "meta", "cuda:x", "", "gpu", "cpu:0:1", "vulkan"])
def test_device_accepts_only_what_works_here(name):
    with pytest.raises(UserError, match="--device"):
        resolve_device(name)


def test_device_cpu_and_auto_work():
    assert resolve_device("CPU").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


# --- writes: read-only files, full disk, stale temporaries, reserved names ------------------------------

def test_read_only_file_is_refused_not_replaced(tmp_path):
    """The write bits are read, so this holds when the tests run as root too."""
    target = tmp_path / "model_test_results.xlsx"
    target.write_bytes(b"precious")
    target.chmod(0o444)
    try:
        with pytest.raises(UserError, match="read-only"):
            replace_atomically(str(target), lambda temporary: open(temporary, "wb").write(b"new"))
        with pytest.raises(UserError, match="read-only"):
            check_results_workbook(str(target))
        assert target.read_bytes() == b"precious"
    finally:
        target.chmod(0o644)
    assert sorted(os.listdir(tmp_path)) == ["model_test_results.xlsx"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, code):
    """A full disk, read-only file system or permission error mid-write (simulated: root ignores chmod)."""
    target = tmp_path / "last.pth"
    save_atomic({"epoch": 1}, target)

    def failing(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"half")
        raise OSError(code, os.strerror(code), temporary)

    with pytest.raises(OSError):
        replace_atomically(str(target), failing)
    assert torch.load(target)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_torch_save_failure_is_one_line_and_replaces_nothing(tmp_path, monkeypatch):
    target = tmp_path / "best.pth"
    save_atomic({"epoch": 1}, target)

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:858] PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="cannot write .*best.pth.*free space"):
        save_atomic({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["epoch"] == 1
    assert os.listdir(tmp_path) == ["best.pth"]


def test_stale_temporaries_of_dead_writers_are_removed_others_kept(tmp_path):
    dead = tmp_path / ".tmp_999999999_abc.pth"  # above any pid_max: no such process
    alive = tmp_path / f".tmp_{os.getpid()}_def.pth"
    old = tmp_path / ".tmp_xyz.csv"
    fresh_unowned = tmp_path / ".tmp_notes.txt"
    user = tmp_path / "notes.txt"
    for path in (dead, alive, old, fresh_unowned, user):
        path.write_text("x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    replace_atomically(str(tmp_path / "metrics.csv"), lambda temporary: open(temporary, "w").write("a\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, fresh_unowned.name, user.name, "metrics.csv"])


def test_reserve_lets_exactly_one_of_concurrent_runs_have_a_name(tmp_path):
    target = tmp_path / "test" / "same.xlsx"
    outcomes = []
    barrier = threading.Barrier(8)

    def attempt():
        barrier.wait()
        try:
            reserve(str(target))
            outcomes.append("won")
        except UserError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    with pytest.raises(UserError, match="empty"):  # the refusal says how a killed run's name is freed
        reserve(str(target))
    release(str(target))  # a failed run gives its name back: the same command runs again
    assert not target.exists()
    reserve(str(target))
    target.write_bytes(b"report")
    release(str(target))  # a finished report is never released
    assert target.read_bytes() == b"report"


def test_comparison_workbook_leaves_no_lock_file(tmp_path):
    path = tmp_path / "model_test_results.xlsx"
    assert append_results_row(str(path), {"name": "a", "mIoU": 0.5}) == 1
    assert append_results_row(str(path), {"name": "b", "mIoU": 0.6}) == 2
    assert os.listdir(tmp_path) == ["model_test_results.xlsx"]


# --- checkpoints: corrupt and tampered files ------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilenet_state(mobilenet_checkpoint):
    return torch.load(mobilenet_checkpoint, weights_only=True)


@pytest.mark.parametrize("tamper, fragment", [
    (lambda c: c.pop("model"), "'model'"),
    (lambda c: c.update(model={"a": 1}), "'model'"),
    (lambda c: c.update(version="1"), "'version'"),
    (lambda c: c.update(version=True), "'version'"),
    (lambda c: c.update(version=99), "newer"),
    (lambda c: c.update(arch="resnet9000"), "arch"),
    (lambda c: c.update(num_outputs="7"), "'num_outputs'"),
    (lambda c: c.update(pruning=[["backbone.0.0", "yes", [0]]]), "'pruning'"),
    (lambda c: c.update(pruning=[["backbone.0.0", True, [0.5]]]), "'pruning'"),
])
def test_tampered_checkpoint_fields_are_refused(tmp_path, mobilenet_state, tamper, fragment):
    checkpoint = dict(mobilenet_state)
    tamper(checkpoint)
    path = tmp_path / "tampered.pth"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="tampered.pth") as info:
        read_checkpoint(path)
    assert fragment in str(info.value)


@pytest.mark.parametrize("entry, fragment", [
    (["backbone.no_such_layer", True, [0]], "no prunable layer"),
    (["backbone.0.0", True, [0, 99]], "out of range"),
    (["backbone.0.0", True, [1, 1]], "repeated"),
])
def test_pruning_history_naming_missing_layers_or_channels_is_refused(tmp_path, mobilenet_state, entry, fragment):
    path = tmp_path / "pruned.pth"
    torch.save({**mobilenet_state, "pruning": [entry]}, path)
    with pytest.raises(UserError, match=fragment):
        load_model(path)


def test_unreadable_checkpoint_files_are_one_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "optimizer": {}}, other)
    for path in (text, empty, listing, other, tmp_path):
        with pytest.raises(UserError, match=str(path.name)):
            read_checkpoint(path)


def test_resume_from_a_plain_state_dict_is_refused(tmp_path, mobilenet_state):
    path = tmp_path / "last.pth"
    torch.save(mobilenet_state["model"], path)
    with pytest.raises(UserError, match="no training state to resume"):
        require_resume_state(read_checkpoint(path), path)
    weights_only = tmp_path / "weights_only.pth"  # our own format, but no optimiser or progress in it
    save_atomic(mobilenet_state, weights_only)
    with pytest.raises(UserError, match="no training state to resume"):
        require_resume_state(read_checkpoint(weights_only), weights_only)


# --- names and folders: nothing outside the output folder is written or removed ---------------------------

@pytest.mark.parametrize("run_name", ["..", ".", "", "../../x", "/tmp/elsewhere", "a/b"])
def test_run_names_that_are_not_plain_are_refused_before_any_write(tmp_path, dataset_dir, capsys, run_name):
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "thesis.docx").write_text("years of work")
    with pytest.raises(SystemExit) as info:
        run_main(train.main, [str(dataset_dir / "train"), str(dataset_dir / "val"), run_name, "--output_dir",
                              str(tmp_path / "out"), "--overwrite", "--init", "none", "--device", "cpu"])
    assert info.value.code == 2
    assert "plain name" in capsys.readouterr().err
    assert (outside / "thesis.docx").read_text() == "years of work"
    assert not (tmp_path / "out").exists()


def test_overwrite_removes_only_the_run_files(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    for name in training.RUN_FILES + ("events.out.tfevents.1.host",):
        (run_dir / name).write_text("old run")
    (run_dir / "my_notes.txt").write_text("mine")
    (run_dir / "figures").mkdir()
    with pytest.raises(UserError, match="already holds a run"):
        training._prepare_run_dir(str(run_dir), resume=False, overwrite=False)
    training._prepare_run_dir(str(run_dir), resume=False, overwrite=True)
    assert sorted(os.listdir(run_dir)) == ["figures", "my_notes.txt"]
    assert "left 2 other file(s)" in capsys.readouterr().out


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_rerun(tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text("{}")
    (run_dir / "events.out.tfevents.1.host").write_text("")
    training._prepare_run_dir(str(run_dir), resume=False, overwrite=False)
    assert os.listdir(run_dir) == []
    blocker = tmp_path / "runs" / "file"
    blocker.write_text("a file where the run folder goes")
    with pytest.raises(UserError, match="is a file"):
        training._prepare_run_dir(str(blocker), resume=False, overwrite=True)
    assert blocker.read_text() == "a file where the run folder goes"


def test_pretrained_weights_take_the_thesis_8_output_state_dict_without_downloading(tmp_path, monkeypatch):
    torch.manual_seed(0)
    thesis = models.build(MOBILENET, data.NUM_CLASSES + 1, init="none")
    path = tmp_path / "thesis_weights.pth"
    torch.save(thesis.state_dict(), path)
    inits = []
    real_build = models.build
    monkeypatch.setattr(models, "build", lambda arch, n, init, aux: inits.append(init) or real_build(arch, n, init, aux))
    network = training.NetworkSpec(arch=MOBILENET, init="coco", aux_loss=True, load_pretrained_weights=str(path),
                                   keep_feature_extract=False, train_pruned_fully=False)
    model, arch, pruning = training._build_model(network, data.S2DS_CLASSES)
    assert inits == ["none"]
    head = model.classifier[4].weight
    assert head.shape[0] == data.NUM_CLASSES
    assert torch.equal(head, thesis.classifier[4].weight[:data.NUM_CLASSES])


# --- images: too large, EXIF orientation -----------------------------------------------------------------

def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is then over twice the limit, like 20000x20000
    for reader in (read_image, image_size):
        with pytest.raises(UserError, match="huge.png.*too large"):
            reader(path)


def test_exif_rotated_photo_is_read_as_displayed(tmp_path):
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)  # stored 96 wide, 64 high
    pixels[:, :48] = 255
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    photo.save(path, exif=exif)
    assert image_size(path) == (96, 64)
    assert image_size(path, upright=True) == (64, 96)
    upright = read_image(path, upright=True)
    assert upright.shape == (96, 64, 3)
    assert upright[:40].mean() > 200 and upright[-40:].mean() < 50  # the left half is now on top
    assert read_image(path).shape == (64, 96, 3)  # labelled data is read as stored


# --- data helpers: a failed rgb2gray leaves nothing half-written ------------------------------------------

def test_rgb2gray_that_fails_leaves_nothing_and_reruns(tmp_path, dataset_dir, monkeypatch, capsys):
    split = tmp_path / "split"
    (split / data.RGB_DIR).mkdir(parents=True)
    for index, label in enumerate(sorted((dataset_dir / "train" / data.GRAY_DIR).iterdir())[:3]):
        ids = np.array(Image.open(label))
        Image.fromarray(data.encode_rgb_label(ids)).save(split / data.RGB_DIR / f"{index}.png")
    import utils.data.__main__ as commands

    calls = []
    real_read_label = commands.read_label

    def fails_on_the_second(path, rgb=None, classes=data.S2DS_CLASSES):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_read_label(path, rgb, classes)

    monkeypatch.setattr(commands, "read_label", fails_on_the_second)
    with pytest.raises(SystemExit) as info:
        run_main(data_main, ["rgb2gray", str(split)])
    assert info.value.code == 2
    assert "disk is full" in capsys.readouterr().err
    assert sorted(os.listdir(split)) == [data.RGB_DIR]
    monkeypatch.undo()
    assert data_main(["rgb2gray", str(split)]) is None
    assert len(os.listdir(split / data.GRAY_DIR)) == 3


# --- the exit path itself, through a real process ---------------------------------------------------------

def test_scripts_refuse_bad_names_devices_and_options_in_one_line(tmp_path, dataset_dir, mobilenet_checkpoint):
    assert_user_error(run_script("train.py", dataset_dir / "train", dataset_dir / "val", "../../x",
                                 "--output_dir", tmp_path), "plain name")
    assert_user_error(run_script("test.py", dataset_dir / "test", "--weights", mobilenet_checkpoint,
                                 "--device", "mps", "--output_dir", tmp_path), "--device")
    assert not any(tmp_path.iterdir())


# --- issue 20: a damaged study manifest is named as damaged ------------------------------------------------

@pytest.mark.parametrize("content", ['{"settings": {"arch": "deeplabv3_resnet', "[1, 2]", "\xff\xfe"])
def test_damaged_study_manifest_is_named_as_damaged(tmp_path, content):
    from utils.study.manifest import MANIFEST, open_study

    manifest = tmp_path / MANIFEST
    manifest.write_bytes(content.encode("latin-1"))
    before = manifest.read_bytes()
    with pytest.raises(UserError, match=f"{MANIFEST} is damaged.*--overwrite") as info:
        open_study(str(tmp_path), {"arch": "x"}, overwrite=False)
    assert "other arguments" not in str(info.value)
    assert manifest.read_bytes() == before


# --- issue 20: bounded resources, input/output separation, one train.py per run folder -----------------------

def test_workers_are_capped_at_the_usable_cpus_with_one_note(capsys, monkeypatch):
    from utils.cli import cap_workers, usable_cpus

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpus = usable_cpus()
    assert cap_workers(1000) == cpus
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and f"--workers 1000" in out[0] and f"using {cpus}" in out[0]
    assert cap_workers(0) == 0 and cap_workers(cpus) == cpus
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))  # torchrun's processes share the CPUs, at least 1 each
    assert cap_workers(1000) == 1


def test_train_parses_workers_1000_into_the_cpu_count(dataset_dir, capsys):
    args = train.get_args_parser().parse_args([str(dataset_dir / "train"), str(dataset_dir / "val"), "x",
                                               "--workers", "1000"])
    options = train.train_options(args)
    from utils.cli import usable_cpus

    assert options.place.workers == usable_cpus()
    assert "note: --workers 1000" in capsys.readouterr().out


def test_a_batch_larger_than_memory_is_refused_before_any_work(tmp_path, dataset_dir):
    result = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "huge", "--crop_size", "200000",
                        "--batch_size", "64", "--output_dir", tmp_path, "--device", "cpu")
    assert_user_error(result, "--batch_size x --crop_size", "GiB", "memory")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("pattern", [False, True])
def test_inference_refuses_an_output_folder_inside_its_input_folder(tmp_path, mobilenet_checkpoint, pattern):
    import inference

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(photos / "a.png")
    image = str(photos / "*.png") if pattern else str(photos)
    with pytest.raises(UserError, match="inside the input folder .*photos.*--output_dir outside"):
        inference.main(["--state_dict", str(mobilenet_checkpoint), "--image", image, "--save_figure",
                        "--device", "cpu", "--output_dir", str(photos)])
    assert os.listdir(photos) == ["a.png"]
    outputs = tmp_path / "out" / "inference"  # the case: --image OUT/inference --output_dir OUT
    outputs.mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(outputs / "b_m_overlay.png")
    with pytest.raises(UserError, match="inside the input folder"):
        inference.main(["--state_dict", str(mobilenet_checkpoint), "--image", str(outputs), "--save_figure",
                        "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--name", "m"])
    assert os.listdir(outputs) == ["b_m_overlay.png"]


def test_a_second_train_with_the_same_run_name_is_refused_while_the_first_runs(tmp_path, dataset_dir):
    from utils.files import hold_folder_lock, release_folder_locks

    run_dir = tmp_path / "out" / "runs" / "same"
    hold_folder_lock(str(run_dir), "busy")  # what the first train.py holds while it runs
    try:
        second = run_script("train.py", dataset_dir / "train", dataset_dir / "val", "same", "--output_dir",
                            tmp_path / "out", "--init", "none", "--device", "cpu", "--workers", "0")
        assert_user_error(second, "in use by another train.py", "RUN_NAME")
    finally:
        release_folder_locks()
    assert os.listdir(run_dir) == []


def test_the_run_folder_of_a_killed_train_is_free_at_once(tmp_path):
    """A stale claim cannot exist: the kernel drops a dead process's flock, so no lock file needs taking over."""
    import signal
    import subprocess
    import sys

    from utils.files import hold_folder_lock, release_folder_locks

    run_dir = tmp_path / "runs" / "killed"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from utils.files import hold_folder_lock; hold_folder_lock(sys.argv[2], 'busy'); "
                               "print('held', flush=True); time.sleep(600)",
                               os.path.dirname(os.path.dirname(__file__)), str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="busy"):
            hold_folder_lock(str(run_dir), "busy")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    hold_folder_lock(str(run_dir), "busy")
    release_folder_locks()
    assert os.listdir(run_dir) == []
