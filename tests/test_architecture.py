"""The package's shape: layers import downward only, no import cycles (function-level imports
included), modules and functions of a readable size, RPC in one module, optimizers named in
their own module and the registry only (no generic module knows one), and layout tables in the
docs that match the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sm_dist

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sm_dist"
# Bottom to top. A module may import its own package and the layers below its own; packages
# that share a layer are siblings and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("sm_dist.exit_codes", "sm_dist.math", "sm_dist.whole_files"),
    ("sm_dist.pipeline",),
    ("sm_dist.optim", "sm_dist.data", "sm_dist.models"),
    ("sm_dist.config",),
    ("sm_dist.engine", "sm_dist.run"),  # siblings: the engine knows no training loop
    ("sm_dist.report",),
    ("sm_dist.launch",),
    ("sm_dist.api",),
    ("sm_dist.cli",),
    ("sm_dist.__main__", "sm_dist"),
]
MAX_LINES = 400
MAX_FUNCTION_LINES = 60  # a function's lines without its docstring
# Functions over the budget, each with why it stands as one piece (none today).
LONG_FUNCTIONS: dict[str, str] = {}
# Modules that serve every optimizer and so may name none (identifiers, strings, imports).
GENERIC = ("sm_dist.pipeline", "sm_dist.run", "sm_dist.report", "sm_dist.engine",
           "sm_dist.launch")
# What of sm_dist.optim a generic module may import: the interface, never an optimizer.
OPTIM_INTERFACE = {"sm_dist.optim", "sm_dist.optim.base", "sm_dist.optim.metrics",
                   "sm_dist.optim.options", "sm_dist.optim.registry"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    """The layer unit a module belongs to: its top-level subpackage, or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in MODULES else module


def layer(module: str) -> int:
    name = unit(module)
    return next(i for i, units in enumerate(LAYERS) if name in units)


def imports(module: str) -> set[str]:
    """The sm_dist modules `module` imports anywhere in its body (functions included)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from a.b import c` imports a.b.c when c is a module
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        assert any(unit(module) in units for units in LAYERS), f"{module} has no layer"


def test_layers_import_downward_only() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            same_unit = unit(target) == unit(module)
            if not same_unit and layer(target) >= layer(module) and target != "sm_dist":
                wrong.append(f"{module} imports {target}")
    assert not wrong, "upward or sideways imports:\n  " + "\n  ".join(sorted(wrong))


def test_there_are_no_import_cycles() -> None:
    cycles, state = [], dict.fromkeys(GRAPH, 0)  # 0 new, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state[target] == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif state[target] == 0:
                visit(target, path + [module])
        state[module] = 2

    for module in GRAPH:
        if state[module] == 0:
            visit(module, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_modules_stay_readable() -> None:
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
    first = node.body[0] if node.body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        lines -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
    return lines


def test_functions_stay_readable() -> None:
    long = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{module}.{node.name}"
                if _function_lines(node) > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = _function_lines(node)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring aside): {long}"


def _optimizer_names() -> tuple[set[str], set[str]]:
    """Every registered optimizer's job-file name, and the names of the classes of their
    modules (the optimizer, its options, its stage part, its metrics and reports)."""
    from sm_dist.optim import registry

    names = set(registry.NAMES)
    classes = set()
    for optimizer in registry.BUILTIN:
        module = sys.modules[optimizer.__module__]
        classes |= {name for name, value in vars(module).items()
                    if isinstance(value, type) and value.__module__ == module.__name__}
    return names, classes


def test_no_generic_module_names_an_optimizer() -> None:
    """pipeline/, run/, report/, engine/ and launch/ serve every optimizer: none of their code
    imports an optimizer's module, uses one of its classes or spells an optimizer's name."""
    names, classes = _optimizer_names()
    found = []
    for module, path in MODULES.items():
        if not module.startswith(GENERIC):
            continue
        for target in GRAPH[module]:
            if target.startswith("sm_dist.optim") and target not in OPTIM_INTERFACE:
                found.append(f"{module} imports {target}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{module}:{node.lineno} spells {node.value!r}")
            elif isinstance(node, (ast.Name, ast.alias)):
                identifier = node.id if isinstance(node, ast.Name) else node.name
                if identifier in classes:
                    found.append(f"{module}:{getattr(node, 'lineno', '?')} uses {identifier}")
    assert not found, "generic modules that know an optimizer:\n  " + "\n  ".join(found)


def test_the_engine_knows_no_training_loop_or_report() -> None:
    engine = [m for m in MODULES if m.startswith("sm_dist.engine")]
    wrong = [f"{m} imports {t}" for m in engine for t in GRAPH[m]
             if t.startswith(("sm_dist.run", "sm_dist.report", "sm_dist.launch"))]
    assert not wrong, wrong


def test_a_stage_process_imports_no_plotting() -> None:
    """What a stage process imports before training (the command line, the rank, the worker)
    leaves matplotlib out: only rank 0 draws, at the end (0.4 s of start-up per process)."""
    code = ("import sys, sm_dist.cli, sm_dist.launch.rank, sm_dist.engine.worker; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_every_module_says_what_it_is_in_one_line() -> None:
    for module, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{module} has no docstring"


def test_rpc_is_imported_by_the_transport_alone() -> None:
    def imports_rpc(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.startswith("torch.distributed.rpc") for name in names):
                return True
        return False

    assert [m for m, p in MODULES.items() if imports_rpc(p)] == ["sm_dist.engine.transport"]


def test_each_baseline_is_named_in_its_module_and_the_registry_only() -> None:
    for name in ("gd_armijo", "sso", "cgblock", "ddg"):
        named = sorted(m for m, p in MODULES.items() if name in p.read_text(encoding="utf-8"))
        assert named == sorted([f"sm_dist.optim.{name}", "sm_dist.optim.registry"]), named


# ------------------------------------------------------------------------ layout tables
def table_paths(path: Path, heading: str) -> set[str]:
    """The `sm_dist/...` paths in the first column of the table under `heading`."""
    text = path.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:m.start()] if (m := re.search(r"\n#{1,3} ", section[1:])) else section
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {p for row in rows for p in re.findall(r"`(sm_dist/[\w/.]*)`", row.split("|")[1])}


def test_the_readme_layout_names_every_package_and_top_module() -> None:
    named = table_paths(REPO / "README.md", "## Layout")
    expected = {f"{p.relative_to(REPO)}/" for p in PACKAGE.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    expected |= {str(p.relative_to(REPO)) for p in PACKAGE.glob("*.py")
                 if p.name != "__init__.py"}
    assert named == expected, (sorted(named - expected), sorted(expected - named))


@pytest.mark.parametrize("heading", ["## Where each piece lives"])
def test_the_architecture_page_names_every_module(heading: str) -> None:
    named = table_paths(REPO / "docs" / "architecture.md", heading)
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py"}
    missing = sorted(modules - named)
    ghosts = sorted(p for p in named if not (REPO / p).exists())
    assert not missing and not ghosts, f"not named: {missing}; named but absent: {ghosts}"


def _names_a_module(dotted: str) -> bool:
    """sm_dist.a.b.Attr is fine when sm_dist.a.b (or sm_dist.a) is one of the modules, and
    sm_dist.name when the package exports it (`sm_dist.train`)."""
    parts = dotted.split(".")
    if len(parts) == 2 and parts[1] in sm_dist.__all__:
        return True
    return any(".".join(parts[:k]) in MODULES for k in range(2, len(parts) + 1))


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_module_the_docs_name_exists(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    paths = set(re.findall(r"\bsm_dist/[\w/]+(?:\.py|/)", text))
    dotted = set(re.findall(r"\bsm_dist(?:\.[a-z_]+)+", text))
    missing = [p for p in paths if not (REPO / p).exists()]
    missing += [d for d in dotted if not _names_a_module(d)]
    assert not missing, f"{page.name} names what does not exist: {sorted(missing)}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_the_docs_python_imports_work(page: Path) -> None:
    """Every `from sm_dist... import ...` line of the page's code imports."""
    lines = re.findall(r"^(?:from sm_dist[\w.]* import [\w, ]+|import sm_dist[\w.]*)$",
                       page.read_text(encoding="utf-8"), re.M)
    for line in lines:
        exec(line, {})  # noqa: S102 - the docs' own import lines


def test_the_readme_documents_every_record_field_and_no_other() -> None:
    """metrics.jsonl's JSON form is documented once, in the README's table of keys."""
    import dataclasses

    from sm_dist.run.metrics import IterationRecord

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| key | meaning |"):].split("\n\n")[0]
    documented = {key for row in table.splitlines()[2:]
                  for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == {f.name for f in dataclasses.fields(IterationRecord)}


def test_the_readme_documents_every_optimizers_section() -> None:
    """Each built-in optimizer's Metrics fields are the keys of its row (a row's `those of X`
    brings X's keys in), and no more."""
    from sm_dist.optim import registry

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| optimizer | section keys |"):].split("\n\n")[0]
    rows = {}
    for row in table.splitlines()[2:]:
        names, keys = row.split("|")[1:3]
        for name in re.findall(r"`([a-z_]+)`", names):
            rows[name] = keys

    def keys_of(name: str) -> set[str]:
        keys = rows[name]
        inherited = re.findall(r"those of `([a-z_]+)`", keys)
        own = set(re.findall(r"`([a-z_]+)`", re.sub(r"those of `[a-z_]+`", "", keys)))
        return own.union(*(keys_of(other) for other in inherited))

    for optimizer in registry.BUILTIN:
        assert keys_of(optimizer.name) == set(optimizer.Metrics.names()), optimizer.name
