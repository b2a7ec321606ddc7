"""``python -m catalog site [--serve] [--no-bench] [--port N]``: refresh results, render, build, serve."""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
from pathlib import Path

from catalog.cli import UsageError, _console, _load

REPO_ROOT = Path(__file__).resolve().parents[2]


def serve(site_dir: Path, port: int) -> None:
    """Serve the built folder on 127.0.0.1 until interrupted (python's http.server)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

    handler = functools.partial(Quiet, directory=str(site_dir))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise UsageError(f"--port: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    host, bound = server.server_address[:2]
    print(f"serving the catalog site at http://{host}:{bound}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


def cmd_site(args: argparse.Namespace) -> int:
    from catalog import results  # noqa: PLC0415
    from catalog.site.build import Options, generate  # noqa: PLC0415

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: must be in 0..65535, got {args.port}")
    opts = Options(docs_dir=Path(args.docs_dir), site_dir=Path(args.site_dir),
                   results_root=Path(args.results_dir) if args.results_dir else results.RESULTS_DIR,
                   bench=not args.no_bench, figures=not args.no_figures)
    console = _console(stderr=True)
    try:
        report = generate(_load(), opts, console)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"rendered {len(report.pages)} pages into {report.docs_dir}")
    if "mkdocs" not in report.failures:
        print(f"built the site into {report.site_dir}")
    if report.failures:
        print(f"{len(report.failures)} failure(s) (shown on their pages):", file=sys.stderr)
        for key, error in report.failures.items():
            print(f"  {key}: {error}", file=sys.stderr)
    if args.serve and "mkdocs" not in report.failures:
        serve(report.site_dir, args.port)
    return 0 if report.ok else 1


def register(sub) -> None:
    p = sub.add_parser("site", help="refresh stale results (CPU), render the docs and build the static site")
    p.add_argument("--serve", action="store_true", help="serve the built site on 127.0.0.1 afterwards")
    p.add_argument("--port", type=int, default=8000,
                   help="port for --serve (default 8000; 0 picks a free one)")
    p.add_argument("--no-bench", action="store_true", help="do not re-run bench for missing or stale results")
    p.add_argument("--no-figures", action="store_true",
                   help="do not draw the decision figures (models run on real photos; cached by code hash)")
    p.add_argument("--docs-dir", default=str(REPO_ROOT / "build" / "docs"),
                   help="generated Markdown (default build/docs)")
    p.add_argument("--site-dir", default=str(REPO_ROOT / "site_build"),
                   help="built site (default site_build)")
    p.add_argument("--results-dir", help="results store to read and refresh (default catalog/results)")
    p.set_defaults(func=cmd_site)
