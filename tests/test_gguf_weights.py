"""quantization="gguf": a GGUF's Q4_0 / Q4_1 / Q4_K codes become int4 weights as they are (no re-quantization) and
its Q8_0 tensors int8 (their own codes and block scales on lmport's W8A8 kernel, re-quantized per channel for
torch's). The block parsing is checked against gguf-py's own dequantization; the engine against
transformers' model loaded from the same GGUF (which de-quantizes it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmport.engine import LLM, SamplingParams
from lmport.engine.errors import InvalidParams
from lmport.engine.gguf_weights import quantized_blocks
from lmport.engine.models.llama import checkpoint_parts
from lmport.engine.quantization import Int4Weight, Int8Weight
from lmport.kernels import cpu
from tests.model_harness import tiny_llama, write_tiny_gguf, write_tiny_model_dir

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class RawTensor:
    """The two attributes of gguf.GGUFReader's tensors that quantized_blocks reads."""

    def __init__(self, data: np.ndarray, type_name: str) -> None:
        import gguf

        self.data, self.tensor_type = data, getattr(gguf.GGMLQuantizationType, type_name)


def expand(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * np.repeat(scales, 32, axis=1) + np.repeat(offsets, 32, axis=1)


def random_q4_k_rows(rng: np.random.Generator, rows: int, superblocks: int) -> np.ndarray:
    """Q4_K blocks of random codes and 6-bit scales/mins, with sane f16 super-block scales (gguf-py cannot quantize
    to Q4_K)."""
    raw = rng.integers(0, 256, (rows, superblocks, 144), dtype=np.uint8)
    raw[..., 0:4] = rng.uniform(0.01, 0.1, (rows, superblocks, 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_codes_scales_and_offsets_give_gguf_pys_dequantized_weights(type_name: str) -> None:
    import gguf

    rng = np.random.default_rng(0)
    raw_type = getattr(gguf.GGMLQuantizationType, type_name)
    if type_name == "Q4_K":
        raw = random_q4_k_rows(rng, 16, 2)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((48, 128)).astype(np.float32), raw_type)
    codes, scales, offsets = quantized_blocks(RawTensor(raw, type_name))
    if type_name == "Q8_0":
        assert codes.dtype == np.int8 and not offsets.any()
    else:
        assert codes.min() >= 0 and codes.max() <= 15
    np.testing.assert_array_equal(expand(codes, scales, offsets), gguf.quants.dequantize(raw, raw_type))


def test_int4_weight_from_codes_multiplies_like_the_expanded_weight() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=gen)
    scales, offsets = torch.rand(32, 2, generator=gen), torch.randn(32, 2, generator=gen)
    weight = Int4Weight.from_codes(codes, scales, offsets, 32, torch.float32)
    dense = codes.float() * scales.repeat_interleave(32, 1) + offsets.repeat_interleave(32, 1)
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(weight.matmul(x), x @ dense.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("linear_type", ["Q4_0", "Q4_1"])
def test_the_engine_runs_the_files_own_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             linear_type: str) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(), {**dict.fromkeys(PROJECTIONS, linear_type), "output": "Q8_0"})
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = list(range(20, 60))
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    with LLM(str(path), dtype="float32", quantization="gguf", kv_cache_memory_bytes=8 << 20) as llm:
        model = llm.engine.runner.model
        linears = {name: module.quantized for name, module in model.named_modules() if hasattr(module, "quantized")}
        result = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert all(isinstance(q, Int4Weight) for name, q in linears.items() if name != "lm_head")
    assert len(linears) == 2 * 4 + 1
    # lm_head (Q8_0) is int8 per channel, re-quantized for torch's kernel (float32 activations are never rounded):
    # the one place the weights are not the file's own
    assert isinstance(linears["lm_head"], Int8Weight) and not linears["lm_head"].blocked
    reference.lm_head.weight.data = linears["lm_head"].dequantize()
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0], dim=-1)
    got = torch.tensor([position[token].logprob for token, position in zip(prompt[1:], result.prompt_logprobs[1:])])
    torch.testing.assert_close(got, expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])],
                               atol=1e-4, rtol=0)


@pytest.mark.skipif(cpu.available() and not cpu.vnni_matmul_supported(),
                    reason="this CPU (or its compiler target) has no AVX-512 VNNI")
def test_bf16_q8_0_tensors_keep_the_files_codes_and_block_scales(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On lmport's W8A8 kernel every Q8_0 Linear whose shape its tiles divide holds exactly the file's weights
    (q/k rows back in transformers' order); down_proj (96 input channels) is re-quantized for torch's kernel."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(), {**dict.fromkeys(PROJECTIONS, "Q8_0"), "output": "Q8_0"})
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    expected = {name: module.weight.detach() for name, module in reference.named_modules()
                if isinstance(module, torch.nn.Linear)}
    with LLM(str(path), dtype="bfloat16", quantization="gguf", kv_cache_memory_bytes=8 << 20) as llm:
        model = llm.engine.runner.model
        linears = {name: module.quantized for name, module in model.named_modules() if hasattr(module, "quantized")}
        [result] = llm.generate({"prompt_token_ids": list(range(20, 40))},
                                SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(result.outputs[0].token_ids) == 4
    for name, form in linears.items():
        assert isinstance(form, Int8Weight) and form.blocked == (not name.endswith("down_proj")), name
        if not form.blocked:
            continue
        weight = torch.cat([expected[part] for part in checkpoint_parts(name)])
        torch.testing.assert_close(form.dequantize(), weight, rtol=0, atol=0)


def test_gguf_quantization_needs_a_gguf_model(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path)
    with pytest.raises(InvalidParams, match="not converted from a .gguf file") as err:
        LLM(str(tmp_path), quantization="gguf")
    assert err.value.field == "quantization"
