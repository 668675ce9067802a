"""The native model run end to end on the Triton kernels (interpreter) gives the reference kernels' logits.

A tiny random Llama-family model goes through mixed steps (prefill, a chunked prefill continuing after cached context,
decodes) on the paged KV cache, once per backend; every logit row must agree.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from tests.kernel_helpers import DEVICE, TOLERANCE, enable_triton_interpreter, fresh_seed, rel_error

enable_triton_interpreter()

from lmport import kernels  # noqa: E402
from lmport.engine.models import get_model_class  # noqa: E402
from tests.model_harness import PagedHarness, PagedSeq  # noqa: E402

VOCAB = 96
# fp16: every layer's kernels round a little differently from the reference, and the differences compound
LIMIT = {torch.float32: TOLERANCE[torch.float32], torch.float16: 5 * TOLERANCE[torch.float16]}


def run_workload(model: torch.nn.Module, prompts: list[list[int]], decodes: list[list[int]]) -> list[torch.Tensor]:
    harness = PagedHarness(model, block_size=4, seed=1)
    seqs = [PagedSeq() for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]

    def step(work: list[tuple[int, list[int]]]) -> None:
        for (i, _), out in zip(work, harness.step([(seqs[i], tokens) for i, tokens in work])):
            logits[i].append(out)

    step([(0, prompts[0]), (1, prompts[1][:6])])  # a prompt, and the first chunk of a chunked prefill
    step([(1, prompts[1][6:]), (2, prompts[2]), (0, decodes[0][:1])])  # the chunk after cached context + a decode
    for t in range(len(decodes[0])):
        step([(i, decodes[i][t:t + 1]) for i in range(len(prompts))])
    return [torch.cat(rows) for rows in logits]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_logits_match_between_backends(dtype):
    seed = fresh_seed()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, head_dim=24)  # GQA ratio 3; head_dim 24 pads every tile
    model = get_model_class(config)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = model.to(DEVICE, dtype)  # on a GPU: the compiled Triton kernels against the reference on CUDA
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 11, 3)]
    decodes = [torch.randint(0, VOCAB, (2,)).tolist() for _ in prompts]
    before = kernels._backend
    try:
        kernels.set_backend("torch")
        expected = run_workload(model, prompts, decodes)
        kernels.set_backend("triton")
        got = run_workload(model, prompts, decodes)
    finally:
        kernels.set_backend(before)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert e.float().std() > 0.1, "logits too flat for the comparison to mean anything"
        err = rel_error(g, e)
        assert err < LIMIT[dtype], f"seed={seed} seq={i} rel_error={err:.3g}"
