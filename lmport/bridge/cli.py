"""The `lmport` command. Each subcommand lives in its own module exposing add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lmport.bridge.protocol import BridgeError
from lmport.engine.errors import LMPortError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "generate": ("lmport.bridge.generate_cmd", "generate text for a prompt (through a worker process)"),
    "worker": ("lmport.bridge.worker", "run the msgpack-over-stdio worker (started by the clients)"),
    "serve": ("lmport.bridge.http.server", "serve the OpenAI-compatible HTTP API"),
    "codegen": ("lmport.bridge.codegen.cli", "generate client API code from the worker's manifest"),
    "bench": ("lmport.bridge.bench", "benchmarks: throughput, parity, bridge, serve, embed"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (the server's imports are heavy); all of them for --help."""
    parser = argparse.ArgumentParser(prog="lmport", description="Local LLM inference for every language.")
    parser.add_argument("--log-level", default="INFO", help="logging level of the lmport logger (stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except (LMPortError, BridgeError) as exc:  # a bad argument or option: its message names it, no traceback
        print(f"lmport {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
