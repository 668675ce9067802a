"""The C++ CPU decode stack (lmport.engine.cpu_decode) against the module path it replaces.

It must give bit-identical hidden states and K/V cache contents for every Linear kind (fp32, oneDNN-packed bf16,
int8 and int4, each on lmport's VNNI kernel and on torch's) and the Llama variants it takes (Qwen3's per-head q/k
norms, Qwen2's q/k/v bias, a sliding window), over scattered block tables and several decode steps. Models it does
not take must be named with a reason, and an engine must decode through it by default and give the same tokens as
with enforce_eager=True.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import Gemma2Config, GraniteConfig, LlamaConfig, MixtralConfig, Olmo2Config, Qwen2Config, Qwen3Config

from lmport import kernels
from lmport.engine.cpu_decode import CpuDecodeStack, unsupported_reason
from lmport.engine.models import get_model_class
from lmport.engine.models.layers import pack_cpu_linears
from lmport.engine.quantization import quantize_linears
from lmport.kernels import cpu
from tests.kernel_helpers import fresh_seed
from tests.model_harness import PagedHarness, PagedSeq

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.available(), "the CPU C++ extension did not build (see the lmport warning)"


def make_model(config_cls: type, dtype: torch.dtype, **overrides: object) -> torch.nn.Module:
    """Built as the loader builds it: parameters in `dtype`, the RoPE cache in float32."""
    config = config_cls(**{**SMALL, **overrides})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = get_model_class(config)(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def with_torchs_kernel(method: str) -> Callable[[torch.nn.Module], int]:
    def quantize(model: torch.nn.Module) -> int:
        with kernels.use_backend("torch"):  # torch's layouts, not lmport's VNNI ones
            return quantize_linears(model, method, 32)
    return quantize


FORMS = {
    "fp32": (torch.float32, None),
    "bf16 packed": (torch.bfloat16, pack_cpu_linears),
    # lmport's W8A8 / W4A8 kernels where K divides by 64 (all but down_proj, K = 96)
    "int8": (torch.bfloat16, lambda m: quantize_linears(m, "int8", 32)),
    "int8 torch kernel": (torch.bfloat16, with_torchs_kernel("int8")),
    "int4": (torch.bfloat16, lambda m: quantize_linears(m, "int4", 32)),
    "int4 torch kernel": (torch.bfloat16, with_torchs_kernel("int4")),
}
VARIANTS = {
    "llama": (LlamaConfig, {}),
    "qwen3 head norms": (Qwen3Config, {}),
    "qwen2 qkv bias": (Qwen2Config, {}),
    "mistral window": (LlamaConfig, {"sliding_window": 5}),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS)
@torch.inference_mode()
def test_stack_is_bit_identical_to_the_modules(form, variant):
    """Prefill 6 sequences through the modules, then three decode steps (all 6, then subsets), each run through the
    modules and through the stack from the same cache: hidden states and every cache byte must be equal."""
    dtype, prepare = FORMS[form]
    config_cls, overrides = VARIANTS[variant]
    seed = fresh_seed()
    model = make_model(config_cls, dtype, **overrides)
    if prepare is not None:
        assert prepare(model) > 0
    harness = PagedHarness(model, block_size=4, num_blocks=64, seed=seed)
    assert unsupported_reason(model, dtype) is None
    stack = CpuDecodeStack(model)
    seqs = [PagedSeq() for _ in range(6)]
    harness.step([(s, torch.randint(0, VOCAB, (n,)).tolist()) for s, n in zip(seqs, (1, 4, 5, 9, 13, 21))])
    for step_seqs in (seqs, seqs[::2], [seqs[5], seqs[0]]):
        ids, positions, meta, _, _ = harness.prepare([(s, [int(torch.randint(0, VOCAB, ()))]) for s in step_seqs])
        expected, _, expected_caches = harness.rewound_forward(ids, positions, meta)
        actual = stack.run(ids, positions, meta)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), f"seed={seed}"
        for cache, wanted in zip(harness.caches(), expected_caches):
            assert torch.equal(cache, wanted), f"seed={seed}"


@torch.inference_mode()
def test_padded_slots_write_nothing():
    """Slot -1 (a row that stores no K/V, as kernels.store_kv_cache skips it) leaves the cache untouched."""
    model = make_model(LlamaConfig, torch.float32)
    harness = PagedHarness(model, block_size=4, num_blocks=16)
    seqs = [PagedSeq(), PagedSeq()]
    harness.step([(s, [1, 2, 3]) for s in seqs])
    ids, positions, meta, _, _ = harness.prepare([(s, [4]) for s in seqs])
    meta.slot_mapping[1] = -1
    before = [c.clone() for c in harness.caches()]
    CpuDecodeStack(model).run(ids, positions, meta)
    written = meta.slot_mapping[0]
    for cache, saved in zip(harness.caches(), before):
        flat, flat_saved = cache.flatten(0, 1), saved.flatten(0, 1)
        keep = torch.ones(flat.shape[0], dtype=torch.bool)
        keep[written] = False
        assert torch.equal(flat[keep], flat_saved[keep])
        assert not torch.equal(flat[written], flat_saved[written])


@torch.inference_mode()
def test_a_slot_past_the_cache_is_an_error_not_a_stray_write():
    model = make_model(LlamaConfig, torch.float32)
    harness = PagedHarness(model, block_size=4, num_blocks=16)
    seq = PagedSeq()
    harness.step([(seq, [1, 2, 3])])
    ids, positions, meta, _, _ = harness.prepare([(seq, [4])])
    meta.slot_mapping[0] = 16 * 4
    with pytest.raises(RuntimeError, match="slot 64 is past the cache"):
        CpuDecodeStack(model).run(ids, positions, meta)


@pytest.mark.parametrize("config_cls, overrides, reason", [
    (Gemma2Config, {}, "is not a Llama-family decoder"),
    (GraniteConfig, {"embedding_multiplier": 12.0}, "the embedding is scaled"),
    (GraniteConfig, {"residual_multiplier": 0.5}, "changes the Llama layer"),
    (Olmo2Config, {}, "changes the Llama layer"),
    (MixtralConfig, {"num_local_experts": 2, "num_experts_per_tok": 1}, "MLP is not a SiLU-gated one"),
    (LlamaConfig, {"hidden_act": "gelu_pytorch_tanh"}, "MLP is not a SiLU-gated one"),
    (LlamaConfig, {"partial_rotary_factor": 0.5}, "RoPE rotates part of each head"),
])
def test_models_it_does_not_take_are_named(config_cls, overrides, reason):
    model = make_model(config_cls, torch.float32, **overrides)
    assert reason in unsupported_reason(model, torch.float32)


def test_an_fp8_cache_or_a_bf16_rope_cache_runs_the_modules():
    model = make_model(LlamaConfig, torch.bfloat16)
    assert "the KV cache holds torch.float8_e4m3fn" in unsupported_reason(model, torch.float8_e4m3fn)
    assert unsupported_reason(model.to(torch.bfloat16), torch.bfloat16) == "the RoPE cache is not float32"


@pytest.mark.slow
def test_the_engine_decodes_through_the_stack_with_the_same_tokens():
    """The bundled model, greedy, 4 prompts: every decode step goes through the stack by default and the tokens equal
    enforce_eager=True's (module by module); int4 too."""
    from lmport.engine.llm import LLM
    from lmport.engine.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for options in ({"dtype": "bfloat16"}, {"dtype": "bfloat16", "quantization": "int4"}):
        tokens, stack_steps = {}, {}
        for eager in (True, False):
            with LLM("smollm2", enforce_eager=eager, **options) as llm:
                tokens[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                stack_steps[eager] = llm.stats()["cpu_decode_stack_steps"]
        assert tokens[True] == tokens[False], options
        assert stack_steps[True] == 0 and stack_steps[False] >= 23, (options, stack_steps)
