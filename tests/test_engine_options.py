"""vLLM's configuration-guide options: each is implemented, or refused by name (`Unsupported`, the protocol's
`unsupported` code) with what to use instead; none is silently ignored. docs/engine.md#vllm-options-that-are-refused
lists them with these tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams, Unsupported
from tests.bridge_helpers import spawn_shim

REFUSED = [
    ("swap_space", 4, "recomputed"),
    ("cpu_offload_gb", 2, "quantization='int8'"),
    ("pipeline_parallel_size", 2, "worker pool"),
    ("distributed_executor_backend", "external_launcher", "or 'ray'"),
    ("lora_extra_vocab_size", 512, "leave it at 256"),
]
ACCEPTED = [("kv_cache_dtype", "auto"), ("kv_cache_dtype", "fp8"), ("kv_cache_dtype", "fp8_e4m3"),
            ("kv_cache_dtype", "fp8_e5m2"), ("swap_space", 0), ("cpu_offload_gb", 0), ("tensor_parallel_size", 1),
            ("tensor_parallel_size", 2), ("pipeline_parallel_size", 1), ("distributed_executor_backend", None),
            ("distributed_executor_backend", "uni"), ("distributed_executor_backend", "mp"),
            ("distributed_executor_backend", "ray"),
            ("lora_extra_vocab_size", 256), ("quantization", "int8"), ("quantization", "int4"),
            ("quantization", "gguf"), ("quantization", "awq"), ("quantization", "gptq"),
            ("trust_remote_code", True), ("revision", "main")]


@pytest.mark.parametrize("name,value,hint", REFUSED)
def test_unimplemented_values_are_refused_by_name(name: str, value: object, hint: str) -> None:
    with pytest.raises(Unsupported) as err:
        EngineConfig.from_dict({name: value})
    assert err.value.field == name and hint in str(err.value)


@pytest.mark.parametrize("name,value", ACCEPTED)
def test_implemented_and_no_op_values_are_accepted(name: str, value: object) -> None:
    assert getattr(EngineConfig.from_dict({name: value}), name) == value


def test_wrong_types_and_ranges_stay_invalid_params() -> None:
    for name, value in [("swap_space", -1), ("tensor_parallel_size", 0), ("kv_cache_dtype", "int8"),
                        ("distributed_executor_backend", "threads")]:
        with pytest.raises(InvalidParams) as err:
            EngineConfig.from_dict({name: value})
        assert err.value.field == name


def test_tensor_parallel_needs_heads_that_split_evenly(tmp_path: Path) -> None:
    from lmport.engine.loader import load_model
    from tests.model_harness import write_tiny_model_dir

    write_tiny_model_dir(tmp_path)  # 4 heads, 2 KV heads: 3 ranks cannot share them
    with pytest.raises(InvalidParams, match="num_attention_heads") as err:
        load_model(EngineConfig(model=str(tmp_path), tensor_parallel_size=3))
    assert err.value.field == "tensor_parallel_size"


def test_a_pre_quantized_checkpoint_is_refused_at_load(tmp_path: Path) -> None:
    from lmport.engine.config import EngineConfig
    from lmport.engine.loader import load_model
    from tests.model_harness import write_tiny_model_dir

    write_tiny_model_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Unsupported, match=r"pre-quantized checkpoint \(bitsandbytes\).*awq, gptq.*'int4'") as err:
        load_model(EngineConfig(model=str(tmp_path)))
    assert err.value.field == "quantization"


@pytest.mark.slow
def test_the_worker_answers_unsupported_naming_the_option() -> None:
    from lmport.bridge.protocol import BridgeError

    for client in spawn_shim():
        with pytest.raises(BridgeError) as err:
            client.llm("smollm2", pipeline_parallel_size=2)
        assert err.value.code == "unsupported" and err.value.details == {"field": "pipeline_parallel_size"}
        assert "worker pool" in err.value.message and not err.value.retryable
