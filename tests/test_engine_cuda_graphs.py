"""Decode CUDA graphs: bucket sizes, and the padded static-buffer decode equals the eager decode.

Without a GPU nothing is captured, so DecodeGraphs.run takes its uncaptured path: the same static buffers, padding and
slicing, run eagerly. That covers everything but the capture itself, on every kernel backend. With a GPU the same
tests capture and replay real graphs, and the last one runs the engine with and without them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from lmport.engine.cuda_graphs import DecodeGraphs, capture_sizes
from lmport.engine.models import get_model_class
from tests.kernel_helpers import DEVICE, enable_triton_interpreter, fresh_seed, rel_error
from tests.model_harness import PagedHarness, PagedSeq

enable_triton_interpreter()

from lmport import kernels  # noqa: E402

VOCAB = 96
MAX_BLOCKS = 16  # static block-table width: 64 positions at block_size 4


@pytest.mark.parametrize("max_batch, expected", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (40, [1, 2, 4, 8, 16, 32, 40]),
    (256, [1, 2, 4, 8, *range(16, 257, 16)]), (4096, [1, 2, 4, 8, *range(16, 513, 16)]),
])
def test_capture_sizes(max_batch, expected):
    assert capture_sizes(max_batch) == expected


def test_bucket_is_the_smallest_size_that_holds_the_batch():
    graphs = DecodeGraphs(tiny_model(torch.float16), 40, 4)
    assert graphs.hidden.shape == (40, 48) and graphs.hidden.dtype == torch.float16  # read from the model
    assert [graphs.bucket(n) for n in (1, 2, 3, 5, 9, 17, 33, 40)] == [1, 2, 4, 8, 16, 32, 40, 40]
    for bad in (0, 41):
        with pytest.raises(ValueError, match=f"decode batch of {bad} outside 1..40"):
            graphs.bucket(bad)


def tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, head_dim=16)
    model = get_model_class(config)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@torch.inference_mode()
def test_padded_static_decode_matches_the_eager_decode(backend):
    """Two decode steps through one DecodeGraphs: 5 sequences (padded to 8), then 3 shorter ones (padded to 4, over
    rows and table columns the first step left behind). Each must give the eager step's hidden states and K/V, and
    padded rows must write nothing into the cache. On a GPU the graphs are captured (except for the reference
    kernels, which cannot be) and replayed."""
    seed = fresh_seed()
    model = tiny_model(torch.float32).to(DEVICE)
    harness = PagedHarness(model, block_size=4, seed=seed)
    seqs = [PagedSeq() for _ in range(5)]
    harness.step([(s, torch.randint(0, VOCAB, (n,)).tolist()) for s, n in zip(seqs, (19, 3, 11, 26, 7))])
    graphs = DecodeGraphs(model, 8, MAX_BLOCKS)
    before = kernels._backend
    try:
        kernels.set_backend(backend)
        if DEVICE.type == "cuda" and backend != "torch":
            graphs.capture()
            assert sorted(graphs.graphs) == [1, 2, 4, 8]
        for step_seqs in (seqs, [seqs[1], seqs[4], seqs[2]]):
            ids, positions, meta, _, _ = harness.prepare([(s, [int(torch.randint(0, VOCAB, ()))]) for s in step_seqs])
            assert meta.num_decode_tokens == len(step_seqs)
            eager, snapshot, eager_caches = harness.rewound_forward(ids, positions, meta)
            static = graphs.run(ids, positions, meta)
            assert static.shape == eager.shape
            assert rel_error(static, eager) < 1e-5, f"seed={seed}"
            written = torch.zeros(snapshot[0].shape[:2], dtype=torch.bool, device=DEVICE).flatten()
            written[meta.slot_mapping] = True
            for cache, saved, expected in zip(harness.caches(), snapshot, eager_caches):
                flat, flat_saved, flat_expected = (t.flatten(0, 1) for t in (cache, saved, expected))
                assert torch.equal(flat[~written], flat_saved[~written]), "a padded row wrote into the cache"
                assert rel_error(flat[written], flat_expected[written]) < 1e-5
    finally:
        kernels.set_backend(before)


class HostSyncProbe(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host: inside a CUDA graph capture each one is an error."""

    SYNCING = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            self.syncs.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend, capturable", [("triton", True), ("torch", False)])
@torch.inference_mode()
def test_the_captured_decode_step_never_waits_for_the_device(backend, capturable):
    """The decode forward that DecodeGraphs captures must not read tensor values on the host (the Triton path on a
    GPU); the reference kernels do (a data-dependent mask), which is why kernel_backend='torch' runs eagerly and
    what shows that the probe sees such reads."""
    model = tiny_model(torch.float32).to(DEVICE)
    harness = PagedHarness(model, block_size=4)
    seqs = [PagedSeq() for _ in range(3)]
    harness.step([(s, [1, 2, 3, 4, 5]) for s in seqs])
    graphs = DecodeGraphs(model, 4, MAX_BLOCKS)
    before = kernels._backend
    try:
        kernels.set_backend(backend)
        ids, positions, meta, _, _ = harness.prepare([(s, [7]) for s in seqs])
        graphs.run(ids, positions, meta)  # fills the static buffers, as a step before the capture would
        with HostSyncProbe() as probe:
            graphs._forward(graphs.bucket(len(seqs)))
    finally:
        kernels.set_backend(before)
    assert (probe.syncs == set()) == capturable, probe.syncs


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing CUDA graphs needs a GPU")
def test_engine_decodes_the_same_tokens_with_and_without_cuda_graphs():
    from lmport.engine import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"] * 3
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        with LLM("smollm2", device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=16) as llm:
            runs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            graphed = llm.stats()["cuda_graph_steps"]
        assert (graphed == 0) if eager else (graphed > 0)
    assert runs[True] == runs[False]
