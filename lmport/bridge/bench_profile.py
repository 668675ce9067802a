"""`lmport bench profile`: where one engine step's time goes, measured on the engine thread.

Two runs of the same workload (greedy, ignore_eos) on a fresh engine each:
1. phases, without a profiler: every step's wall time split into scheduler, model runner (batch building, the
   forward, logits), sampler, detokenizer and outputs (building and handing over RequestOutputs), timed with
   perf_counter around those calls on the engine thread; the rest of the step is "step bookkeeping";
2. operators, under torch.profiler: the model runner's time split into matmuls (aten mm/addmm/linear/bmm and the
   oneDNN packed linear), attention
   (lmport's paged attention and KV-cache store, with the torch operators they run: prefill's SDPA), lmport's fused
   elementwise kernels (RMSNorm, rotary, SiLU-and-mul), other torch operators (embedding, adds, copies, index_select, ...), and what is left: Python and dispatch
   between the operators. The profiler adds a few microseconds to every operator, so run 2's absolute times are
   inflated; its shares are what it is for.

With --decode-only every prompt is prefilled before either run starts timing, so the figures are decode steps
alone (a batch's prefill step can take as long as a hundred decode steps, and would dominate the shares).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from lmport.bridge.bench import make_prompts

KERNEL_CATEGORIES = {"paged_attention_decode": "attention", "paged_attention_prefill": "attention",
                     "store_kv_cache": "attention", "rms_norm": "fused elementwise kernels",
                     "rotary_embedding": "fused elementwise kernels", "silu_and_mul": "fused elementwise kernels"}
RUNNER_LABEL = "lmport::model_runner"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "aten::mkldnn_linear", "mkldnn::_linear_pointwise",
              "lmport::int4_matmul", "lmport::int8_matmul"}  # the last two labelled by lmport.kernels.cpu_vnni


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, action="append", help="concurrent requests (repeatable; default: 1 "
                        "and 64)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", choices=["int8", "int4", "gguf"], default=None,
                        help="weight-only quantization of the engine")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step module by module (no CPU decode stack)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-only", action="store_true",
                        help="prefill every prompt before timing starts, so only decode steps are measured")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    report = {}
    for batch in args.batch or [1, 64]:
        prompts = make_prompts(batch, 16, 128, seed=0)
        report[f"batch {batch}"] = {"phases": _phase_run(args, prompts), "operators": _operator_run(args, prompts)}
    if args.json:
        print(json.dumps(report))
        return 0
    for name, entry in report.items():
        phases = entry["phases"]
        print(f"{name}: {phases['steps']} steps, {phases['step_ms']:.2f} ms a step, "
              f"{phases['output_tok_s']:.1f} output tok/s (no profiler)")
        for phase, share in phases["shares"].items():
            print(f"  {phase:28s} {100 * share:5.1f} %")
        print(f"  model runner, by operator (torch.profiler; {entry['operators']['runner_ms']:.2f} ms a step "
              "under the profiler):")
        for category, share in entry["operators"]["shares"].items():
            print(f"    {category:26s} {100 * share:5.1f} %")
    return 0


class PhaseTimer:
    """Accumulates perf_counter time per phase; wraps callables so that nested phases are not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self._depth -= 1
        return timed


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _generate(args: argparse.Namespace, prompts: list[str], instrument: Callable[[Any], Any]) -> tuple[Any, float, int]:
    """Runs the workload on an LLMEngine stepped on this thread (the loop LLM's engine thread runs), so that
    torch.profiler, which records the thread that starts it, sees every step."""
    from lmport.engine.config import EngineConfig
    from lmport.engine.llm_engine import LLMEngine
    from lmport.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_dict({"model": args.model, "dtype": args.dtype,
                                               "quantization": args.quantization,
                                               "enforce_eager": args.enforce_eager}))
    finished: list[Any] = []

    def add(batch: list[str], params: SamplingParams) -> None:
        for index, prompt in enumerate(batch):
            engine.add_request(engine.make_request(f"r{len(finished)}-{index}", prompt, params,
                                                   lambda out: out.finished and finished.append(out)))

    def drain() -> None:
        while engine.has_work():
            engine.step()

    add(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    drain()
    finished.clear()
    add(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    untimed_tokens = 0
    if args.decode_only:
        scheduler = engine.scheduler
        while scheduler.waiting or any(seq.num_output_tokens == 0 for seq in scheduler.running):
            engine.step()
        untimed_tokens = (sum(seq.num_output_tokens for seq in scheduler.running)
                          + sum(len(out.outputs[0].token_ids) for out in finished))  # max_tokens=1 ends in prefill
    with instrument(engine) as handle:
        start = time.perf_counter()
        drain()
        seconds = time.perf_counter() - start
    return handle, seconds, sum(len(out.outputs[0].token_ids) for out in finished) - untimed_tokens


def _phase_run(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    from lmport.engine import detokenizer, llm_engine

    timer = PhaseTimer()

    @contextlib.contextmanager
    def instrument(engine: Any) -> Iterator[PhaseTimer]:
        step_seconds = [0.0, 0]

        def step(original: Callable[[], None] = engine.step) -> None:
            start = time.perf_counter()
            original()
            step_seconds[0] += time.perf_counter() - start
            step_seconds[1] += 1

        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(engine, "step", step))
            stack.enter_context(_patched(engine.scheduler, "schedule", timer.wrap("scheduler",
                                                                                 engine.scheduler.schedule)))
            stack.enter_context(_patched(engine.runner, "run", timer.wrap("model runner", engine.runner.run)))
            stack.enter_context(_patched(engine, "sampler", timer.wrap("sampler", engine.sampler)))
            cls = detokenizer.IncrementalDetokenizer
            stack.enter_context(_patched(cls, "update", timer.wrap("detokenizer", cls.update)))
            stack.enter_context(_patched(llm_engine.LLMEngine, "_emit",
                                         timer.wrap("outputs", llm_engine.LLMEngine._emit)))
            yield step_seconds

    (total, steps), seconds, tokens = _generate(args, prompts, instrument)
    shares = {phase: timer.seconds[phase] / total
              for phase in ("scheduler", "model runner", "sampler", "detokenizer", "outputs")}
    shares["step bookkeeping"] = 1.0 - sum(shares.values())
    return {"steps": steps, "step_ms": 1000 * total / max(steps, 1), "output_tok_s": tokens / seconds,
            "shares": shares}


def _category(event: Any) -> str | None:
    """The category an event's self time counts for; None outside the model runner (the sampler's operators, say).

    A torch operator run inside one of lmport's kernel labels (the reference SDPA of prefill attention, the
    index_copy of a KV-cache store) counts for that kernel's category, not as an "other torch operator"."""
    name = event.name
    if name == RUNNER_LABEL:
        return None
    kernel: str | None = None
    parent = event.cpu_parent
    while parent is not None and parent.name != RUNNER_LABEL:
        if kernel is None and parent.name.removeprefix("lmport::") in KERNEL_CATEGORIES:
            kernel = parent.name.removeprefix("lmport::")
        parent = parent.cpu_parent
    if parent is None:
        return None
    if name in MATMUL_OPS:
        return "matmuls"
    if name.startswith("lmport::"):
        return KERNEL_CATEGORIES.get(name.removeprefix("lmport::"))
    if name.startswith(("aten::", "mkldnn::")):
        return KERNEL_CATEGORIES.get(kernel or "", "other torch operators")
    return None


def _operator_run(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    from lmport import kernels

    runner_seconds = [0.0, 0]

    @contextlib.contextmanager
    def instrument(engine: Any) -> Iterator[Any]:
        def labelled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def call(*a: Any, **k: Any) -> Any:
                with record_function(f"lmport::{name}"):
                    return fn(*a, **k)
            return call

        def run_step(batch: Any, original: Callable[[Any], Any] = engine.runner.run) -> Any:
            start = time.perf_counter()
            try:
                with record_function(RUNNER_LABEL):
                    return original(batch)
            finally:
                runner_seconds[0] += time.perf_counter() - start
                runner_seconds[1] += 1

        with contextlib.ExitStack() as stack:
            for name in KERNEL_CATEGORIES:
                stack.enter_context(_patched(kernels, name, labelled(name, getattr(kernels, name))))
            stack.enter_context(_patched(engine.runner, "run", run_step))
            prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
            yield prof

    prof, _seconds, _tokens = _generate(args, prompts, instrument)
    by_category: dict[str, float] = defaultdict(float)
    for event in prof.events():
        category = _category(event)
        if category is not None:
            by_category[category] += event.self_cpu_time_total / 1e6
    runner_total = runner_seconds[0]
    shares = {c: by_category[c] / runner_total
              for c in ("matmuls", "attention", "fused elementwise kernels", "other torch operators")}
    shares["Python and dispatch"] = 1.0 - sum(shares.values())
    return {"runner_ms": 1000 * runner_total / max(runner_seconds[1], 1), "shares": shares}
