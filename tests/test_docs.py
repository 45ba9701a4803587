"""The documentation against the code: every job-file key, its default and allowed values, the
commands and files the docs name, and the schedule grid they show."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import yaml

from sm_dist.cli import build_parser, main
from sm_dist.config.job import JobConfig, job_from_dict

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"
DOC_FILES = sorted(DOCS.glob("*.md"))

KEY_CELL = re.compile(r"`([a-z_]+(?:\.[a-z_]+)*)`")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)


# ------------------------------------------------------------------------------ the schema
@dataclasses.dataclass(frozen=True)
class SchemaKey:
    key: str
    field: dataclasses.Field
    type: Any
    # For a key of the optimizer section: each optimizer that takes it, with its field there
    # (defaults may differ between optimizers).
    owners: tuple[tuple[str, dataclasses.Field], ...] = ()


def _sections(tp: Any) -> list[type]:
    return [arg for arg in (tp, *get_args(tp)) if dataclasses.is_dataclass(arg)]


def schema_keys(cls: type = JobConfig, prefix: str = "",
                owner: str | None = None) -> dict[str, SchemaKey]:
    """Every dotted key below `cls`: each field, and the fields of any dataclass its type holds
    (so `optimizer.inner_steps`, an int or a section, gives itself and its sub-keys); the
    optimizer section gives every registered optimizer's keys, each once, with its owners."""
    keys: dict[str, SchemaKey] = {}
    hints = get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key = f"{prefix}.{spec.name}" if prefix else spec.name
        keys[key] = SchemaKey(key, spec, hints[spec.name],
                              ((owner, spec),) if owner is not None else ())
        if "variants" in spec.metadata:  # the optimizer section: each optimizer's Options
            from sm_dist.optim import registry

            for name in registry.NAMES:
                for sub, entry in schema_keys(registry.get(name).Options, key, name).items():
                    known = keys.get(sub)
                    owners = (known.owners if known is not None else ()) + entry.owners
                    keys[sub] = dataclasses.replace(entry, owners=owners)
            continue
        for section in _sections(hints[spec.name]):
            keys.update(schema_keys(section, key, owner))
    return keys


# -------------------------------------------------------------------- the configuration page
def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented_rows() -> dict[str, dict[str, str]]:
    """The rows of the key tables of docs/configuration.md (tables whose first header cell is
    `key`), by dotted key, as {column name: cell}."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            continue
        if header[0] != "key" or set(line) <= set("|- "):
            continue
        match = KEY_CELL.fullmatch(cells[0])
        assert match, f"configuration.md: first cell {cells[0]!r} is not one `dotted.key`"
        key = match.group(1)
        assert key not in rows, f"configuration.md documents {key} twice"
        assert len(cells) == len(header), f"configuration.md: row {key} has {len(cells)} cells"
        rows[key] = dict(zip(header, cells))
    return rows


def test_every_schema_key_is_documented_and_no_other() -> None:
    documented, schema = set(documented_rows()), set(schema_keys())
    missing, extra = sorted(schema - documented), sorted(documented - schema)
    assert not missing and not extra, (
        f"docs/configuration.md is out of step with sm_dist.config.JobConfig:\n"
        f"  missing from the docs: {', '.join(missing) or 'none'}\n"
        f"  documented but not in the schema: {', '.join(extra) or 'none'}")


def _is_required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _default(spec: dataclasses.Field) -> Any:
    return spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()


def _same(written: Any, actual: Any) -> bool:
    """Whether a default as the docs write it (parsed as YAML) is the schema's default."""
    if isinstance(actual, bool) or isinstance(written, bool):
        return written is actual
    if isinstance(actual, float):
        if isinstance(written, str):  # YAML 1.1 reads 1e-8 as a string; the schema does not
            try:
                written = float(written)
            except ValueError:
                return False
        return isinstance(written, (int, float)) and float(written) == actual
    if isinstance(actual, list):
        return (isinstance(written, list) and len(written) == len(actual)
                and all(_same(w, a) for w, a in zip(written, actual)))
    return type(written) is type(actual) and written == actual


def test_documented_defaults_match_the_schema() -> None:
    rows, schema = documented_rows(), schema_keys()
    wrong = []
    for key, entry in schema.items():
        cell = rows.get(key, {}).get("default")
        if cell is None:
            continue  # reported by the key-set test
        if len({repr(_default(f)) for _, f in entry.owners if not _is_required(f)}) > 1:
            wrong += _per_optimizer_defaults(key, cell, entry)
            continue
        spec = entry.field
        if _is_required(spec):
            expected_ok = cell == "required"
        elif dataclasses.is_dataclass(default := _default(spec)):
            expected_ok = cell == "all defaults"
        else:
            match = re.fullmatch(r"`([^`]*)`", cell)
            expected_ok = match is not None and _same(yaml.safe_load(match.group(1)), default)
        if not expected_ok:
            shown = "required" if _is_required(spec) else repr(_default(spec))
            wrong.append(f"{key}: the docs say {cell!r}, the schema {shown}")
    assert not wrong, "defaults in docs/configuration.md differ:\n  " + "\n  ".join(wrong)


def _per_optimizer_defaults(key: str, cell: str, entry: SchemaKey) -> list[str]:
    """A key whose default differs between optimizers: the cell reads `v1` (a, b); `v2` (c),
    each optimizer named after its default."""
    named = dict(re.findall(r"`([^`]*)` \(([^)]*)\)", cell))
    wrong = []
    for name, spec in entry.owners:
        written = next((v for v, names in named.items()
                        if name in [n.strip() for n in names.split(",")]), None)
        if written is None or not _same(yaml.safe_load(written), _default(spec)):
            wrong.append(f"{key}: the docs say {cell!r}, {name}'s default is {_default(spec)!r}")
    return wrong


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def test_documented_allowed_values_match_the_schema() -> None:
    """Every choice appears in backticks in the `allowed` column, and every bound as `>= v`,
    `> v`, `<= v` or `< v`."""
    rows, schema = documented_rows(), schema_keys()
    wrong = []
    symbols = {"min": ">=", "gt": ">", "max": "<=", "lt": "<"}
    for key, entry in schema.items():
        allowed = rows.get(key, {}).get("allowed")
        if allowed is None:
            continue
        rules = entry.field.metadata
        shown = set(re.findall(r"`([^`]*)`", allowed))
        for choice in rules.get("choices", ()):
            if choice not in shown:
                wrong.append(f"{key}: choice {choice!r} not listed")
        if "choices" in rules and not shown <= set(rules["choices"]):
            wrong.append(f"{key}: lists {sorted(shown - set(rules['choices']))}, not choices")
        for rule, symbol in symbols.items():
            if rule in rules:
                bound = f"{symbol} {_number(rules[rule])}"
                if not re.search(rf"(^|[^<>=]){re.escape(bound)}\b", allowed):
                    wrong.append(f"{key}: bound {bound!r} not written")
    assert not wrong, "allowed values in docs/configuration.md differ:\n  " + "\n  ".join(wrong)


# --------------------------------------------------------------------- commands and files
def code_blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]


def command_lines(block: str) -> list[str]:
    """The lines of a code block with backslash continuations joined and prompts removed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip().removeprefix("$ ") for line in joined.splitlines() if line.strip()]


SHELL_BREAKS = {"&&", "||", ";", "|", "&"}


def sm_dist_invocations(line: str) -> list[list[str]]:
    """The argument lists given to sm-dist on one shell line (`sm-dist ...`, `.venv/bin/sm-dist
    ...`, `python -m sm_dist ...`, `torchrun ... -m sm_dist ...`)."""
    if line.startswith("#"):
        return []
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    found = []
    for i, token in enumerate(tokens):
        if Path(token).name == "sm-dist":
            start = i + 1
        elif token == "sm_dist" and i > 0 and tokens[i - 1] == "-m":
            start = i + 1
        else:
            continue
        args = []
        for arg in tokens[start:]:
            if arg in SHELL_BREAKS or re.match(r"\d?[<>]", arg):
                break
            if not arg.endswith("..."):  # a placeholder for more arguments: ARGS...
                args.append(arg)
        found.append(args)
    return found


def documented_invocations() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every sm-dist command in a code block of docs/*.md."""
    found = []
    for path in DOC_FILES:
        for _, block in code_blocks(path):
            for line in command_lines(block):
                found += [(f"{path.name}: {line}", args) for args in sm_dist_invocations(line)]
    return found


INVOCATIONS = documented_invocations()


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for action in actions for name in action.choices}


def test_docs_show_sm_dist_commands() -> None:
    assert len(INVOCATIONS) >= 10, "the command extraction found (almost) nothing"


@pytest.mark.parametrize("where,args", INVOCATIONS,
                         ids=[f"{where.split(':')[0]}-{i}" for i, (where, _) in
                              enumerate(INVOCATIONS)])
def test_every_documented_command_parses(where: str, args: list[str]) -> None:
    """Every sm-dist command line in a code block names a subcommand and only its options."""
    parser = build_parser()
    commands = subcommands(parser)
    assert args and (args[0] in commands or args[0] in ("-h", "--help")), (
        f"{where}: {args[:1]} is not one of the subcommands {sorted(commands)}")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exit_:
        assert exit_.code == 0, f"{where}: sm-dist would refuse it: {errors.getvalue()}"


CONFIG_PATH = re.compile(r"configs/[\w./-]+?\.ya?ml\b")


@pytest.mark.parametrize("path", [*DOC_FILES, REPO / "README.md"], ids=lambda p: p.name)
def test_mentioned_config_files_exist(path: Path) -> None:
    mentioned = set(CONFIG_PATH.findall(path.read_text(encoding="utf-8")))
    missing = sorted(m for m in mentioned if not (REPO / m).is_file())
    assert not missing, f"{path.name} mentions job files that do not exist: {missing}"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_example_jobs_are_valid(path: Path) -> None:
    """Every YAML block in the docs that is a whole job (it has a name) validates."""
    for language, block in code_blocks(path):
        if language != "yaml":
            continue
        raw = yaml.safe_load(block)
        if isinstance(raw, dict) and "name" in raw:
            job_from_dict(raw, source=f"{path.name} example")


def test_architecture_shows_the_real_schedule_grid(capsys: pytest.CaptureFixture[str]) -> None:
    """The grid in docs/architecture.md is what `sm-dist schedule configs/quickstart.yaml`
    prints now."""
    assert main(["schedule", str(REPO / "configs" / "quickstart.yaml")]) == 0
    printed = capsys.readouterr().out
    grid = printed[printed.index("\nstage  ") + 1:].rstrip("\n")
    assert grid in (DOCS / "architecture.md").read_text(encoding="utf-8"), (
        "docs/architecture.md no longer shows the grid that `sm-dist schedule "
        f"configs/quickstart.yaml` prints:\n{grid}")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))  # a '#' in a code block is no heading
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", [*DOC_FILES, REPO / "README.md"], ids=lambda p: p.name)
def test_links_between_pages_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.is_file():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name} links to missing files or headings: {broken}"
