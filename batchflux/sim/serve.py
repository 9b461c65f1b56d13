"""Serve the simulator with uvicorn (placeholder: being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def main(args: argparse.Namespace) -> int:
    raise SystemExit("the simulator is not written yet")
