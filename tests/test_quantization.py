"""Weight-only int8 / int4 quantization (lmport.engine.quantization): the kernels against the dequantized weights,
a quantized model against its full-precision self, the engine end to end, and bad settings naming the option."""

from __future__ import annotations

import pytest
import torch

from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams
from lmport.engine.loader import load_model
from lmport.engine.models.layers import Linear
from lmport.engine.quantization import Int4Weight, Int8Weight
from tests.model_harness import PagedHarness, PagedSeq, write_tiny_model_dir

VOCAB = 272  # a multiple of 16, as int4's packing wants for lm_head; the tokenizer uses the first 260 ids


def int4_reference(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The asymmetric group-wise rounding, written out: each group's min maps to 0 and its max to 15."""
    n, k = weight.shape
    groups = weight.reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    return (torch.clamp(torch.round((groups - low) / scale), 0, 15) * scale + low).reshape(n, k)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matmul_is_the_matmul_of_its_dequantized_weight(group_size):
    torch.manual_seed(group_size)
    weight, x = torch.randn(48, 256), torch.randn(5, 256)
    y = Int4Weight.quantize(weight, group_size).matmul(x)
    expected = x @ int4_reference(weight, group_size).T
    assert (y - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (y - x @ weight.T).norm() / (x @ weight.T).norm() < 0.15  # and int4 is still roughly the matmul


def test_int8_matmul_is_the_matmul_of_its_dequantized_weight():
    torch.manual_seed(0)
    weight, x = torch.randn(40, 96), torch.randn(3, 7, 96)
    quantized = Int8Weight.quantize(weight)
    y = quantized.matmul(x)
    assert y.shape == (3, 7, 40)
    expected = x @ quantized.dequantize().T
    assert (y - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (quantized.dequantize() - weight).abs().max() <= weight.abs().amax(1, keepdim=True).max() / 254 + 1e-6


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_computes_with_its_dequantized_weights_and_releases_the_plain_ones(tmp_path, method):
    """The engine's quantized model against the same model whose Linears hold the dequantized weights: the
    quantization is wired into every projection (lm_head included) and nothing else changes."""
    write_tiny_model_dir(tmp_path, vocab_size=VOCAB, tie_word_embeddings=False)
    reference = load_model(EngineConfig(model=str(tmp_path), dtype="float32")).model
    for module in reference.modules():
        if isinstance(module, Linear):
            weight = module.weight.data
            module.weight.data = (Int8Weight.quantize(weight).dequantize() if method == "int8"
                                  else int4_reference(weight, 32))
    quantized = load_model(EngineConfig(model=str(tmp_path), dtype="float32", quantization=method)).model
    linears = [m for m in quantized.modules() if isinstance(m, Linear)]
    assert len(linears) == 2 * 4 + 1 and all(m.quantized is not None and m.weight.numel() == 0 for m in linears)
    prompt = list(range(3, 40))
    [expected] = PagedHarness(reference).step([(PagedSeq(), prompt)])
    [actual] = PagedHarness(quantized).step([(PagedSeq(), prompt)])
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_tied_embedding_keeps_its_table_when_lm_head_is_quantized(tmp_path):
    write_tiny_model_dir(tmp_path, vocab_size=VOCAB, tie_word_embeddings=True)
    loaded = load_model(EngineConfig(model=str(tmp_path), dtype="float32", quantization="int8"))
    assert loaded.model.lm_head.quantized is not None
    assert loaded.model.model.embed_tokens.weight.shape == (VOCAB, 64)


def test_bad_quantization_settings_name_the_option(tmp_path):
    with pytest.raises(InvalidParams) as unknown:
        EngineConfig(quantization="fp4")
    assert unknown.value.field == "quantization" and "int8" in str(unknown.value)
    with pytest.raises(InvalidParams) as group:
        EngineConfig(quantization_group_size=48)
    assert group.value.field == "quantization_group_size"
    write_tiny_model_dir(tmp_path, vocab_size=VOCAB)  # hidden 64, intermediate 96: 96 is no multiple of 64
    with pytest.raises(InvalidParams) as layer:
        load_model(EngineConfig(model=str(tmp_path), dtype="float32", quantization="int4",
                                quantization_group_size=64))
    assert layer.value.field == "quantization_group_size" and "96 input features" in str(layer.value)
    write_tiny_model_dir(tmp_path / "odd", vocab_size=260)
    with pytest.raises(InvalidParams) as rows:
        load_model(EngineConfig(model=str(tmp_path / "odd"), dtype="float32", quantization="int4"))
    assert rows.value.field == "quantization" and "lm_head" in str(rows.value) and "int8" in str(rows.value)
    write_tiny_model_dir(tmp_path / "narrow", vocab_size=VOCAB, hidden_size=40, num_attention_heads=4,
                         num_key_value_heads=2)  # every projection but down_proj has 40 inputs
    with pytest.raises(InvalidParams) as narrow:
        load_model(EngineConfig(model=str(tmp_path / "narrow"), dtype="float32", quantization="int8"))
    assert narrow.value.field == "quantization" and "has 40: use the model dtype" in str(narrow.value)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_bundled_model_generates_quantized_and_mostly_agrees_with_bf16(method):
    from lmport.engine import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM("smollm2", dtype="bfloat16", max_model_len=256) as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM("smollm2", dtype="bfloat16", max_model_len=256, quantization=method) as llm:
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(len(o) == 12 for o in outputs)
    first_tokens_equal = sum(o[0] == r[0] for o, r in zip(outputs, reference))
    assert first_tokens_equal >= 2, (outputs, reference)
