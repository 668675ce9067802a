"""The three checks every native model family must pass against transformers (tiny random-init configs, fp32):

1. paged logits: chunked/mixed prefill and decode steps through the paged KV cache, every row within 1e-4 of HF's
   full-sequence forward;
2. greedy: 32 tokens from the engine (loaded from a saved model directory, as users load it) identical to
   transformers' `generate`;
3. seeded sampling: a seeded request gives the same tokens alone and inside a batch of 16.

A family's test module builds its configs and calls these; see tests/test_models_parity.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from lmport.engine.models import get_model_class
from tests.model_harness import PagedHarness, PagedSeq, save_tokenizer

if TYPE_CHECKING:
    from lmport.engine import LLM

PARITY_ATOL = 1e-4


def randomise_norms_and_biases(hf: torch.nn.Module) -> None:
    """HF inits norms to 1 (or 0 for Gemma's 1 + w) and biases to 0: randomise them so they are really tested."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5) if p.mean().abs() > 0.5 else p.uniform_(-0.5, 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)


def build_hf(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    randomise_norms_and_biases(hf)
    return hf


def build_pair(config: PretrainedConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF model, lmport's native model holding the same weights), both fp32 on CPU."""
    hf = build_hf(config)
    ours = get_model_class(hf.config)(hf.config)
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def check_paged_logits(hf: torch.nn.Module, ours: torch.nn.Module, prompt_lens: tuple[int, ...] = (5, 11, 3),
                       decode_steps: int = 4, block_size: int = 4, num_blocks: int = 96) -> None:
    """Three prompts: a prefill, a chunked prefill, a prefill after cached context, then decode steps of all three
    in one batch; every row's logits must match HF's forward over the whole sequence."""
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    harness = PagedHarness(ours, block_size=block_size, num_blocks=num_blocks)
    seqs = [PagedSeq() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]

    def run(work: list[tuple[int, list[int]]]) -> None:
        outs = harness.step([(seqs[i], new) for i, new in work])
        for (i, new), out in zip(work, outs):
            tokens[i] += new
            logits[i].append(out)

    split = len(prompts[1]) // 2
    run([(0, prompts[0]), (1, prompts[1][:split])])
    run([(1, prompts[1][split:]), (2, prompts[2]), (0, [7])])
    for _ in range(decode_steps):
        run([(i, [int(torch.randint(0, vocab, (), generator=gen))]) for i in range(len(prompts))])

    for i in range(len(prompts)):
        with torch.no_grad():
            expected = hf(torch.tensor([tokens[i]])).logits[0].float()
        got = torch.cat(logits[i])
        assert got.shape == expected.shape
        assert expected.std() > 0.1, "logits too flat for the comparison to mean anything"
        torch.testing.assert_close(got, expected, atol=PARITY_ATOL, rtol=0)


def save_model_dir(hf: torch.nn.Module, path: Path) -> Path:
    """A loadable HF directory for `hf` (fp32 safetensors, byte-level tokenizer); its vocab must be >= 259."""
    hf.config.dtype = torch.float32
    hf.generation_config.pad_token_id = hf.config.pad_token_id
    hf.save_pretrained(path)
    save_tokenizer(path)
    return path


def check_engine_greedy_and_seeded(hf: torch.nn.Module, path: Path, new_tokens: int = 32, **engine_options) -> None:
    """Load `path` through lmport's loader and engine; 32 greedy tokens must equal HF generate's, and a seeded
    sampled request must give the same tokens alone and inside a batch of 16."""
    from lmport.engine import LLM, SamplingParams

    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, min(vocab, 256), (n,), generator=gen).tolist() for n in (7, 19, 3)]
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=32 << 20, **engine_options)
    try:
        # min_tokens masks EOS for every token, exactly like generate's min_new_tokens
        greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            with torch.inference_mode():
                ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=hf.config.pad_token_id or 0)
            assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), prompt

        check_seeded_batch_invariance(llm, prompts)
    finally:
        llm.shutdown()


def check_seeded_batch_invariance(llm: LLM, prompts: list[list[int]]) -> None:
    """A seeded sampled request gives the same tokens alone and as row 9 of a batch of 16 mixed requests."""
    from lmport.engine import SamplingParams

    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[1]}, seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch_prompts = [{"prompt_token_ids": prompts[i % 3] * (1 + i % 2)} for i in range(15)]
    batch = llm.generate(batch_prompts[:9] + [{"prompt_token_ids": prompts[1]}] + batch_prompts[9:],
                         [other] * 9 + [seeded] + [other] * 6, use_tqdm=False)
    assert batch[9].outputs[0].token_ids == alone
