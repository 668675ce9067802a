"""Sampling parameters end to end on the bundled SmolLM2 (fp32): n > 1 sharing the prompt's blocks, seeds across
batch mixes, stop strings and stop tokens in real generation, min_tokens, logprobs against transformers."""

from __future__ import annotations

import threading

import pytest
import torch

from lmport.engine import LLM, RequestOutputKind, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press begins"
OTHERS = ["def quicksort(xs):", "Three facts about owls:", "Dear diary, today I", "The recipe needs flour, " * 3]


@pytest.fixture(scope="module")
def llm():
    engine = LLM("smollm2", dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 << 20)
    yield engine
    engine.shutdown()


def greedy(**extra: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True, **extra})


def completion(llm: LLM, prompt: object, params: SamplingParams):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def test_n4_shares_the_prompt_blocks(llm):
    prompt = " ".join(f"Line {i} of a fairly long shared prompt." for i in range(12))
    num_prompt = len(llm.tokenize(prompt))
    block_size = llm.config.block_size
    used_at_first_token: list[int] = []
    done = threading.Event()
    bm = llm.engine.block_manager

    def on_output(output):
        if not used_at_first_token and len(output.outputs) == 4:
            used_at_first_token.append(bm.num_blocks - bm.num_free_blocks)  # on the engine thread, mid-run
        if output.finished:
            done.set()

    before = llm.stats()
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    llm.add_request(prompt, params, on_output=on_output)
    assert done.wait(300)
    after = llm.stats()
    assert after["prefill_tokens_computed"] - before["prefill_tokens_computed"] <= num_prompt  # one prefill, not 4
    prompt_blocks = -(-num_prompt // block_size)
    # Shared full blocks plus at most one own (copied or fresh) last block per completion; 4 prefills would need
    # 4 * prompt_blocks.
    assert used_at_first_token and used_at_first_token[0] <= prompt_blocks + 4 < 4 * prompt_blocks


def test_n4_gives_four_completions_reproducible_with_seed(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    first = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    again = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    assert [o.index for o in first] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 for o in first)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) > 1  # each completion has its own generator


def test_seeded_outputs_identical_across_batch_mixes(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=77, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=28, ignore_eos=True)
    alone = completion(llm, PROMPT, seeded).token_ids
    # Mix 2: batched with unseeded requests, in the middle of the list.
    mixed = llm.generate(OTHERS[:2] + [PROMPT] + OTHERS[2:], [other, other, seeded, other, other], use_tqdm=False)
    # Mix 3: arrives while other requests are already decoding, next to another seeded request.
    streams = [llm.add_request(p, other) for p in OTHERS]
    late = llm.add_request(PROMPT, seeded)
    neighbour = llm.add_request(PROMPT, seeded.clone(seed=78))
    third = late.result().outputs[0].token_ids
    for s in streams + [neighbour]:
        s.result()
    assert mixed[2].outputs[0].token_ids == alone
    assert third == alone


def test_stop_string_split_across_tokens_in_generation(llm):
    base = completion(llm, PROMPT, greedy())
    tokenizer = llm.tokenizer
    pieces = [tokenizer.decode(base.token_ids[:i]) for i in range(len(base.token_ids) + 1)]
    # A stop string straddling the boundary between output tokens 5 and 6.
    boundary = len(pieces[5])
    stop = base.text[boundary - 2:boundary + 2]
    assert len(stop) == 4 and base.text.find(stop) == boundary - 2
    cut = completion(llm, PROMPT, greedy(stop=[stop]))
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (base.text[:boundary - 2], "stop", stop)
    kept = completion(llm, PROMPT, greedy(stop=[stop], include_stop_str_in_output=True))
    assert kept.text == base.text[:boundary + 2]
    assert kept.token_ids == base.token_ids[:6]


def test_stop_token_ids_in_generation(llm):
    base = completion(llm, PROMPT, greedy())
    stop_token = base.token_ids[4]
    first = base.token_ids.index(stop_token)
    out = completion(llm, PROMPT, greedy(stop_token_ids=[stop_token]))
    assert out.token_ids == base.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)


def test_min_tokens_suppresses_eos_in_generation(llm):
    chat = [{"role": "user", "content": "Reply with the single word: yes"}]
    prompt = {"prompt_token_ids": llm.apply_chat_template(chat)}
    eos = llm.engine.eos_token_ids
    short = completion(llm, prompt, SamplingParams(temperature=0.0, max_tokens=40))
    assert short.finish_reason == "stop" and short.token_ids[-1] in eos
    min_tokens = len(short.token_ids) + 6
    longer = completion(llm, prompt, SamplingParams(temperature=0.0, max_tokens=40, min_tokens=min_tokens))
    assert len(longer.token_ids) >= min_tokens
    assert not any(t in eos for t in longer.token_ids[:min_tokens])


def test_logprobs_match_transformers(llm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    params = greedy(logprobs=5, prompt_logprobs=3, max_tokens=12)
    result = llm.generate(PROMPT, params, use_tqdm=False)[0]
    out = result.outputs[0]
    ids = result.prompt_token_ids + out.token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    num_prompt = len(result.prompt_token_ids)
    for step, (token, position) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[num_prompt - 1 + step]
        assert position[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert position[token].rank == 1  # greedy
        top = row.topk(5)
        assert set(position) == set(top.indices.tolist())  # the sampled token is the top one
        for t, lp in position.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert lp.decoded_token == llm.tokenizer.decode([t])
    assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)),
                                                   abs=1e-4)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == num_prompt
    for i, position in enumerate(result.prompt_logprobs[1:], start=1):
        token = result.prompt_token_ids[i]
        assert position[token].logprob == pytest.approx(ref[i - 1, token].item(), abs=1e-4)
        assert position[token].rank == int((ref[i - 1] > ref[i - 1, token]).sum()) + 1


def test_logprobs_are_raw_even_with_temperature_and_penalties(llm):
    params = SamplingParams(temperature=0.5, repetition_penalty=1.3, seed=5, logprobs=2, max_tokens=6,
                            ignore_eos=True)
    plain = completion(llm, PROMPT, greedy(logprobs=2, max_tokens=1))
    out = completion(llm, PROMPT, params)
    first = plain.logprobs[0]
    for token, lp in out.logprobs[0].items():  # same first position: the same raw distribution
        if token in first:
            assert lp.logprob == pytest.approx(first[token].logprob, abs=1e-5)


def test_output_kinds(llm):
    params = greedy(max_tokens=10)
    final = completion(llm, PROMPT, params)
    deltas, finals = [], []
    llm.add_request(PROMPT, params.clone(output_kind=RequestOutputKind.DELTA),
                    on_output=lambda o: deltas.append(o.outputs[0].text) if o.outputs else None)
    stream = llm.add_request(PROMPT, params.clone(output_kind=RequestOutputKind.FINAL_ONLY))
    finals.extend(stream)
    assert len(finals) == 1 and finals[0].finished and finals[0].outputs[0].text == final.text
    llm.add_request(PROMPT, params).result()  # the delta request finished before this one
    assert "".join(deltas) == final.text and len(deltas) > 1


def test_token_constraints_in_generation(llm):
    base = completion(llm, PROMPT, greedy(max_tokens=6))
    word = llm.tokenizer.decode(base.token_ids[:1]).strip()
    banned = SamplingParams(bad_words=[word]).bad_words_token_ids(llm.tokenizer)
    avoided = completion(llm, PROMPT, greedy(max_tokens=6, bad_words=[word]))
    assert avoided.token_ids[0] != base.token_ids[0]
    assert not any(avoided.token_ids[i:i + len(w)] == w for w in banned for i in range(len(avoided.token_ids)))
    allowed = llm.tokenize(" one two three", add_special_tokens=False)
    constrained = completion(llm, PROMPT, SamplingParams(allowed_token_ids=allowed, max_tokens=8, seed=1))
    assert set(constrained.token_ids) <= set(allowed)
    forced = completion(llm, PROMPT, greedy(max_tokens=3, logit_bias={allowed[0]: 100}))
    assert forced.token_ids == [allowed[0]] * 3
