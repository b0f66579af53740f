"""The study's manifest (OUTPUT_DIR/studies/NAME/study.json): its settings, the dense row and the budgets' plans,
and, once the study is through, every run's row; with NAME/runs/<key>.json (one finished job each, utils.study.spread)
a killed study resumes where it stopped, and a study with other settings is never mixed into it.

Floor 4 (docs/ARCHITECTURE.md).
"""
import hashlib
import json
from pathlib import Path

from utils.cli import UserError
from utils.files import refuse_existing, replace_atomically

MANIFEST = "study.json"
OUTPUT_FILES = ("study.json", "study.csv", "study_summary.csv", "study.xlsx", "study.png", "sensitivity.csv",
                "sensitivity.png")


def digest(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _clear(folder):
    """--overwrite: remove what an earlier study wrote here (its variant checkpoints, finished jobs' results and
    tables), nothing else."""
    for path in [*Path(folder).glob("*.pth"), *Path(folder).glob("*.onnx"), *Path(folder).glob("runs/*.json")]:
        path.unlink()
    for name in OUTPUT_FILES:
        if (Path(folder) / name).exists():
            (Path(folder) / name).unlink()


def open_study(folder, settings, overwrite):
    """The manifest to continue (same arguments), or a new one: --overwrite starts again, and other arguments than
    the ones the study was run with need it."""
    manifest_path = Path(folder) / MANIFEST
    fresh = {"settings": settings, "digest": digest(settings), "dense": None, "runs": {}, "sensitivity": {},
             "budgets": {}}
    if manifest_path.is_file() and not overwrite:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"{manifest_path} is damaged ({str(error).splitlines()[0][:80]}), so the study cannot "
                            f"resume; pass --overwrite to start it again, or choose another --name") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings", {}), dict):
            raise UserError(f"{manifest_path} is damaged (not a study manifest), so the study cannot resume; pass "
                            f"--overwrite to start it again, or choose another --name")
        if manifest is not None and manifest.get("settings") == settings and "runs" in manifest:
            return manifest
        changed = sorted(key for key in settings if manifest is None or
                         manifest.get("settings", {}).get(key) != settings[key])
        raise UserError(f"{folder} holds a study run with other arguments ({', '.join(changed) or 'unreadable'} "
                        f"differ); repeat its arguments to resume it, pass --overwrite to start it again, or choose "
                        f"another --name")
    if overwrite:
        _clear(folder)
    else:
        refuse_existing([folder], False, "choose another --name")
    return fresh


def save_manifest(folder, manifest):
    text = json.dumps(manifest, indent=1)
    replace_atomically(str(Path(folder) / MANIFEST), lambda temporary: Path(temporary).write_text(text))
