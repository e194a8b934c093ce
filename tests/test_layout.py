"""Size limits of the code, read with ast (nothing is executed): no function in ddil_cli/ over 80
lines, no method file (ddil_cli/methods/) over 300, and the distill stage a package of small
modules. A function or file that grows past them is split, never exempted."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddil_cli"
MAX_FUNCTION_LINES = 80
MAX_METHOD_FILE_LINES = 300
MAX_DISTILL_MODULE_LINES = 300


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `source` longer than `limit` lines."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_over_80_lines():
    found = [f"{path.relative_to(ROOT)}: {name} has {lines} lines" for path in sorted(PACKAGE.rglob("*.py"))
             for name, lines in long_functions(path.read_text(), MAX_FUNCTION_LINES)]
    assert not found, "split these functions:\n" + "\n".join(found)


def test_no_method_file_over_300_lines():
    found = [f"{path.relative_to(ROOT)}: {n} lines" for path in sorted((PACKAGE / "methods").glob("*.py"))
             if (n := len(path.read_text().splitlines())) > MAX_METHOD_FILE_LINES]
    assert not found, "a method is one file of at most 300 lines; move shared parts down:\n" + "\n".join(found)


def test_the_distill_stage_is_a_package_of_small_modules():
    modules = sorted((PACKAGE / "stages" / "distill").glob("*.py"))
    assert {p.stem for p in modules} >= {"plan", "batches", "dagger", "runfolder", "phase", "stage"}
    found = [f"{p.name}: {n}" for p in modules if (n := len(p.read_text().splitlines())) > MAX_DISTILL_MODULE_LINES]
    assert not found, found
    assert len((PACKAGE / "stages" / "distill" / "stage.py").read_text().splitlines()) <= 150


def test_the_checker_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def long():\n{body}\n", MAX_FUNCTION_LINES) == [("long", MAX_FUNCTION_LINES + 1)]
    assert long_functions("class A:\n    def ok(self):\n        return 1\n", MAX_FUNCTION_LINES) == []
