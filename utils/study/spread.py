"""A study's independent jobs spread over torchrun's processes: each job is claimed by one process
(utils.distributed.Launch.claimed), run by it alone on its own device, and its result written to
NAME/runs/<key>.json as soon as it is done, so a killed process loses only the jobs it was running and a resume redoes
those and nothing else. Without torchrun the one process claims every job in turn: one code path.

Floor 4 (docs/ARCHITECTURE.md). The study folder must be one every process sees (on several machines: a shared
filesystem), since the runs' checkpoints are read back by the process that scores or times them.
"""
import json
import re
from pathlib import Path

from utils.cli import UserError
from utils.files import replace_atomically

RESULTS = "runs"  # NAME/runs/<key>.json: one finished job each


def result_path(folder, key):
    return Path(folder) / RESULTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.json"


def _read(path, digest):
    """The result kept in `path` by this study (digest), or None: a missing, unreadable or foreign file is a job to
    run again, which is always safe (a result is replaced whole)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("digest") != digest or "result" not in record:
        return None
    return record["result"]


def finished(folder, keys, digest):
    """{key: result} of the jobs among `keys` this study already finished."""
    results = {key: _read(result_path(folder, key), digest) for key in keys}
    return {key: result for key, result in results.items() if result is not None}


def spread(jobs, work, study, label):
    """work(position, key, job) for every job of `jobs` ({key: job}, in order) that `study` has not finished, each by
    the process that claims it, its result kept in runs/<key>.json; every process returns {key: result} of every
    job once all of them are done. `label` names this job list (distinct within one launch)."""
    folder, digest, launch = study.folder, study.manifest["digest"], study.launch
    done = launch.from_first(lambda: finished(folder, jobs, digest))
    positions = {key: position for position, key in enumerate(jobs, start=1)}
    if launch.is_main:
        for key in done:
            print(f"[{positions[key]}/{len(jobs)}] {key}: finished in an earlier run, reused", flush=True)
    pending = [key for key in jobs if key not in done]
    (Path(folder) / RESULTS).mkdir(exist_ok=True)
    for index in launch.claimed(len(pending), label):
        key = pending[index]
        result = work(f"[{positions[key]}/{len(jobs)}{f', process {launch.rank}' if launch.enabled else ''}]",
                      key, jobs[key])
        text = json.dumps({"digest": digest, "result": result}, indent=1)
        replace_atomically(str(result_path(folder, key)), lambda temporary: Path(temporary).write_text(text))
    launch.barrier(label)
    results = finished(folder, jobs, digest)
    missing = [key for key in jobs if key not in results]
    if missing:
        raise UserError(f"{result_path(folder, missing[0])} is missing after every process finished its jobs: the "
                        f"study folder must be one all processes share (on several machines, a shared filesystem)")
    return results
