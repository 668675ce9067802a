"""How `lmport bench profile` files each profiler event's self time."""

from __future__ import annotations

from dataclasses import dataclass

from lmport.bridge.bench_profile import RUNNER_LABEL, _category


@dataclass
class Event:
    name: str
    cpu_parent: Event | None = None


RUNNER = Event(RUNNER_LABEL)


def test_torch_operators_inside_a_kernel_label_count_for_that_kernel():
    prefill = Event("lmport::paged_attention_prefill", Event("python_function", RUNNER))
    sdpa = Event("aten::_scaled_dot_product_flash_attention_for_cpu", Event("aten::scaled_dot_product_attention",
                                                                            prefill))
    assert _category(sdpa) == "attention"
    assert _category(Event("aten::index_copy_", Event("lmport::store_kv_cache", RUNNER))) == "attention"
    assert _category(Event("aten::mul", Event("lmport::rms_norm", RUNNER))) == "fused elementwise kernels"


def test_operators_outside_kernel_labels_and_outside_the_runner():
    assert _category(Event("aten::mm", RUNNER)) == "matmuls"
    assert _category(Event("mkldnn::_linear_pointwise", RUNNER)) == "matmuls"
    assert _category(Event("aten::embedding", RUNNER)) == "other torch operators"
    assert _category(Event("lmport::paged_attention_decode", RUNNER)) == "attention"
    assert _category(RUNNER) is None
    assert _category(Event("aten::topk")) is None  # the sampler's: not under the runner
    assert _category(Event("aten::topk", Event("lmport::rms_norm"))) is None
    assert _category(Event("python_function", RUNNER)) is None
