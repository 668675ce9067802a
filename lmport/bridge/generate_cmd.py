"""`lmport generate "prompt"`: one generation from the shell, through a worker process, streamed as it is produced."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmport.bridge.client import Client
from lmport.bridge.protocol import BridgeError
from lmport.engine.gguf_convert import needs_conversion


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (a user message with --chat)")
    parser.add_argument("--model", default="smollm2", help="model to load (default: the bundled SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def run(args: argparse.Namespace) -> int:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    with Client.spawn("--log-level", "WARNING") as client:
        _check_sampling_params(client, params)  # a bad option fails before the model loads
        if needs_conversion(args.model):
            print("converting the bundled model (first run only) …" if args.model == "smollm2" else
                  f"converting {args.model} (first run only) …", file=sys.stderr, flush=True)
        llm = client.llm(args.model, dtype=args.dtype)
        chunks = (client.chat(llm, [{"role": "user", "content": args.prompt}], params, stream=True) if args.chat
                  else client.generate(llm, args.prompt, params, stream=True))
        for chunk in chunks:
            for output in chunk["outputs"]:
                sys.stdout.write(output["text"])
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _check_sampling_params(client: Client, params: dict[str, Any]) -> None:
    """Validate through the worker, naming the field as generate itself would (sampling_params.<field>)."""
    try:
        client.sampling_params(**params)
    except BridgeError as exc:
        field = (exc.details or {}).get("field")
        if exc.code != "invalid_params" or not field:
            raise
        # the service words it "<field>: <why>" (see lmport.bridge.service._invalid)
        raise BridgeError(exc.code, f"sampling_params.{exc.message}", {"field": f"sampling_params.{field}"}) \
            from None
