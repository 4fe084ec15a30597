"""The shape of the package: the import graph (imports inside functions included) has no cycle and never goes up
the layer order of docs/architecture.md; modules and functions stay small enough to read in one sitting."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "framework"

# Lower layers never import higher ones (the same table is in docs/architecture.md).
LAYERS = [
    ["errors", "io", "libs", "processes"],
    ["registry", "plugins"],
    ["recipe"],
    ["data", "transforms", "weights", "backbones", "models", "tasks", "losses", "loss_modules", "optim", "folders"],
    ["build", "resolve"],
    ["engine"],
    ["inference"],
    ["review"],
    ["runs", "api", "reports", "sweep", "tune"],
    ["cli", "cli_options", "cli_launch", "cli_search", "__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every framework module `path` imports, at module level or inside functions (`from framework import api`
    imports framework.api, not the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("framework")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("framework"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return found


@functools.cache  # read once per session; the tests only read it
def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p, set(files)) if i in files and i != m} for m, p in files.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    return LAYER[_top(module)]


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in _graph()} - set(LAYER))
    assert not missing, f"modules in no layer of LAYERS (and docs/architecture.md): {missing}"


def test_the_documented_layer_table_is_this_one():
    """docs/architecture.md's table lists the same modules per layer as LAYERS (what the graph tests check)."""
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (.+?) \| .+ \|$", doc, re.M)
    documented = [sorted(n.strip("/").removeprefix("framework/") for n in re.findall(r"`([^`]+)`", names))
                  for _, names in rows]
    assert documented == [sorted(names) for names in LAYERS]


def test_no_import_goes_up_the_layer_order():
    upward = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
              for m, deps in _graph().items() for i in deps if _layer(i) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_engine_imports_no_review_or_inference_code():
    engine = {m: deps for m, deps in _graph().items() if m.startswith("framework.engine")}
    bad = [f"{m} imports {d}" for m, deps in engine.items() for d in deps
           if d.startswith(("framework.review", "framework.inference", "framework.api", "framework.cli"))]
    assert not bad, bad


def _is_click_command(node) -> bool:
    return any("command" in ast.unparse(d) or "group" in ast.unparse(d) for d in node.decorator_list)


def test_modules_and_functions_are_small():
    """No module over 400 lines, no function over 50 lines or with more than 6 parameters (click commands, whose
    parameters are their options, aside)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 400:
            problems.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_click_command(node):
                continue
            size = node.end_lineno - node.lineno + 1
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            if size > 50 or len(params) > 6:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {size} lines, "
                                f"{len(params)} parameters")
    assert not problems, "\n".join(problems)


def _outside_the_task_kinds(pattern: re.Pattern, allowed: tuple = ()) -> list[str]:
    return [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in PACKAGE.rglob("*.py")
            if p.parent.name != "tasks" and str(p.relative_to(PACKAGE)) not in allowed
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]


def test_no_kind_branches_outside_the_task_kinds():
    """Task kinds are classes (framework/tasks/): nobody else asks `kind == "regression"`."""
    kinds = r"""["'](classification|regression|ordinal|anomaly|one_class)["']"""
    found = _outside_the_task_kinds(re.compile(rf"(==|!=)\s*{kinds}|\bin\s*[(\[{{]\s*{kinds}"))
    assert not found, "\n".join(found)


def test_no_code_asks_what_kind_a_head_is():
    """Nor by the flags a kind once carried: a head's state, value, number estimate and what it fits before
    validation are its own methods; a metrics record's shape is known to the metrics module alone."""
    flags = re.compile(r"""\.(regression|chooses_threshold|fits_normal)\b|["']tasks["']\s+(not\s+)?in\b""")
    found = _outside_the_task_kinds(flags, allowed=("engine/metrics.py",))
    assert not found, "\n".join(found)
    planted = "if head.regression:\n" + "if 'tasks' not in record:\n"  # the pattern sees what it is meant to
    assert len(flags.findall(planted)) == 2


def test_the_cli_imports_only_the_api():
    """The CLI parses, calls one `framework.api` function and prints what it returns (`framework.reports`, through
    the API); besides the API it knows only the errors it turns into messages and its own option modules."""
    allowed = {"framework.api", "framework.errors", "framework.cli_options", "framework.cli_launch",
               "framework.cli_search", "framework.cli"}
    graph = _graph()
    cli = [m for m in graph if _layer(m) == LAYER["cli"] and m != "framework"]
    assert set(cli) >= {"framework.cli", "framework.cli_search"}
    bad = [f"{m} imports {d}" for m in cli for d in graph[m] if d not in allowed]
    assert not bad, "\n".join(bad)


def test_the_engine_reads_no_recipe():
    """build hands the engine a frozen LoopConfig (epochs, seed, mixup, clipping, validation schedule, TTA, monitor,
    checkpoint policy, progress); the engine reads no recipe section."""
    from framework.build import Built, LoopConfig

    assert "recipe" not in Built.__dataclass_fields__ and LoopConfig.__dataclass_params__.frozen
    sections = re.compile(r"\brecipe\.(train|eval|logging|checkpoint|model|transforms|data|tasks|task_specs)\b")
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in (PACKAGE / "engine").rglob("*.py")
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if sections.search(line)]
    assert not found, "\n".join(found)
    assert sections.search("tr = b.recipe.train")  # what it looks for
