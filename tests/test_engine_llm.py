"""End-to-end engine behaviour on the bundled SmolLM2 (fp32): parity with transformers, batching, caching, chunking,
preemption and abort."""

from __future__ import annotations

import threading

import pytest
import torch

from lmport.engine import LLM, SamplingParams
from lmport.engine.cuda_graphs import DecodeGraphs
from lmport.engine.errors import InvalidParams, OutOfKVCache

pytestmark = pytest.mark.slow

# min_tokens masks EOS for all 32 tokens, exactly like transformers' min_new_tokens in the parity test.
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about autumn leaves:",
    "The quick brown fox",
    "In machine learning, overfitting means",
]
SMALL_CACHE = 512 << 20


@pytest.fixture(scope="module")
def llm():
    engine = LLM("smollm2", dtype="float32", kv_cache_memory_bytes=SMALL_CACHE)
    yield engine
    engine.shutdown()


def texts(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers_token_for_token(llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = llm.engine.model_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = llm.engine.device  # on a GPU machine both run on the GPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ours = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, ours):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            ref = model.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                 pad_token_id=tokenizer.eos_token_id)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist(), prompt
        assert out.outputs[0].finish_reason == "length"


def test_a_prompt_alone_and_inside_a_mixed_batch_gives_the_same_tokens(llm):
    alone = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    mixed = [PROMPTS[i % 8] * (1 + i % 5) for i in range(1, 16)]
    batch = llm.generate(mixed[:7] + [PROMPTS[0]] + mixed[7:], GREEDY, use_tqdm=False)
    assert batch[7].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_decode_steps_through_the_padded_static_buffers_give_the_same_tokens(llm):
    """ModelRunner's CUDA-graph route (decode-only steps copied into DecodeGraphs' static buffers and padded to a
    bucket), taken on CPU where nothing is captured: same tokens as the eager steps."""
    runner = llm.engine.runner
    expected = texts(llm.generate(PROMPTS[:5], GREEDY, use_tqdm=False))
    before = llm.stats()["cuda_graph_steps"]
    saved_graphs = runner.decode_graphs  # None on CPU, the captured graphs on a GPU
    runner.decode_graphs = DecodeGraphs(runner.model, 8, runner.max_blocks_per_seq)
    try:
        got = texts(llm.generate(PROMPTS[:5], GREEDY, use_tqdm=False))
    finally:
        runner.decode_graphs = saved_graphs
    assert got == expected
    assert llm.stats()["cuda_graph_steps"] - before >= GREEDY.max_tokens - 1  # every step after the prefill


def test_prefix_cache_skips_shared_prefix_and_keeps_output(llm):
    prefix = " ".join(f"Rule {i}: be kind to every traveller you meet on the road." for i in range(20))
    first = llm.generate(prefix + " Question one: who", GREEDY, use_tqdm=False)
    before = llm.stats()
    second = llm.generate(prefix + " Question one: who", GREEDY, use_tqdm=False)
    after = llm.stats()
    prompt_len = len(second[0].prompt_token_ids)
    computed = after["prefill_tokens_computed"] - before["prefill_tokens_computed"]
    assert computed < prompt_len // 4, (computed, prompt_len)
    assert second[0].num_cached_tokens >= prompt_len - 16
    assert after["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert texts(second) == texts(first)


def test_chunked_prefill_matches_the_unchunked_run(llm):
    long_prompt = " ".join(f"item {i} is number {i * 7 % 13}." for i in range(130))
    chunked = LLM("smollm2", dtype="float32", max_num_batched_tokens=128, enable_prefix_caching=False,
                  kv_cache_memory_bytes=SMALL_CACHE)
    try:
        out = chunked.generate(long_prompt, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
        assert len(out[0].prompt_token_ids) >= 1000
        assert chunked.stats()["steps"] >= len(out[0].prompt_token_ids) // 128
    finally:
        chunked.shutdown()
    reference = llm.generate(long_prompt, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert texts(out) == texts(reference)


def test_preemption_under_a_tiny_cache_still_finishes_everything_identically(llm):
    prompts = [f"{p} (variant {i})" for i, p in enumerate(PROMPTS * 2)]
    reference = llm.generate(prompts, GREEDY, use_tqdm=False)
    tiny = LLM("smollm2", dtype="float32", num_gpu_blocks_override=24, block_size=16, max_model_len=256,
               enable_prefix_caching=False)
    try:
        constrained = tiny.generate(prompts, GREEDY, use_tqdm=False)
        assert tiny.stats()["num_preemptions"] > 0
        assert tiny.stats()["kv_blocks_free"] == 24
    finally:
        tiny.shutdown()
    assert texts(constrained) == texts(reference)


def test_abort_mid_generation_returns_every_block(llm):
    started = threading.Event()
    outputs = []

    def on_output(output):
        outputs.append(output)
        if len(output.outputs[0].token_ids) >= 3:
            started.set()

    stream = llm.add_request("Tell me a very long story.", SamplingParams(max_tokens=500, ignore_eos=True),
                             on_output=on_output)
    assert started.wait(60)
    assert stream.abort()
    for _ in range(200):
        if outputs[-1].finished:
            break
        threading.Event().wait(0.05)
    final = outputs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert 3 <= len(final.outputs[0].token_ids) < 500
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0
    assert not stream.abort()  # already finished: idempotent no-op


def test_concurrent_requests_from_threads_are_batched(llm):
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = llm.add_request(PROMPTS[i % 8], GREEDY).result().outputs[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert llm.stats()["max_num_running"] > 1
    alone = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for i in range(16):
        assert results[i] == alone[i % 8].outputs[0].token_ids


def test_delta_stream_concatenates_to_the_final_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, output_kind="delta")
    deltas = list(llm.add_request(PROMPTS[2], params))
    final = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert deltas[-1].finished
    assert "".join(d.outputs[0].text for d in deltas if d.outputs) == final.outputs[0].text
    assert sum((d.outputs[0].token_ids for d in deltas if d.outputs), []) == final.outputs[0].token_ids


def test_bad_prompts_are_rejected_by_field(llm):
    with pytest.raises(InvalidParams) as err:
        llm.generate({"prompt_token_ids": [1, 2, 10**9]}, use_tqdm=False)
    assert err.value.field == "prompt_token_ids"
    with pytest.raises(InvalidParams) as err:
        llm.generate({"prompt_token_ids": list(range(100)) * 100}, use_tqdm=False)
    assert err.value.field == "prompt" and "max_model_len" in str(err.value)
    with pytest.raises(InvalidParams) as err:
        llm.generate("", use_tqdm=False)
    assert err.value.field == "prompt"
    before = llm.stats()["requests_total"]
    with pytest.raises(InvalidParams):  # one bad prompt fails the whole call before any of it runs
        llm.generate(["A fine prompt", "another", ""], GREEDY, use_tqdm=False)
    assert llm.stats()["requests_total"] == before


def test_engines_in_one_process_keep_their_own_kernel_backend(tmp_path):
    """kernel_backend is per engine (the bridge may hold several): loading a second engine with another backend must
    not switch the kernels of the first, nor the process default, even while both step at once."""
    import os

    from lmport import kernels
    from tests.model_harness import write_tiny_model_dir

    write_tiny_model_dir(tmp_path)
    process_default = kernels.get_backend()
    engines, seen = {}, {}
    try:
        for backend in ("auto", "torch"):
            engines[backend] = LLM(str(tmp_path), dtype="float32", kernel_backend=backend,
                                   kv_cache_memory_bytes=8 << 20)
        for backend, engine in engines.items():  # what the kernel dispatch sees inside each engine's forward
            seen[backend] = set()
            engine.engine.runner.model.register_forward_pre_hook(
                lambda module, args, _seen=seen[backend]: _seen.add(kernels.get_backend()))
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        streams = [engine.add_request("hello there", params) for engine in engines.values()]
        for stream in streams:
            assert len(stream.result().outputs[0].token_ids) == 4
    finally:
        for engine in engines.values():
            engine.shutdown()
    assert seen == {"auto": {os.environ.get("LMPORT_KERNEL_BACKEND", "auto")}, "torch": {"torch"}}
    assert kernels.get_backend() == process_default


def test_a_cache_too_small_for_max_model_len_fails_readably():
    with pytest.raises(OutOfKVCache) as err:
        LLM("smollm2", dtype="float32", max_model_len=4096, kv_cache_memory_bytes=8 << 20)
    message = str(err.value)
    assert "max_model_len=4096" in message and "kv_cache_memory_bytes" in message


def test_detokenize_checks_token_ids_like_every_other_token_id_field() -> None:
    from types import SimpleNamespace

    fake = SimpleNamespace(engine=SimpleNamespace(vocab_size=100), _tokenizer_lock=threading.Lock(),
                           tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens: f"{ids}"))
    assert LLM.detokenize(fake, [1, 2]) == "[1, 2]"
    with pytest.raises(InvalidParams, match="got True at index 0") as err:
        LLM.detokenize(fake, [True])
    assert err.value.field == "token_ids"
    with pytest.raises(InvalidParams, match="token id 100 is outside"):
        LLM.detokenize(fake, [100])
