"""Loading and validating entry files: every problem of every file, as ``path: field: reason``.

YAML is read with a safe loader that also rejects duplicate keys; a tag that would construct Python
objects is reported, never executed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from catalog.schema import Entry

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
ENTRIES_DIR = PACKAGE_DIR / "entries"
SCHEMA_LINE = "# yaml-language-server: $schema=../../entry.schema.json"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: {self.reason}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def display_path(path: Path) -> str:
    """Path relative to the working directory when possible, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _field_name(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif isinstance(item, str) and (item.startswith(("function-", "literal[")) or item in ("str", "int", "float", "bool", "list[union[int,float]]")):
            continue  # pydantic's union-branch labels, not field names
        else:
            parts.append(str(item))
    return ".".join(parts) or "<entry>"


def _reason(err: dict) -> str:
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "extra_forbidden":
        return "unknown field (not in the schema; check the spelling)"
    if err.get("type") == "missing":
        return "required field is missing"
    if err.get("type") == "literal_error":
        got = err.get("input")
        return f"{got!r} is not allowed; {msg[0].lower()}{msg[1:]}"
    return msg


def parse_yaml(path: Path) -> tuple[object | None, list[Problem]]:
    """Read one YAML file safely; return its data or the problems reading it."""
    shown = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(shown, "<file>", f"cannot read: {exc}")]
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), []  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1})" if mark else ""
        problem = str(exc.problem or exc)
        if "could not determine a constructor" in problem:
            tag = problem.split("for the tag", 1)[-1].strip()
            problem = f"YAML tag {tag} is not allowed (entries are read with safe loading only)"
        return None, [Problem(shown, "<yaml>", f"{problem}{where}")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return None, [Problem(shown, "<yaml>", f"invalid YAML: {problem}{where}")]


def validate_data(data: object, path: Path) -> tuple[Entry | None, list[Problem]]:
    """Validate parsed YAML against the schema and the file-level rules (stem, folder, module file)."""
    shown = display_path(path)
    if not isinstance(data, dict):
        return None, [Problem(shown, "<entry>", "the file must hold a mapping of fields (key: value)")]
    problems: list[Problem] = []
    try:
        entry = Entry.model_validate(data)
    except ValidationError as exc:
        seen: set[tuple[str, str]] = set()
        for err in exc.errors():
            key = (_field_name(err["loc"]), _reason(err))
            if key not in seen:
                seen.add(key)
                problems.append(Problem(shown, *key))
        entry = None
    if isinstance(data.get("id"), str) and data["id"] != path.stem:
        problems.append(Problem(shown, "id", f"{data['id']!r} must equal the file name stem {path.stem!r}"))
    tax = data.get("taxonomy")
    category = tax.get("category") if isinstance(tax, dict) else None
    if isinstance(category, str) and category != path.parent.name:
        problems.append(Problem(
            shown, "taxonomy.category", f"{category!r} must equal the folder name {path.parent.name!r}"
        ))
    impl = data.get("implementation")
    module = impl.get("module") if isinstance(impl, dict) else None
    if entry is not None and entry.implementation.module:
        expected = f"implementations/{entry.category}/{entry.id}.py"
        if entry.implementation.module != expected:
            problems.append(Problem(shown, "implementation.module", f"must be {expected!r} (one name everywhere)"))
        elif not (REPO_ROOT / module).is_file():
            problems.append(Problem(shown, "implementation.module", f"file {module!r} does not exist"))
    return (entry if not problems else None), problems


def load_entry(path: Path) -> tuple[Entry | None, list[Problem]]:
    data, problems = parse_yaml(path)
    if problems:
        return None, problems
    return validate_data(data, path)


def entry_files(paths: Iterable[Path] | None = None) -> list[Path]:
    """The YAML files under the given files or folders (default: every shipped entry)."""
    roots = list(paths) if paths else [ENTRIES_DIR]
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files.extend(sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(root)
    return files


def load_all(paths: Iterable[Path] | None = None) -> tuple[list[Entry], list[Problem]]:
    """Load and validate every entry; report every problem of every file, and duplicate ids."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for path in entry_files(paths):
        if not path.exists():
            problems.append(Problem(display_path(path), "<file>", "no such file"))
            continue
        entry, found = load_entry(path)
        problems.extend(found)
        if entry is None:
            continue
        if entry.id in first_seen:
            problems.append(Problem(display_path(path), "id", f"duplicate id {entry.id!r} (also in {first_seen[entry.id]})"))
            continue
        first_seen[entry.id] = display_path(path)
        entries.append(entry)
    return entries, problems


def closest_ids(name: str, ids: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(ids), n=n, cutoff=0.4)


class UnknownId(LookupError):
    """An id that no entry has; the message names the closest ids."""

    def __init__(self, name: str, ids: Iterable[str]):
        close = closest_ids(name, ids)
        hint = f"; closest: {', '.join(close)}" if close else ""
        super().__init__(f"unknown id {name!r}{hint}")


def get_entry(entries: Iterable[Entry], name: str) -> Entry:
    by_id = {e.id: e for e in entries}
    if name not in by_id:
        raise UnknownId(name, by_id)
    return by_id[name]
