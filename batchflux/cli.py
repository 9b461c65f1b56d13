"""The command line: parse, wire, run, and map errors to a message and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .display import plural
from .errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_SOFTWARE, EXIT_USAGE, BatchfluxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchflux",
        description="Batch runner for Apiframe's flux-2-dev image API, with a built-in simulator.",
    )
    parser.add_argument("--version", action="version", version=f"batchflux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", help="check manifests without spending anything",
                       description="Load and check each MANIFEST against the manifest language "
                       "(schemas, templates, reference images, file-name template) without "
                       "contacting the API. Every problem is printed at once as "
                       "FILE:LINE:COL: field: message; exit 0 when all are valid, 65 otherwise.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST",
                   help="a manifest file: YAML (.yaml, .yml) or JSONL (.jsonl)")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("plan", help="show the items a manifest expands to, and their cost",
                       description="Show what MANIFEST expands to (items, axes, a preview) and "
                       "what a run would do with it: the run directory is read (never "
                       "created or locked) and each item counted as done, failed or to run, "
                       "as `batchflux run` counts it; the estimated cost is that of the items "
                       "to run. Nothing is spent.")
    p.add_argument("manifest", metavar="MANIFEST",
                   help="a manifest file: YAML (.yaml, .yml) or JSONL (.jsonl)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--preview", type=int, default=10, metavar="K",
                   help="items to show (default 10)")
    p.add_argument("--max-items", type=int, default=None, metavar="N",
                   help="refuse grids larger than N items (overrides the manifest)")
    p.add_argument("--cost-per-image", type=float, default=None, metavar="CREDITS",
                   help="credits per image for the estimate")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the run directory to compare with (default: the manifest's "
                   "run.out_dir, else out); read only")
    p.add_argument("--retry-failed", nargs="?", const="retryable", default=None,
                   choices=("retryable", "all"),
                   help="count earlier failures as `run --retry-failed` would: those whose "
                   "error is retryable (the default), or all")
    p.add_argument("--reroll", choices=("rejected",), default=None,
                   help="count the rerolls `run --reroll rejected` would make, and their cost")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("run", help="run every item of a manifest (resumes by default)",
                       description="Submit, poll, download and record every item of MANIFEST. "
                       "Re-running the same command resumes: finished items are skipped, "
                       "journaled jobs re-attached, only the rest submitted.")
    p.add_argument("manifest", metavar="MANIFEST",
                   help="a manifest file: YAML (.yaml, .yml) or JSONL (.jsonl)")
    where = p.add_argument_group("where to send requests")
    where.add_argument("--sim", action="store_true",
                       help="use the built-in simulator in-process (no key, no network)")
    where.add_argument("--sim-job-seconds", type=_positive_float, default=None, metavar="S",
                       help="job duration of the in-process simulator (default 2)")
    where.add_argument("--sim-credits", type=_non_negative_int, default=None, metavar="N",
                       help="the in-process simulator's balance (default: enough that it "
                       "never stops a trial; set it to see the out-of-credits path)")
    where.add_argument("--base-url", default=None, metavar="URL",
                       help="API base URL (default $APIFRAME_BASE_URL or "
                       "https://api.apiframe.ai)")
    where.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="read the API key from FILE instead of $APIFRAME_API_KEY")
    where.add_argument("--insecure-http", action="store_true",
                       help="allow a plain-http base URL on a non-loopback host")
    where.add_argument("--allow-download-host", action="append", default=[], metavar="HOST",
                       help="also accept result image URLs on HOST ('*' for any)")
    opts = p.add_argument_group("run options (override the manifest's run: block)")
    opts.add_argument("--out", default=None, metavar="DIR", help="output directory")
    opts.add_argument("-j", "--jobs", "--concurrency", dest="concurrency", type=_positive_int,
                      default=None, metavar="N",
                      help="jobs in flight at once: submitted and not yet finished, the thing "
                      "a job API limits (default 32). batchflux starts lower and doubles every "
                      "job round trip up to N while the API does not push back; workers and "
                      "connections follow from N")
    opts.add_argument("--max-inflight", type=_positive_int, default=None, metavar="N",
                      help="expert: a hard ceiling on jobs in flight when you know the "
                      "provider's cap (default: -j)")
    opts.add_argument("--rpm", type=_positive_float, default=None, metavar="N",
                      help="submit requests per minute")
    opts.add_argument("--retries", type=_non_negative_int, default=None, metavar="N",
                      help="retries per request and new jobs per item after a transient failure")
    opts.add_argument("--budget", type=_positive_float, default=None, metavar="CREDITS",
                      help="refuse to start, or stop submitting, past this many credits")
    opts.add_argument("--fill-budget", action="store_true", default=None,
                      help="with --budget: run as many of the items still to do as the "
                      "budget pays for (the first ones), then stop")
    opts.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                      help="run only the first N items still to do (the rest stay for a "
                      "later run)")
    opts.add_argument("--max-items", type=_positive_int, default=None, metavar="N",
                      help="a guard: refuse manifests that expand to more than N items")
    opts.add_argument("--reroll", choices=("rejected",), default=None,
                      help="also make a new image (same prompt and params, the next derived "
                      "seed) for each item whose latest image was rejected in `batchflux "
                      "review`; a second --reroll pays nothing new")
    opts.add_argument("--job-timeout", type=_positive_float, default=None, metavar="S",
                      help="seconds a job may take from submit to COMPLETED")
    opts.add_argument("--webhook-url", default=None, metavar="URL",
                      help="the public URL Apiframe POSTs each job's end to (through your "
                      "reverse proxy, ingress or tunnel, to --webhook-listen): each image is "
                      "downloaded the moment its job ends, with a sparse poll only as a safety "
                      "net (docs/webhooks.md)")
    opts.add_argument("--webhook-listen", default=None, metavar="HOST:PORT",
                      help="where batchflux's webhook receiver listens for POSTs on the URL's "
                      "path (default 127.0.0.1:8787)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out (the default)")
    mode.add_argument("--fresh", action="store_true",
                      help="move an existing --out aside and start a new run directory")
    p.add_argument("--retry-failed", nargs="?", const="retryable", default=None,
                   choices=("retryable", "all"),
                   help="also retry items that failed in an earlier run: those whose error "
                   "is retryable (the default), or all")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N (0-based), split by item key: N machines "
                   "run one manifest with no coordinator (then: batchflux merge)")
    p.add_argument("--dataset", choices=("hf", "webdataset"), default=None,
                   help="after the run, export OUT/dataset/hf (Hugging Face ImageFolder) or "
                   "OUT/dataset/webdataset (tar shards)")
    p.add_argument("--max-failure-rate", type=_rate, default=None, metavar="R",
                   help="exit 0 when at most this share (0 to 1) of the run's items failed")
    p.add_argument("--verify", choices=("auto", "decode", "structure"), default="auto",
                   help="how each image is checked before it is kept: its file structure is "
                   "always walked end to end; 'decode' also decodes every pixel with Pillow, "
                   "'auto' (the default) does so while decoding takes under a tenth of the "
                   "run's time (every image at real API rates), 'structure' never")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON event a line on stderr, for log shippers")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="no progress output; only the final summary line (the default "
                       "when stderr is not a terminal)")
    noise.add_argument("--progress", action="store_true",
                       help="when stderr is not a terminal, print a progress line every 10 s")
    p.set_defaults(handler=_run)

    p = sub.add_parser("report", help="what a run did: table, JSON, or an HTML review page",
                       description="Summarise the run directory OUT: counts by status, error "
                       "categories explained, credits, latencies and throughput, as a table, "
                       "as JSON (--json), or as an offline HTML review page (--html). Only "
                       "the items of the manifest the latest run ran count; results of items "
                       "it no longer has are counted as 'not in the manifest' (--all includes "
                       "them).")
    p.add_argument("out", metavar="OUT", help="a run directory (the --out of a run)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--html", action="store_true",
                   help="write OUT/review/index.html (contact sheet and grids, offline)")
    p.add_argument("--thumb-size", type=_positive_int, default=256, metavar="PX",
                   help="thumbnail size for --html")
    _all_argument(p)
    p.set_defaults(handler=_report)

    p = sub.add_parser("review", help="review a run in the browser: accept, reject, star",
                       description="Serve a local web app over the run directory OUT: contact "
                       "sheet, grids and compare view; Accept, Reject and Star each image "
                       "(keys a, r, s; u undoes). Every decision is one line of "
                       "OUT/review.jsonl. Shows the items of the manifest the latest run ran "
                       "(--all: also those it no longer has, marked).")
    p.add_argument("out", metavar="OUT", help="a run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=_port, default=None, metavar="P",
                   help="port (default: 8765, or a free one when taken; 0: any free port)")
    p.add_argument("--open", action="store_true", help="open the page in the web browser")
    _all_argument(p)
    p.set_defaults(handler=_review)

    p = sub.add_parser("merge", help="combine run directories (shards) into one",
                       description="Combine the run directories OUT (shards of one manifest, "
                       "run with --shard I/N) into the run directory given by --into: result "
                       "lines deduplicated by item key, every image checked by sha256 and "
                       "hard-linked or copied. Exit 65 when an image is missing or differs. "
                       "Results of items the manifest no longer has are merged too, with a "
                       "warning; report, export and review leave them out unless --all.")
    p.add_argument("sources", nargs="+", metavar="OUT",
                   help="a run directory to merge: each shard's --out")
    p.add_argument("--into", required=True, metavar="OUT", help="the merged run directory")
    p.add_argument("--force", action="store_true",
                   help="merge runs of different manifests")
    p.set_defaults(handler=_merge)

    p = sub.add_parser("export", help="export a finished run as a dataset",
                       description="Export the ok images of the run directory OUT as a "
                       "dataset: hf writes OUT/dataset/hf (a Hugging Face ImageFolder with "
                       "metadata.jsonl), webdataset writes tar shards to "
                       "OUT/dataset/webdataset. Every image's sha256 is checked first. Only "
                       "the items of the manifest the latest run ran are exported (--all: "
                       "also those it no longer has).")
    p.add_argument("out", metavar="OUT", help="a run directory (the --out of a run)")
    p.add_argument("--dataset", choices=("hf", "webdataset"), required=True,
                   help="the layout: hf (Hugging Face ImageFolder) or webdataset (tar shards)")
    p.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                   help="samples per webdataset tar shard")
    p.add_argument("--only", type=_states, default=None, metavar="STATE[,STATE]",
                   help="export only images in these review states (batchflux review): "
                   "accepted, rejected, starred, undecided")
    _all_argument(p)
    p.set_defaults(handler=_export)

    p = sub.add_parser("verify", help="re-check every image of a run against its result line",
                       description="Re-hash every file of every final ok result line of OUT: "
                       "it must exist with its recorded size and sha256 and decode whole. "
                       "Prints each problem with the item and the path, and a total; exit 0 "
                       "when every file matches, 1 otherwise.")
    p.add_argument("out", metavar="OUT", help="a run directory (the --out of a run)")
    p.add_argument("--fix", action="store_true",
                   help="move each bad file into OUT/.batchflux/quarantine/ (same relative "
                   "path) so that the next `batchflux run` fetches it again")
    p.set_defaults(handler=_verify)

    p = sub.add_parser("sim", help="the built-in Apiframe v2 simulator",
                       description="The built-in Apiframe v2 simulator: the same routes, "
                       "answers and images as the real API (simulated), with faults on "
                       "demand. `batchflux run --sim` runs it in-process; `sim serve` on a "
                       "port.")
    sim_sub = p.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    sim_sub.required = True
    serve = sim_sub.add_parser("serve", help="serve the simulator on a real port (uvicorn)",
                               description="Serve the Apiframe v2 simulator over HTTP on "
                               "--host:--port until interrupted. Point batchflux (or any "
                               "client) at it with --base-url http://HOST:PORT and any key "
                               "starting with afk_. Access logs are off unless --access-log.")
    from .sim import serve as sim_serve

    sim_serve.add_arguments(serve)
    serve.set_defaults(handler=sim_serve.main)

    return parser


def _all_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", dest="include_all",
                        help="also the results of items the manifest no longer has (after "
                        "an edit); by default they are left out and counted as not in the "
                        "manifest")


def _validate(args: argparse.Namespace) -> int:
    from .plan import validate_command

    return validate_command(args.manifests, out=sys.stdout, err=sys.stderr)


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan_command

    return plan_command(
        args.manifest,
        as_json=args.json,
        limit=args.preview,
        max_items=args.max_items,
        cost_per_image=args.cost_per_image,
        out=sys.stdout,
        err=sys.stderr,
        out_dir=args.out,
        retry_failed=args.retry_failed,
        reroll=args.reroll,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _warn_skipped(line: object) -> None:
    """A results line a post-run command skipped, on stderr (``FILE:LINE: reason``)."""
    print(f"batchflux: warning: {line}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from .report import build_report, render_table, write_review
    from .store import BadLine

    if args.html:
        page = write_review(args.out, thumb_size=args.thumb_size, include_all=args.include_all)
        print(f"batchflux: review page: {page.path} ({plural(page.thumbnails, 'image')}, "
              f"{plural(page.failures, 'failure')})",
              file=sys.stderr if args.json else sys.stdout)
    report = build_report(args.out, include_all=args.include_all)
    for bad in report["bad_lines"]:
        _warn_skipped(BadLine(**bad))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    elif not args.html:
        render_table(report)
    else:
        _note_not_in_manifest(report["not_in_manifest"], args.include_all)
    return 0


def _note_not_in_manifest(count: int, include_all: bool) -> None:
    """The count of results not in the manifest, on stderr, when there are any."""
    if count:
        from .review import manifest_note

        print(f"batchflux: {manifest_note(count, include_all=include_all)}", file=sys.stderr)


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_runs

    done = merge_runs(args.sources, args.into, force=args.force, on_bad_line=_warn_skipped)
    print(f"batchflux: merged {plural(len(done.sources), 'run')} into {done.into}: "
          f"{plural(done.items, 'item')} ({done.ok} ok, {done.failed} failed), "
          f"files {done.files_linked} linked, "
          f"{done.files_copied} copied, {done.files_present} already there; every file's "
          "sha256 checked")
    if done.not_in_manifest:
        print(f"batchflux: warning: {plural(done.not_in_manifest, 'merged result')} not in "
              "the manifest (kept: report, export and review leave them out unless --all)",
              file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .dataset import export_dataset

    done = export_dataset(args.out, args.dataset, shard_size=args.shard_size,
                          on_bad_line=_warn_skipped, only=args.only,
                          include_all=args.include_all)
    which = f" ({', '.join(args.only)} only)" if args.only else ""
    print(f"batchflux: dataset ({done.format}): {plural(done.rows, 'image')}{which} in "
          f"{done.path}; every file's sha256 checked")
    _note_not_in_manifest(done.not_in_manifest, done.include_all)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .verify import verify_run

    out = Path(args.out)
    report = verify_run(out, fix=args.fix, on_problem=lambda p: print(f"{out}/{p}"),
                        on_bad_line=_warn_skipped)
    print(f"batchflux: verify {out}: {report.summary_line()}")
    return EXIT_OK if report.ok else EXIT_ITEMS_FAILED


def _states(text: str) -> tuple[str, ...]:
    from .reviewapp.decisions import STATES

    states = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    wrong = [state for state in states if state not in STATES]
    if wrong or not states:
        raise argparse.ArgumentTypeError(
            f"review states are {', '.join(STATES)}; got {text!r}")
    return states


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {text}")
    return value


def _review(args: argparse.Namespace) -> int:
    from .reviewapp.serve import review_command

    return review_command(args.out, host=args.host, port=args.port, open_browser=args.open,
                          include_all=args.include_all)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    from .runcmd import run_command

    return run_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.handler(args))
    except BatchfluxError as exc:
        from .display import escape_controls

        text = "\n".join(escape_controls(line) for line in str(exc).split("\n"))
        print(f"batchflux: {text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batchflux: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `batchflux plan ... | head`
        return 0
    except Exception as exc:  # a bug, not bad input: say so without a wall of traceback
        if os.environ.get("BATCHFLUX_DEBUG"):
            raise
        print(f"batchflux: internal error ({type(exc).__name__}: {exc}). This is a bug in "
              "batchflux; run again with BATCHFLUX_DEBUG=1 for the traceback and report it. "
              "Finished items are recorded; the same command resumes.", file=sys.stderr)
        return EXIT_SOFTWARE
