"""Run the manual's commands (README.md, then docs/*.md), in the order written, on a scratch copy of the repository
and its demo outputs.

    make demo && .venv/bin/python scripts/check_readme.py [--results results] [--keep] [DOCUMENT ...]

Every ```bash and ```python block of the documents (default: README.md and every docs/*.md) is run in one fresh
copy (the tracked files, `.venv` linked, `results/` copied), with `.venv` activated as the README says, and each
command's exit status is reported; exit status 1 when any failed. Give one document to check its blocks alone. A
block right after a line `<!-- check_readme: skip REASON -->` needs what the demo does not have (the S2DS release,
a GPU, several GPUs, a Jetson, your own photos) and is only parsed. `parse_errors()` (used by tests/test_readme.py)
checks that every `python SCRIPT ...` line of the manual, skipped or not, names a script that exists and flags its
argparse accepts, so a renamed flag fails CI.
"""
import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*check_readme:\s*skip\b(.*?)-->")


def blocks(document):
    """[(language, text, skip reason or None)] for every ```bash and ```python block of a Markdown file, in order."""
    found, lines, index = [], Path(document).read_text().splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening or not opening.group(1):
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if opening.group(1) in ("bash", "python"):
            before = lines[index - 1] if index else ""
            skip = SKIP.search(before)
            found.append((opening.group(1), "\n".join(lines[index + 1:end]), skip.group(1).strip() if skip else None))
        index = end + 1
    return found


def commands(text):
    """The shell commands of a bash block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


class _Parsed(Exception):
    """Raised instead of running a script once its arguments parsed."""


def _script_argv(command):
    """(module name, argv) of a `python SCRIPT ...`, `python -m MODULE ...` or `torchrun ... SCRIPT ...` line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:  # the first command of a pipeline or list; comments are dropped by the lexer
        if set(word) <= set("|&;<>()"):
            break
        words.append(word)
    if words and words[0] == "torchrun":
        words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
    if len(words) < 2 or Path(words[0]).name not in ("python", "python3") or words[1] == "-c":
        return None
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


def parse_error(command):
    """None when the command's script exists and accepts its arguments; else a line saying what is wrong."""
    target = _script_argv(command)
    if target is None:
        return None
    name, argv = target
    if name.endswith(".py"):
        if not (REPO / name).is_file():
            return f"no such script: {name}"
        name = name[:-3].replace("/", ".")
    module = importlib.import_module(name if name != "utils.data" else "utils.data.__main__")
    original = argparse.ArgumentParser.parse_args

    def parse_only(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_only
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors, contextlib.redirect_stdout(io.StringIO()):
            module.main(argv)
    except _Parsed:
        return None
    except SystemExit:
        return errors.getvalue().strip() or "argparse refused the arguments"
    finally:
        argparse.ArgumentParser.parse_args = original
    return "the script ran without parsing its arguments"


def manual():
    """The documents whose command blocks are checked: README.md, then docs/*.md by name."""
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def parse_errors(*documents):
    """[(command, problem)] for every python command of the documents (default: the manual) whose script or flags
    do not exist."""
    return [(command, problem) for document in documents or manual()
            for language, text, _ in blocks(document) if language == "bash"
            for command in commands(text) if (problem := parse_error(command))]


def scratch_copy(results, where):
    """The tracked files, .venv linked and the demo outputs copied: a fresh clone after `make demo`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, where / name)
    (where / ".venv").symlink_to(REPO / ".venv")
    shutil.copytree(results, where / "results", symlinks=True)


def run_all(documents, where):
    """Run every command of the documents in order; [(command, exit status, last stderr line)]."""
    outcome = []
    for document, (language, text, skip) in ((document, block) for document in documents
                                             for block in blocks(document)):
        if skip is not None:
            print(f"skipped ({skip}): {commands(text)[0] if language == 'bash' else 'a python block'}")
            continue
        lines = commands(text) if language == "bash" else [f"python - <<'PYTHON'\n{text}\nPYTHON"]
        for command in lines:
            shell = f"source .venv/bin/activate && {command}"
            result = subprocess.run(["bash", "-c", shell], cwd=where, capture_output=True, text=True,
                                    env={**os.environ, "MPLBACKEND": "Agg"})
            last = (result.stderr.strip().splitlines() or [""])[-1]
            outcome.append((command.splitlines()[0], result.returncode, last))
            status = "ok" if result.returncode == 0 else f"FAILED {result.returncode}"
            print(f"[{status}] {Path(document).name}: {command.splitlines()[0]}"
                  + (f"\n    {last}" if result.returncode else ""), flush=True)
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "results"), help="the demo outputs (default: results/)")
    parser.add_argument("documents", nargs="*", help="Markdown files to run (default: README.md and docs/*.md)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy and say where it is")
    args = parser.parse_args(argv)
    missing = [document for document in args.documents if not Path(document).is_file()]
    if missing or not (Path(args.results) / "runs" / "demo" / "best.pth").is_file():
        print(f"check_readme: no such document: {missing[0]}" if missing else
              f"check_readme: no demo outputs in {args.results}; run `make demo` first", file=sys.stderr)
        sys.exit(2)
    where = Path(tempfile.mkdtemp(prefix="check_readme_"))
    try:
        scratch_copy(args.results, where)
        outcome = run_all(args.documents or manual(), where)
    finally:
        if args.keep:
            print(f"scratch copy kept in {where}")
        else:
            shutil.rmtree(where, ignore_errors=True)
    failed = [command for command, status, _ in outcome if status]
    print(f"{len(outcome) - len(failed)} of {len(outcome)} commands of the manual succeeded")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
