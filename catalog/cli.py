"""The command line behind ``python -m catalog``: thin wrappers over pure functions.

Exit codes: 0 success, 1 problems found (``validate``, ``bench`` with a failing entry), 2 bad usage
(unknown id, bad argument). Nothing prints a traceback unless ``CATALOG_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from catalog import vocab


class UsageError(Exception):
    """Bad command-line input: printed as ``error: ...``, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit 2; keep it short
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _console(stderr: bool = False):
    from rich.console import Console  # noqa: PLC0415 - keep `import catalog.cli` cheap

    width = None if sys.stdout.isatty() else 200
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def _load(paths: Sequence[Path] | None = None):
    from catalog.entries import load_all  # noqa: PLC0415

    entries, problems = load_all(paths)
    if problems:
        shown = "\n".join(str(p) for p in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UsageError(f"the catalog has invalid entries (run `python -m catalog validate`):\n{shown}{more}")
    return entries


def _entry(entries, name: str):
    from catalog.entries import UnknownId, get_entry  # noqa: PLC0415

    try:
        return get_entry(entries, name)
    except UnknownId as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------- list / show
def _matches(entry, args: argparse.Namespace) -> bool:
    tax = entry.taxonomy
    checks = [
        (args.category, lambda v: v == tax.category or v in tax.also_in),
        (args.granularity, lambda v: v == tax.granularity),
        (args.decision, lambda v: v == tax.decision),
        (args.training, lambda v: v in tax.training),
        (args.tag, lambda v: v in tax.tags),
        (args.status, lambda v: v == entry.implementation.status),
    ]
    return all(value is None or test(value) for value, test in checks)


def entry_row(entry) -> dict:
    """The fields `list --json` prints for one entry."""
    tax = entry.taxonomy
    return {
        "id": entry.id, "title": entry.title, "year": entry.year, "venue": entry.venue,
        "category": tax.category, "subcategory": tax.subcategory, "also_in": tax.also_in,
        "granularity": tax.granularity, "decision": tax.decision, "training": tax.training,
        "tags": tax.tags, "status": entry.implementation.status, "paper": entry.paper.link,
    }


def cmd_list(args: argparse.Namespace) -> int:
    entries = [e for e in _load() if _matches(e, args)]
    if args.json:
        print(json.dumps([entry_row(e) for e in entries], indent=2))
        return 0
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"{len(entries)} entries", show_lines=False)
    for col in ("id", "year", "venue", "category", "granularity", "decision", "training", "status"):
        table.add_column(col, overflow="fold")
    order = list(vocab.CATEGORIES)
    for e in sorted(entries, key=lambda e: (order.index(e.category), e.year, e.id)):
        t = e.taxonomy
        table.add_row(e.id, str(e.year), e.venue, t.category + (f" (+{','.join(t.also_in)})" if t.also_in else ""),
                      t.granularity, t.decision, ",".join(t.training), e.implementation.status)
    _console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    entry = _entry(_load(), args.id)
    data = entry.model_dump(mode="json", exclude_none=True)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    import yaml  # noqa: PLC0415

    console = _console()
    console.print(f"[bold]{entry.title}[/bold]", markup=True)
    console.print(f"{', '.join(entry.authors)}. {entry.venue}. {entry.paper.link}", markup=False)
    console.print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100), markup=False)
    return 0


# ---------------------------------------------------------------- validate / schema
def cmd_validate(args: argparse.Namespace) -> int:
    from catalog.entries import entry_files, load_all  # noqa: PLC0415

    paths = [Path(p) for p in args.paths] or None
    files = entry_files(paths)
    entries, problems = load_all(paths)
    for problem in problems:
        print(problem)
    if problems:
        bad = len({p.path for p in problems})
        print(f"{len(problems)} problem(s) in {bad} of {len(files)} file(s)", file=sys.stderr)
        return 1
    print(f"{len(entries)} entries valid")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from catalog.schema import SCHEMA_PATH, json_schema_text  # noqa: PLC0415

    text = json_schema_text()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH}: out of date; run `python -m catalog schema`", file=sys.stderr)
            return 1
        print(f"{SCHEMA_PATH}: up to date")
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


# ---------------------------------------------------------------- new / bibtex
def cmd_new(args: argparse.Namespace) -> int:
    from catalog.entries import ENTRIES_DIR, REPO_ROOT  # noqa: PLC0415
    from catalog.scaffold import scaffold  # noqa: PLC0415
    from catalog.schema import ID_RE  # noqa: PLC0415

    if not ID_RE.match(args.id):
        raise UsageError(f"id: {args.id!r} must be snake_case (a lowercase letter, then a-z, 0-9 or _)")
    existing = {p.stem for p in ENTRIES_DIR.rglob("*.yaml")}
    if args.id in existing:
        raise UsageError(f"id: {args.id!r} already exists")
    try:
        written = scaffold(args.id, args.category, ENTRIES_DIR, REPO_ROOT / "implementations", _dt.date.today().year)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    for path in written:
        print(f"wrote {path}")
    print("next: fill the TODO fields, then `python -m catalog validate`")
    return 0


def cmd_bibtex(args: argparse.Namespace) -> int:
    from catalog.bibtex import bibliography  # noqa: PLC0415

    entries = _load()
    chosen = [_entry(entries, name) for name in args.ids] if args.ids else sorted(entries, key=lambda e: e.id)
    sys.stdout.write(bibliography(chosen))
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m catalog", description="Dynamic Networks Catalog")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="list entries as a table (filters combine)")
    p.add_argument("--category", choices=list(vocab.CATEGORIES))
    p.add_argument("--granularity", choices=list(vocab.GRANULARITIES))
    p.add_argument("--decision", choices=list(vocab.DECISIONS))
    p.add_argument("--training", choices=list(vocab.TRAININGS))
    p.add_argument("--tag", choices=list(vocab.TAGS))
    p.add_argument("--status", choices=list(vocab.IMPLEMENTATION_STATUSES))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one entry")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("validate", help="validate entry files (default: all); every problem at once")
    p.add_argument("paths", nargs="*", help="entry files or folders")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("new", help="scaffold an entry and an implementation skeleton")
    p.add_argument("id")
    p.add_argument("--category", required=True, choices=list(vocab.CATEGORIES))
    p.set_defaults(func=cmd_new)

    p = sub.add_parser("bibtex", help="BibTeX for all entries or the given ids")
    p.add_argument("ids", nargs="*")
    p.set_defaults(func=cmd_bibtex)

    p = sub.add_parser("schema", help="regenerate catalog/entry.schema.json (or --check it)")
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=cmd_schema)

    from catalog import cli_measure  # noqa: PLC0415 - these import helpers from this module
    from catalog.site import cli as site_cli  # noqa: PLC0415

    cli_measure.register(sub)
    site_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the contract is: no traceback for users
        if os.environ.get("CATALOG_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set CATALOG_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
