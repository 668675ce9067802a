"""AWQ and GPTQ checkpoints (lmport.engine.prequantized): the packed layouts match AutoAWQ's and AutoGPTQ's own
code (golden tensors written by them, tests/data/make_prequantized_golden.py), and a tiny Llama saved in each format
computes fp32 logits within 1e-4 of transformers running the dequantized weights, greedy tokens identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmport.engine import LLM, SamplingParams
from lmport.engine.errors import InvalidParams, Unsupported
from lmport.engine.prequantized import CheckpointQuantization, dequantize
from lmport.engine.quantization import Int4Weight
from tests.model_harness import write_tiny_model_dir

GOLDEN = load_file(str(Path(__file__).parent / "data" / "prequantized_golden.safetensors"))
GROUP = 32
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map: nibble j holds column AWQ_PACK_ORDER[j]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS = {"awq": CheckpointQuantization("awq", GROUP, zeros_minus_one=False),
           "gptq": CheckpointQuantization("gptq", GROUP, zeros_minus_one=True)}
CONFIGS = {"awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
           "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
                    "checkpoint_format": "gptq"}}
CONFIGS["gptq_v2"] = {**CONFIGS["gptq"], "checkpoint_format": "gptq_v2"}  # GPTQModel's: zeros stored as they are


def golden(name: str) -> dict[str, torch.Tensor]:
    return {key.split(".", 1)[1]: value for key, value in GOLDEN.items() if key.startswith(f"{name}.")}


def pack_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words of 8 consecutive 4-bit values along `dim`, value j at bits 4j (the inverse of the unpacking)."""
    values = values.movedim(dim, -1).to(torch.int64)
    words = values.reshape(*values.shape[:-1], -1, 8) << torch.arange(0, 32, 4)
    return words.sum(-1).to(torch.uint32).view(torch.int32).movedim(-1, dim).contiguous()


def pack(method: str, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Linear's checkpoint tensors from codes [N, K], zeros and scales [N, K / g], as AutoAWQ / AutoGPTQ save
    them."""
    if method == "awq":
        order = torch.arange(codes.shape[0]).reshape(-1, 8)[:, AWQ_PACK_ORDER].reshape(-1)
        return {"qweight": pack_nibbles(codes.t()[:, order], 1), "qzeros": pack_nibbles(zeros.t()[:, order], 1),
                "scales": scales.t().half().contiguous()}
    stored_zeros = zeros.t() if method == "gptq_v2" else zeros.t() - 1
    return {"qweight": pack_nibbles(codes.t(), 0), "qzeros": pack_nibbles(stored_zeros, 1),
            "scales": scales.t().half().contiguous(),
            "g_idx": torch.arange(codes.shape[1], dtype=torch.int32) // GROUP}


@pytest.mark.parametrize("name,method", [("awq", "awq"), ("gptq_asym", "gptq"), ("gptq_sym", "gptq")])
def test_unpacking_gives_the_reference_libraries_dequantized_weights(name: str, method: str) -> None:
    tensors = golden(name)
    codes, scales, zeros = FORMATS[method].codes(tensors)
    weight = dequantize(codes, scales, zeros, GROUP).t()
    # AutoAWQ dequantizes in fp16 (its scales' dtype), AutoGPTQ in the scales' fp32: the same products, rounded so
    rounded = weight.half().float() if method == "awq" else weight
    torch.testing.assert_close(rounded, tensors["dequantized"], atol=0, rtol=0)
    assert codes.min() >= 0 and codes.max() <= 15 and len(codes.unique()) > 8


@pytest.mark.parametrize("name,method", [("awq", "awq"), ("gptq_asym", "gptq"), ("gptq_sym", "gptq")])
def test_the_test_packer_writes_the_reference_libraries_layout(name: str, method: str) -> None:
    tensors = golden(name)
    codes, scales, zeros = FORMATS[method].codes(tensors)
    packed = pack(method, codes, zeros, scales)
    for part in ("qweight", "qzeros"):
        assert torch.equal(packed[part], tensors[part]), part


def quantize_group_wise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes, zeros and fp16-representable scales of a [N, K] weight, per group of GROUP."""
    groups = weight.reshape(weight.shape[0], -1, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).half().float()
    zeros = torch.round(-low / scales).clamp(0, 15)
    codes = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return codes.reshape(weight.shape).to(torch.int32), zeros.to(torch.int32), scales


def write_checkpoint(path: Path, method: str) -> torch.nn.Module:
    """A tiny Llama in `method`'s format; returns the HF model holding the dequantized weights (the reference)."""
    hf = write_tiny_model_dir(path)
    state = {name: tensor.contiguous() for name, tensor in hf.state_dict().items()}
    for name in [n for n in state if n.rsplit(".", 2)[-2] in PROJECTIONS]:
        codes, zeros, scales = quantize_group_wise(state.pop(name))
        prefix = name.removesuffix(".weight")
        state |= {f"{prefix}.{part}": tensor for part, tensor in pack(method, codes, zeros, scales).items()}
        hf.get_parameter(name).data = dequantize(codes, scales, zeros.float(), GROUP)
    for file in path.glob("*.safetensors"):
        file.unlink()
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": CONFIGS[method]}))
    return hf


@pytest.fixture(scope="module", params=["awq", "gptq", "gptq_v2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               ) -> tuple[str, Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, write_checkpoint(path, request.param)


def test_a_checkpoint_matches_transformers_on_its_dequantized_weights(
        checkpoint: tuple[str, Path, torch.nn.Module]) -> None:
    method, path, reference = checkpoint
    prompts = [list(range(20, 60)), list(range(100, 112))]
    with LLM(str(path), dtype="float32", kv_cache_memory_bytes=8 << 20) as llm:
        linears = {name: m.quantized for name, m in llm.engine.runner.model.named_modules() if hasattr(m, "quantized")}
        assert llm.config.quantization is None  # the checkpoint's own quantization_config selected it
        scored = llm.generate([{"prompt_token_ids": p} for p in prompts],
                              SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                              SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    # q|k|v and gate|up fused, o and down: 4 Linears per layer from the file's codes; lm_head stays fp32
    assert sorted(name for name, q in linears.items() if isinstance(q, Int4Weight)) == sorted(
        f"model.layers.{i}.{leaf}" for i in range(2)
        for leaf in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    for prompt, result, generated in zip(prompts, scored, greedy):
        with torch.no_grad():
            expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0], dim=-1)
            hf_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                           min_new_tokens=32, pad_token_id=257)[0, len(prompt):].tolist()
        got = torch.tensor([position[t].logprob for t, position in zip(prompt[1:], result.prompt_logprobs[1:])])
        torch.testing.assert_close(got, expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])],
                                   atol=1e-4, rtol=0)
        assert generated.outputs[0].token_ids == hf_tokens, method


def test_the_quantization_option_must_agree_with_the_checkpoint(checkpoint: tuple[str, Path, torch.nn.Module],
                                                                 tmp_path: Path) -> None:
    method, path, _ = checkpoint
    method = method.removesuffix("_v2")
    with LLM(str(path), dtype="float32", kv_cache_memory_bytes=8 << 20, quantization=method) as llm:
        assert llm.config.quantization == method
    for wrong in ("int4", "awq" if method == "gptq" else "gptq"):
        with pytest.raises(InvalidParams, match=f"{method} checkpoint; pass quantization='{method}'") as err:
            LLM(str(path), quantization=wrong)
        assert err.value.field == "quantization"
    write_tiny_model_dir(tmp_path)
    with pytest.raises(InvalidParams, match="has no quantization_config") as err:
        LLM(str(tmp_path), quantization=method)
    assert err.value.field == "quantization"


def with_settings(path: Path, tmp_path: Path, **settings: object) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir(parents=True, exist_ok=True)
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] |= settings
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("settings,message", [
    ({"bits": 8}, "8 bits: only 4-bit"),
    ({"group_size": 16}, "group_size 16"),
    ({"group_size": -1}, "group_size -1"),
])
def test_unsupported_checkpoint_settings_name_the_option(checkpoint: tuple[str, Path, torch.nn.Module],
                                                        tmp_path: Path, settings: dict, message: str) -> None:
    _, path, _ = checkpoint
    with pytest.raises(Unsupported, match=message) as err:
        LLM(str(with_settings(path, tmp_path, **settings)))
    assert err.value.field == "quantization"


def test_act_order_gptq_and_gemv_awq_are_refused(tmp_path: Path) -> None:
    for method, settings, message in (("gptq", {"desc_act": True}, "act-order"),
                                      ("awq", {"version": "gemv"}, "version 'gemv'")):
        path = tmp_path / method
        write_checkpoint(path, method)
        with pytest.raises(Unsupported, match=message) as err:
            LLM(str(with_settings(path, tmp_path / f"{method}-copy", **settings)))
        assert err.value.field == "quantization"


def test_a_permuted_g_idx_is_refused_even_when_desc_act_is_unset() -> None:
    tensors = golden("gptq_asym")
    tensors["g_idx"] = tensors["g_idx"].flip(0)
    with pytest.raises(Unsupported, match="act-order"):
        FORMATS["gptq"].codes(tensors)


def test_a_checkpoint_is_not_sharded_across_ranks(checkpoint: tuple[str, Path, torch.nn.Module]) -> None:
    _, path, _ = checkpoint
    with pytest.raises(Unsupported, match="not sharded") as err:
        LLM(str(path), tensor_parallel_size=2)
    assert err.value.field == "tensor_parallel_size"
