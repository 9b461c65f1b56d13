"""The command line: parse, wire, run, and map errors to a message and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import EXIT_USAGE, BatchfluxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchflux",
        description="Batch runner for Apiframe's flux-2-dev image API, with a built-in simulator.",
    )
    parser.add_argument("--version", action="version", version=f"batchflux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", help="check manifests without spending anything")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("plan", help="show the items a manifest expands to, and their cost")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=10, metavar="K", help="items to preview")
    p.add_argument("--max-items", type=int, default=None, metavar="N",
                   help="refuse grids larger than N items (overrides the manifest)")
    p.add_argument("--cost-per-image", type=float, default=None, metavar="CREDITS",
                   help="credits per image for the estimate")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("sim", help="the built-in Apiframe v2 simulator")
    sim_sub = p.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    sim_sub.required = True
    serve = sim_sub.add_parser("serve", help="serve the simulator on a real port (uvicorn)")
    from .sim import serve as sim_serve

    sim_serve.add_arguments(serve)
    serve.set_defaults(handler=sim_serve.main)

    return parser


def _validate(args: argparse.Namespace) -> int:
    from .plan import validate_command

    return validate_command(args.manifests, out=sys.stdout, err=sys.stderr)


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan_command

    return plan_command(
        args.manifest,
        as_json=args.json,
        limit=args.limit,
        max_items=args.max_items,
        cost_per_image=args.cost_per_image,
        out=sys.stdout,
        err=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.handler(args))
    except BatchfluxError as exc:
        print(f"batchflux: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batchflux: interrupted", file=sys.stderr)
        return 130
