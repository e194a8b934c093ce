"""The import rules of docs/architecture.md, checked on the source: every `ddil_cli` import of
every module (read with ast, so nothing is executed) goes to a lower layer or to its own group,
stages and CLI commands do not import their siblings, and nothing imports bench/ or tests/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddil_cli"

# (layer, module prefixes), lowest first: a module may import its own group and any layer below.
# Keep in step with the table in docs/architecture.md.
LAYERS = [
    ("foundation", ["__init__", "errors"]),
    ("files and values", ["atomic", "validate"]),
    ("manifests", ["manifest"]),
    ("diffusion, data", ["diffusion", "data"]),
    ("models", ["models", "lab", "lab.digits"]),  # "lab": its package __init__ and any new lab module
    ("rollout", ["rollout"]),
    ("specs", ["specs"]),
    ("buffer", ["buffer"]),
    ("methods", ["methods"]),
    ("priors", ["priors"]),
    ("train", ["train"]),
    ("evaluate", ["evaluate"]),
    ("shared by stages", ["sampling", "shift"]),
    ("stages", ["stages", "lab.measure", "lab.train_classifier"]),
    ("cli", ["cli"]),
    ("entry point", ["__main__"]),
]
# groups whose members are peers that must not import each other (what they share moves down)
NO_SIBLINGS = {"stages": "stages", "cli": "cli"}
SIBLING_EXCEPTIONS = {("cli", "cli.common"), ("cli.app", "cli")}  # every command uses common; app registers all


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)  # the package's own __init__ stays "__init__"


ALL_MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def group_of(module: str) -> tuple[int, str]:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    if best is None:
        raise AssertionError(f"ddil_cli.{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str) -> list[tuple[int, str]]:
    """(line, module inside ddil_cli) for every runtime import; `from ddil_cli.x import y` counts
    as ddil_cli.x.y when that is a module. Imports only for type checking do not count."""
    tree = ast.parse(source)
    found = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ddil_cli" or alias.name.startswith("ddil_cli."):
                    found.append((node.lineno, alias.name.removeprefix("ddil_cli").lstrip(".")))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "ddil_cli" or node.module.startswith("ddil_cli.")):
            base = node.module.removeprefix("ddil_cli").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                found.append((node.lineno, sub if sub in ALL_MODULES else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def violations(me: str, source: str, label: str) -> list[str]:
    """What breaks the rules in `source`, the text of module ddil_cli.`me` (shown as `label`)."""
    my_rank, my_group = group_of(me)
    out = []
    for line, target in imports_of(source):
        if target in ("", "__init__") or target == me:
            continue  # the package itself (ddil_cli.__version__)
        if target.split(".")[0] in ("bench", "tests"):
            out.append(f"{label}:{line} imports {target}: the package never imports bench/tests")
            continue
        rank, group = group_of(target)
        where = f"{label}:{line}: {me} ({LAYERS[my_rank][0]}) imports {target} ({LAYERS[rank][0]})"
        if rank > my_rank:
            out.append(where + ": an upward import")
        elif group in NO_SIBLINGS and group == my_group and me.split(".")[:2] != target.split(".")[:2]:
            if not any((me == a or me.startswith(a + ".")) and (target == b or target.startswith(b + "."))
                       for a, b in SIBLING_EXCEPTIONS):
                out.append(where + ": stages/commands do not import each other; move what they share down")
        elif rank == my_rank and group != my_group:
            out.append(where + ": a sideways import between two groups of one layer")
    return out


def test_every_import_follows_the_layer_rules():
    problems = [v for p in sorted(PACKAGE.rglob("*.py"))
                for v in violations(module_name(p), p.read_text(), str(p.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation():
    """The rules bite: a stage importing another stage and an upward import are caught, a
    type-checking-only import is not, and the buffer may import specs (below it) but not priors."""
    stage = ("from typing import TYPE_CHECKING\n"
             "from ddil_cli.stages.sample import run_sample\n"
             "from ddil_cli.cli import common\n"
             "if TYPE_CHECKING:\n    from ddil_cli.stages.collect import CollectConfig\n")
    found = violations("stages.probe", stage, "probe")
    assert len(found) == 2 and "do not import each other" in found[0] and "upward" in found[1], found
    found = violations("buffer.probe", "from ddil_cli.priors import parse_prior\n"
                                       "from ddil_cli.specs import read_prompts\n", "probe")
    assert len(found) == 1 and "upward" in found[0] and "priors" in found[0], found
    found = violations("models.probe", "from ddil_cli.lab import digits\n", "probe")
    assert len(found) == 1 and "sideways" in found[0], found


def test_architecture_doc_names_every_layer_group():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [prefix for _, prefixes in LAYERS for prefix in prefixes
               if prefix != "__init__" and f"`{prefix.replace('.', '/')}" not in doc]
    assert not missing, f"docs/architecture.md does not list {missing}"
