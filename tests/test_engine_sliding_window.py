"""A model whose every layer uses one sliding window, through the engine: the blocks behind the window are freed as
sequences advance (so a long generation holds a window's worth of blocks), and the tokens stay transformers'.

The engine is stepped here, on the test's thread, so the blocks each sequence holds can be read between steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig

from lmport.engine.block_manager import FREED_BLOCK
from lmport.engine.config import EngineConfig
from lmport.engine.llm_engine import LLMEngine
from lmport.engine.outputs import RequestOutput
from lmport.engine.sampling_params import SamplingParams
from tests.model_family_checks import build_hf, save_model_dir

WINDOW, BLOCK_SIZE, NEW_TOKENS = 10, 8, 60  # unaligned window; prompts + outputs span 7 to 10 windows
# a window's 10 keys span at most 3 blocks of 8; without freeing, a sequence of 87 tokens would hold 11
DECODE_BLOCKS_BOUND = (WINDOW - 1 + BLOCK_SIZE - 1) // BLOCK_SIZE + 1


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    config = MistralConfig(vocab_size=260, bos_token_id=258, eos_token_id=259, pad_token_id=257, hidden_size=64,
                           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2,
                           sliding_window=WINDOW)
    hf = build_hf(config)
    return hf, save_model_dir(hf, tmp_path_factory.mktemp("mistral_window"))


def hf_greedy(hf: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.inference_mode():  # eager attention: transformers applies its own window mask
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, pad_token_id=hf.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def run_stepwise(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    """Greedy outputs of every prompt, and the most blocks any decoding sequence held after a step."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    final: dict[int, RequestOutput] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(str(i), {"prompt_token_ids": prompt}, params,
                                               lambda out, i=i: final.__setitem__(i, out)))
    most_held = 0
    while engine.has_work():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:  # decoding (a prefill chunk holds more)
                most_held = max(most_held, sum(b != FREED_BLOCK for b in seq.block_table))
    assert all(out.finished for out in final.values())
    return [final[i].outputs[0].token_ids for i in range(len(prompts))], most_held


def prompts_of(lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def test_long_generation_holds_one_window_of_blocks_and_matches_transformers(windowed) -> None:
    hf, path = windowed
    # 27 tokens > the window and > max_num_batched_tokens: the prompt itself is chunked past a window
    prompts = prompts_of((12, 27, 5))
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", block_size=BLOCK_SIZE,
                                    max_num_batched_tokens=16, kv_cache_memory_bytes=4 << 20))
    assert engine.block_manager.sliding_window == WINDOW
    outputs, most_held = run_stepwise(engine, prompts)
    assert most_held == DECODE_BLOCKS_BOUND
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    for prompt, tokens in zip(prompts, outputs):
        assert tokens == hf_greedy(hf, prompt), prompt


def test_preempted_windowed_sequences_recompute_to_transformers_tokens(windowed) -> None:
    """A cache too small for six sequences at once: preempted ones recompute from the prefix cache, whose blocks
    behind the window were freed (and maybe reused) meanwhile."""
    hf, path = windowed
    prompts = prompts_of((12, 27, 5, 9, 30, 14))
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", block_size=BLOCK_SIZE, max_model_len=96,
                                    max_num_batched_tokens=16, num_gpu_blocks_override=12))
    outputs, _ = run_stepwise(engine, prompts)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    for prompt, tokens in zip(prompts, outputs):
        assert tokens == hf_greedy(hf, prompt), prompt
