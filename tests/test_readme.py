"""The manual's commands (README.md and docs/*.md): every `python SCRIPT ...` names a script that exists and flags its
argparse accepts, and every block the demo cannot run says why.

Running them all takes minutes and the demo's outputs: `python scripts/check_readme.py` after `make demo`.
"""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import check_readme  # noqa: E402


def test_every_readme_command_parses():
    assert check_readme.parse_errors() == []


def test_the_docs_pages_are_checked_and_every_skipped_block_says_why():
    documents = check_readme.manual()
    assert documents[0] == REPO / "README.md" and REPO / "docs" / "deployment.md" in documents
    reasons = [skip for document in documents for _, _, skip in check_readme.blocks(document) if skip is not None]
    assert reasons and all(reason.strip("() ") for reason in reasons)


def test_a_bad_flag_in_a_docs_page_is_caught(tmp_path):
    page = tmp_path / "pruning.md"
    page.write_text("<!-- check_readme: skip (needs a Jetson) -->\n```bash\npython export.py w.pth --sise 128\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text("```bash\npython export.py w.pth --size 128\n```\n")
    assert [problem for _, problem in check_readme.parse_errors(readme, page)] == [
        check_readme.parse_error("python export.py w.pth --sise 128")]
    assert "--sise" in check_readme.parse_error("python export.py w.pth --sise 128")


def test_a_renamed_flag_or_script_is_caught(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("```bash\npython train.py a b c --learning_rate 0.1\npython trian.py a b c\n"
                      "python -m utils.data check x\n```\n<!-- check_readme: skip (S2DS) -->\n```bash\n"
                      "python test.py d --weigths w.pth\n```\n")
    problems = [problem for _, problem in check_readme.parse_errors(readme)]
    assert len(problems) == 3 and "--learning_rate" in problems[0] and "trian.py" in problems[1]
    assert "--weigths" in problems[2]
    assert [skip for _, _, skip in check_readme.blocks(readme)] == [None, "(S2DS)"]
