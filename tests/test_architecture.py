"""The floors of docs/ARCHITECTURE.md hold: imports point down only, every module has a floor, and no
function grows past 60 lines (declarative argument parsers excepted)."""
import ast
import re

import pytest

from conftest import REPO

MAX_FUNCTION_LINES = 60
PARSER_FUNCTIONS = {"get_args_parser"}


def floors():
    """{module name under utils: floor number} from the `floor N: a b c` lines of docs/ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = {}
    for number, names in re.findall(r"^floor (\d+): (.+)$", text, flags=re.MULTILINE):
        for name in names.split():
            assert name not in table, f"{name} is on two floors"
            table[name] = int(number)
    return table


def module_name(path):
    """'checkpoint' for utils/checkpoint.py, 'data' for utils/data/__init__.py, 'data.__main__' for its command."""
    parts = list(path.relative_to(REPO / "utils").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def utils_modules():
    return {module_name(path): path for path in (REPO / "utils").rglob("*.py") if module_name(path)}


def imported_utils_modules(path, known):
    """Every utils module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils":
            target = node.module[len("utils."):] if node.module != "utils" else ""
            if target:
                found.add(target)
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name[len("utils."):] for alias in node.names if alias.name.startswith("utils."))
    return {name if name in known else name.rsplit(".", 1)[0] for name in found}


def test_every_utils_module_has_a_floor():
    assert sorted(set(utils_modules()) - set(floors())) == []
    assert sorted(set(floors()) - set(utils_modules())) == []


def test_imports_point_only_down():
    table, modules = floors(), utils_modules()
    upward = []
    for name, path in modules.items():
        for target in imported_utils_modules(path, modules):
            if table[target] >= table[name]:
                upward.append(f"{name} (floor {table[name]}) imports {target} (floor {table[target]})")
    assert upward == []


def test_scripts_import_no_other_script():
    scripts = {path.stem for path in REPO.glob("*.py")}
    offending = []
    for path in list(REPO.glob("*.py")) + list((REPO / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offending += [f"{path.name} imports {name}" for name in names if name in scripts]
    assert offending == []


def test_floor_checker_sees_an_upward_import(tmp_path):
    """The checker itself works: a lazy import of a higher floor inside a function is caught."""
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from utils.pruning import run\n    from utils import model as m\n")
    assert imported_utils_modules(module, utils_modules()) == {"pruning", "model"}


def python_files():
    return [path for path in REPO.rglob("*.py") if ".venv" not in path.parts and "tests" not in path.parts]


@pytest.mark.parametrize("path", python_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_functions_stay_short(path):
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in PARSER_FUNCTIONS:
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{node.name}: {length} lines")
    assert long == []
