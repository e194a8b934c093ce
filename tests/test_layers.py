"""The import rules of docs/architecture.md, checked on the source: every `ddil_cli` import of
every module (read with ast, so nothing is executed; imports inside functions and under
`TYPE_CHECKING` count too) goes to a lower layer or to its own group, stages and CLI commands do
not import their siblings, nothing imports bench/ or tests/, and there is no import cycle, neither
between two modules (even of one group) nor between two packages."""

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
    ("models", ["models"]),
    ("rollout", ["rollout"]),
    ("specs", ["specs"]),
    ("buffer", ["buffer"]),
    ("methods", ["methods"]),
    ("priors", ["priors"]),
    ("train", ["train"]),
    ("evaluate", ["evaluate"]),
    ("stage helpers", ["sample_folder", "covariate_shift"]),
    ("stages", ["stages", "scripts"]),
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


def imports_of(source: str, modules: set[str] = ALL_MODULES) -> list[tuple[int, str]]:
    """(line, module inside ddil_cli) for every import, wherever it sits (top level, inside a
    function, under `if TYPE_CHECKING:`: a type-only import still ties the two modules together);
    `from ddil_cli.x import y` counts as ddil_cli.x.y when that is one of `modules`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ddil_cli" or alias.name.startswith("ddil_cli."):
                    found.append((node.lineno, alias.name.removeprefix("ddil_cli").lstrip(".")))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "ddil_cli" or node.module.startswith("ddil_cli.")):
            base = node.module.removeprefix("ddil_cli").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                found.append((node.lineno, sub if sub in modules else base))
    return sorted(found)


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


def package_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    """The top-level package or module a module belongs to: evaluate.run -> evaluate."""
    return module.split(".")[0]


def import_graph(sources: dict[str, str], node=lambda module: module) -> dict[str, set[str]]:
    """{node: nodes it imports} over `sources` ({module: its text}); `node` maps a module to its
    node (itself, or its package for the package graph). The package's own __init__ is left out."""
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    for me, source in sources.items():
        for _, target in imports_of(source, modules):
            if target in ("", "__init__") or target.split(".")[0] in ("bench", "tests"):
                continue
            while target not in modules and "." in target:  # `import ddil_cli.x.name` -> its module
                target = target.rsplit(".", 1)[0]
            if node(target) != node(me):
                graph.setdefault(node(me), set()).add(node(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None: a depth-first search for a back edge."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_import_follows_the_layer_rules():
    problems = [v for p in sorted(PACKAGE.rglob("*.py"))
                for v in violations(module_name(p), p.read_text(), str(p.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation():
    """The rules bite: a stage importing another stage and an upward import are caught, a
    type-checking-only import as well, and the buffer may import specs (below it) but not priors."""
    stage = ("from typing import TYPE_CHECKING\n"
             "from ddil_cli.stages.sample import run_sample\n"
             "from ddil_cli.cli import common\n"
             "if TYPE_CHECKING:\n    from ddil_cli.stages.collect import CollectConfig\n")
    found = violations("stages.probe", stage, "probe")
    assert len(found) == 3 and "do not import each other" in found[0] and "upward" in found[1], found
    assert "do not import each other" in found[2] and ":5:" in found[2], found
    found = violations("buffer.probe", "from ddil_cli.priors import parse_prior\n"
                                       "from ddil_cli.specs import read_prompts\n", "probe")
    assert len(found) == 1 and "upward" in found[0] and "priors" in found[0], found
    found = violations("diffusion.probe", "def f():\n    from ddil_cli.data import shards\n", "probe")
    assert len(found) == 1 and "sideways" in found[0] and ":2:" in found[0], found


def test_no_import_cycle_between_modules_or_packages():
    sources = package_sources()
    assert find_cycle(import_graph(sources)) is None, find_cycle(import_graph(sources))
    packages = import_graph(sources, node=package_of)
    assert find_cycle(packages) is None, find_cycle(packages)


def test_a_planted_cycle_is_caught():
    """Two modules of one group importing each other (one only for type checking, one inside a
    function), and two packages importing each other through different modules, are each found;
    the real package alone has neither."""
    sources = package_sources()
    planted = sources | {
        "evaluate.probe_a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    from ddil_cli.evaluate.probe_b import B\n",
        "evaluate.probe_b": "def b():\n    from ddil_cli.evaluate import probe_a\n"}
    assert find_cycle(import_graph(planted)) in (["evaluate.probe_a", "evaluate.probe_b", "evaluate.probe_a"],
                                                 ["evaluate.probe_b", "evaluate.probe_a", "evaluate.probe_b"])
    # models.digits is imported by evaluate.embedded; a models module importing evaluate closes a loop
    planted = sources | {"models.probe": "from ddil_cli.evaluate.frechet import frechet_distance\n"}
    assert find_cycle(import_graph(planted)) is None  # no module imports itself back...
    cycle = find_cycle(import_graph(planted, node=package_of))
    assert cycle is not None and {"models", "evaluate"} <= set(cycle), cycle  # ...but the packages do


def test_architecture_doc_names_every_layer_group():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [prefix for _, prefixes in LAYERS for prefix in prefixes
               if prefix != "__init__" and f"`{prefix.replace('.', '/')}" not in doc]
    assert not missing, f"docs/architecture.md does not list {missing}"
