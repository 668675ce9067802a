"""LoRA against PEFT: random adapters made with PEFT on tiny random-init Llama configs match PEFT's merged model
(`merge_and_unload`) to < 1e-4 in fp32: alone, and mixed in one batch with other adapters (other ranks, targets,
alpha, rslora) and with rows that have none; through the paged path and the engine end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lmport.engine.errors import InvalidParams
from lmport.engine.lora import LoRAManager, LoRARequest, batch_for, lora_context
from tests.model_family_checks import build_hf, save_model_dir
from tests.model_harness import PagedHarness, PagedSeq

BASE = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2,
            bos_token_id=258, eos_token_id=259, pad_token_id=257)
# (rank, alpha, targets, rslora): all projections; attention only with rslora; the MLP with a small rank
ADAPTERS = {"all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
            "attn_rslora": (4, 8, ["q_proj", "v_proj", "o_proj"], True),
            "mlp": (2, 4, ["gate_proj", "down_proj"], False)}


def base_model() -> torch.nn.Module:
    from transformers import LlamaConfig
    return build_hf(LlamaConfig(**BASE))


def make_adapter(base: torch.nn.Module, name: str, path: Path, seed: int) -> torch.nn.Module:
    """Save a PEFT adapter with random A and B (init_lora_weights=False) to path; return PEFT's merged model."""
    from peft import LoraConfig, get_peft_model

    rank, alpha, targets, rslora = ADAPTERS[name]
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                                 use_rslora=rslora, init_lora_weights=False))
    with torch.no_grad():  # PEFT's random init of B is tiny: make the adapters matter
        for param_name, p in peft_model.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    base = base_model()
    merged = {name: make_adapter(base, name, root / name, seed) for seed, name in enumerate(ADAPTERS, 1)}
    requests = {name: LoRARequest(name, i, str(root / name)) for i, name in enumerate(ADAPTERS, 1)}
    return {"base": base, "merged": merged, "requests": requests, "root": root}


def ours_for(base: torch.nn.Module) -> torch.nn.Module:
    from lmport.engine.models import get_model_class
    model = get_model_class(base.config)(base.config)
    model.load_weights(base.state_dict().items())
    return model


def test_mixed_adapters_in_one_paged_batch_match_peft_merged_models(models: dict) -> None:
    ours = ours_for(models["base"])
    manager = LoRAManager(ours, max_loras=3, max_rank=8, max_cpu_loras=3, dtype=torch.float32,
                          device=torch.device("cpu"))
    slots = {name: manager.acquire(req) for name, req in models["requests"].items()}
    assert sorted(slots.values()) == [0, 1, 2]
    # four sequences: one per adapter and one without, prefilled (chunked) then decoded together
    users = ["all", None, "attn_rslora", "mlp"]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 5, 12, 7)]
    harness = PagedHarness(ours)
    seqs = [PagedSeq() for _ in users]
    tokens: list[list[int]] = [[] for _ in users]
    logits: list[list[torch.Tensor]] = [[] for _ in users]

    def step(work: list[tuple[int, list[int]]]) -> None:
        ids, positions, meta, order, cu = harness.prepare([(seqs[i], new) for i, new in work])
        row_slots = []
        for k in order:
            i, new = work[k]
            row_slots += [slots[users[i]] if users[i] else -1] * len(new)
        from lmport.engine.forward_context import forward_context
        with torch.inference_mode(), forward_context(meta), lora_context(batch_for(row_slots, ids.device)):
            out = ours.compute_logits(ours(ids, positions)).float()
        for row, k in enumerate(order):
            i, new = work[k]
            tokens[i] += new
            logits[i].append(out[cu[row]:cu[row + 1]])

    step([(0, prompts[0]), (1, prompts[1]), (2, prompts[2][:6])])
    step([(2, prompts[2][6:]), (3, prompts[3]), (0, [11]), (1, [12])])
    for _ in range(3):
        step([(i, [int(torch.randint(0, 256, (), generator=gen))]) for i in range(4)])
    for i, user in enumerate(users):
        reference = models["merged"][user] if user else models["base"]
        with torch.no_grad():
            expected = reference(torch.tensor([tokens[i]])).logits[0]
        got = torch.cat(logits[i])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        if user:  # the adapter really changes the model
            with torch.no_grad():
                assert (models["base"](torch.tensor([tokens[i]])).logits[0] - expected).abs().max() > 1e-2


def test_bad_adapters_are_refused_by_field(models: dict, tmp_path: Path) -> None:
    ours = ours_for(models["base"])
    manager = LoRAManager(ours, max_loras=1, max_rank=4, max_cpu_loras=2, dtype=torch.float32,
                          device=torch.device("cpu"))
    with pytest.raises(InvalidParams, match="rank 8, above max_lora_rank 4") as err:
        manager.load(models["requests"]["all"])
    assert err.value.field == "lora_request"
    with pytest.raises(InvalidParams, match="not a PEFT LoRA adapter directory") as err:
        manager.load(LoRARequest("missing", 9, str(tmp_path)))
    assert err.value.field == "lora_request.lora_path"
    with pytest.raises(InvalidParams) as err:
        LoRARequest("x", 0, str(tmp_path))
    assert err.value.field == "lora_request.lora_int_id"
    from peft import LoraConfig, get_peft_model  # a target lmport serves no LoRA for (vLLM: no lm_head LoRA)
    get_peft_model(copy.deepcopy(models["base"]), LoraConfig(r=2, target_modules=["lm_head"])).save_pretrained(
        tmp_path / "head")
    with pytest.raises(InvalidParams, match="targets 'lm_head', which this model has no LoRA-capable") as err:
        manager.load(LoRARequest("head", 8, str(tmp_path / "head")))
    assert err.value.field == "lora_request"
    with pytest.raises(InvalidParams, match="already adapter 'mlp'"):
        manager.load(models["requests"]["mlp"])
        manager.load(LoRARequest("other", models["requests"]["mlp"].lora_int_id, str(tmp_path)))


def test_slots_are_shared_reused_and_exhausted(models: dict) -> None:
    ours = ours_for(models["base"])
    manager = LoRAManager(ours, max_loras=2, max_rank=8, max_cpu_loras=2, dtype=torch.float32,
                          device=torch.device("cpu"))
    reqs = models["requests"]
    first = manager.acquire(reqs["all"])
    assert manager.acquire(reqs["all"]) == first  # the same adapter shares its slot
    second = manager.acquire(reqs["mlp"])
    assert second != first and manager.acquire(reqs["attn_rslora"]) is None  # every slot busy: wait
    manager.release(second)
    assert manager.acquire(reqs["attn_rslora"]) == second  # the freed slot takes the new adapter


@pytest.mark.slow
def test_the_engine_batches_adapters_and_matches_peft_greedy(models: dict, tmp_path: Path) -> None:
    """Three adapters and the base model in one generate call, on an engine with only two slots: the third adapter
    waits for a slot. Every greedy continuation equals transformers' generate on PEFT's merged model, and the
    prefix cache never serves one adapter's K/V to another (the same prompt runs under each)."""
    from lmport.engine import LLM, SamplingParams

    save_model_dir(models["base"], tmp_path / "base")
    prompt = [5, 17, 33, 2, 9, 41, 8, 13, 21, 34, 55, 89, 144, 3, 7, 11, 19]  # > one 16-token block: cacheable
    users = [None, "all", "attn_rslora", "mlp", "all"]
    llm = LLM(str(tmp_path / "base"), dtype="float32", kv_cache_memory_bytes=16 << 20, enable_lora=True,
              max_loras=2, max_lora_rank=8)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16)
        outs = llm.generate([{"prompt_token_ids": prompt}] * len(users), greedy, use_tqdm=False,
                            lora_request=[models["requests"][u] if u else None for u in users])
        for user, out in zip(users, outs):
            reference = models["merged"][user] if user else models["base"]
            with torch.inference_mode():
                ref = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                         min_new_tokens=16, pad_token_id=257)
            assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), user
        assert len({tuple(o.outputs[0].token_ids) for o in outs[:4]}) == 4  # four different models
    finally:
        llm.shutdown()
    for options, lora, match in [({"enable_lora": True, "max_lora_rank": 4}, "all", "rank 8, above max_lora_rank 4"),
                                 ({}, "mlp", "load it with enable_lora=True")]:
        engine = LLM(str(tmp_path / "base"), dtype="float32", kv_cache_memory_bytes=16 << 20, **options)
        try:
            with pytest.raises(InvalidParams, match=match) as err:
                engine.generate({"prompt_token_ids": prompt}, lora_request=models["requests"][lora], use_tqdm=False)
            assert err.value.field == "lora_request"
        finally:
            engine.shutdown()


@pytest.mark.slow
def test_the_worker_takes_lora_request_on_generate_and_chat(tmp_path: Path) -> None:
    """Over real pipes, on the bundled SmolLM2: an adapter changes the greedy output, the same call without it does
    not, and a worker engine without enable_lora answers invalid_params naming lora_request."""
    from lmport.bridge.client import Client
    from lmport.bridge.protocol import BridgeError
    from tests.bridge_helpers import REPO
    from tests.make_lora_adapter import make_adapter

    adapter = {"lora_name": "smol-test", "lora_int_id": 1, "lora_path": str(make_adapter(tmp_path / "adapter"))}
    greedy = {"temperature": 0, "max_tokens": 12}
    client = Client.spawn(cwd=str(REPO))
    try:
        llm = client.llm("smollm2", enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes=256 << 20,
                         max_model_len=512)
        base, tuned = client.generate(llm, ["The capital of France is"] * 2, greedy, lora_request=[None, adapter])
        assert base["outputs"][0]["text"] != tuned["outputs"][0]["text"]
        again = client.chat(llm, [{"role": "user", "content": "Hi"}], greedy, lora_request=adapter)
        assert again[0]["outputs"][0]["token_ids"]
        plain = client.llm("smollm2", kv_cache_memory_bytes=256 << 20, max_model_len=512)
        with pytest.raises(BridgeError) as err:
            client.generate(plain, "Hi", greedy, lora_request=adapter)
        assert err.value.code == "invalid_params" and err.value.details["field"] == "lora_request"
    finally:
        client.close()
