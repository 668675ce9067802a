"""Sampler: processors against their formulas, truncation masks against independent references, sampling
distributions checked statistically, seeded rows independent of the batch, logprobs from the raw distribution."""

from __future__ import annotations

import math

import pytest
import torch

from lmport.engine.sampler import Sampler, SamplingBatch, apply_min_p, apply_top_k, apply_top_p, compute_prompt_logprobs, draw
from lmport.engine.sampling_params import SamplingParams
from lmport.engine.sequence import Sequence
from tests.engine_helpers import make_seq

V = 12
EOS = 11
# Fixed, tie-free logits.
BASE = torch.tensor([2.0, 1.5, -0.5, 0.3, 3.0, -1.2, 0.9, 0.0, 1.1, -2.0, 0.6, 2.4])


def make_sampler(seed: int = 0) -> Sampler:
    return Sampler(V, {EOS}, generator=torch.Generator().manual_seed(seed))


def batch_of(params: list[SamplingParams], outputs: list[list[int]] | None = None,
             prompts: list[list[int]] | None = None, **extra: object) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch.build(params, prompts or [[0]] * rows, outputs or [[] for _ in range(rows)], **extra)


def processed(params: SamplingParams, prompt: list[int], output: list[int], logits: torch.Tensor = BASE,
              bad_words: list[list[int]] | None = None) -> list[float]:
    batch = batch_of([params], [output], [prompt], bad_words=[bad_words])
    out = logits.clone().unsqueeze(0)
    make_sampler().apply_processors(out, batch)
    return out[0].tolist()


# --- processors vs their formulas ---

def test_penalties_follow_vllm_formulas() -> None:
    prompt, output = [1, 2, 9], [2, 3, 3, 5]
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25)
    expected = []
    for token, logit in enumerate(BASE.tolist()):
        if token in prompt or token in output:  # repetition: prompt and output
            logit = logit / 1.3 if logit > 0 else logit * 1.3
        logit -= 0.25 * output.count(token)  # frequency: output occurrences
        logit -= 0.4 * (token in output)  # presence: output only
        expected.append(logit)
    assert processed(params, prompt, output) == pytest.approx(expected, abs=1e-6)


def test_presence_and_frequency_ignore_prompt() -> None:
    got = processed(SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), prompt=[4, 4], output=[])
    assert got == pytest.approx(BASE.tolist())


def test_logit_bias_added() -> None:
    got = processed(SamplingParams(logit_bias={0: 5.0, 9: -100, 3: 0.5}), [1], [])
    expected = BASE.tolist()
    expected[0] += 5.0
    expected[9] -= 100
    expected[3] += 0.5
    assert got == pytest.approx(expected)


def test_allowed_token_ids_mask() -> None:
    got = processed(SamplingParams(allowed_token_ids=[2, 7]), [1], [])
    assert [t for t, x in enumerate(got) if x != -math.inf] == [2, 7]
    assert got[2] == BASE[2].item() and got[7] == BASE[7].item()


def test_bad_words_ban_last_token_when_prefix_matches() -> None:
    words = [[4], [6, 0], [3, 1, 8]]
    assert math.isinf(processed(SamplingParams(), [1], [], bad_words=words)[4])  # single token: always banned
    no_tail = processed(SamplingParams(), [1], [2, 5], bad_words=words)
    assert not math.isinf(no_tail[0]) and not math.isinf(no_tail[8])
    after_6 = processed(SamplingParams(), [1], [2, 6], bad_words=words)
    assert math.isinf(after_6[0]) and not math.isinf(after_6[8])
    after_3_1 = processed(SamplingParams(), [3], [1], bad_words=words)  # the prefix must be in the output
    assert not math.isinf(after_3_1[8])
    assert math.isinf(processed(SamplingParams(), [1], [7, 3, 1], bad_words=words)[8])


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    params = SamplingParams(min_tokens=3, stop_token_ids=[2])
    early = processed(params, [1], [5, 6])
    assert math.isinf(early[EOS]) and math.isinf(early[2])
    assert not any(math.isinf(x) for t, x in enumerate(early) if t not in (EOS, 2))
    assert not any(math.isinf(x) for x in processed(params, [1], [5, 6, 7]))
    ignoring = processed(SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=[2]), [1], [])
    assert not math.isinf(ignoring[EOS]) and math.isinf(ignoring[2])


def test_min_tokens_suppresses_eos_in_greedy_sampling() -> None:
    logits = BASE.clone()
    logits[EOS] = 50.0
    params = SamplingParams(temperature=0.0, min_tokens=2)
    sampler = make_sampler()
    assert sampler(logits.clone().unsqueeze(0), batch_of([params], [[3]])).token_ids == [4]
    assert sampler(logits.clone().unsqueeze(0), batch_of([params], [[3, 4]])).token_ids == [EOS]


# --- truncation masks vs independent references ---

def ref_kept_top_k(row: list[float], k: int) -> set[int]:
    kth = sorted(row, reverse=True)[k - 1]
    return {t for t, x in enumerate(row) if x >= kth}


def ref_kept_top_p(row: list[float], p: float) -> set[int]:
    probs = [math.exp(x) for x in row]
    total = sum(probs)
    kept, mass = set(), 0.0
    for t in sorted(range(len(row)), key=lambda t: -row[t]):
        kept.add(t)
        mass += probs[t] / total
        if mass >= p:
            break
    return kept


def ref_kept_min_p(row: list[float], min_p: float) -> set[int]:
    top = max(row)
    return {t for t, x in enumerate(row) if math.exp(x - top) >= min_p}


def kept(x: torch.Tensor) -> list[set[int]]:
    return [{t for t, v in enumerate(r) if v != -math.inf} for r in x.tolist()]


ROWS = torch.stack([BASE, BASE.flip(0) * 0.7, torch.linspace(-3, 3, V), BASE * 2.5])


@pytest.mark.parametrize("k", [[1, 3, 5, 12], [2, 2, 11, 6]])
def test_top_k_mask(k: list[int]) -> None:
    x = ROWS.clone()
    apply_top_k(x, [0, 1, 2, 3], k)
    assert kept(x) == [ref_kept_top_k(r, kk) for r, kk in zip(ROWS.tolist(), k)]


def test_top_k_keeps_ties() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    apply_top_k(x, [0], [2])
    assert kept(x) == [{1, 2, 3}]


@pytest.mark.parametrize("p", [[0.05, 0.5, 0.9, 0.999], [0.3, 0.7, 0.2, 0.6]])
def test_top_p_mask(p: list[float]) -> None:
    x = ROWS.clone()
    apply_top_p(x, [0, 1, 2, 3], p)
    assert kept(x) == [ref_kept_top_p(r, pp) for r, pp in zip(ROWS.tolist(), p)]


@pytest.mark.parametrize("m", [[0.01, 0.1, 0.5, 1.0], [0.2, 0.05, 0.3, 0.001]])
def test_min_p_mask(m: list[float]) -> None:
    x = ROWS.clone()
    apply_min_p(x, [0, 1, 2, 3], m)
    assert kept(x) == [ref_kept_min_p(r, mm) for r, mm in zip(ROWS.tolist(), m)]


def test_masks_touch_only_their_rows() -> None:
    x = ROWS.clone()
    apply_top_k(x, [1], [2])
    apply_top_p(x, [2], [0.3])
    apply_min_p(x, [3], [0.5])
    assert torch.equal(x[0], ROWS[0])
    assert kept(x)[1:] == [ref_kept_top_k(ROWS[1].tolist(), 2), ref_kept_top_p(ROWS[2].tolist(), 0.3),
                           ref_kept_min_p(ROWS[3].tolist(), 0.5)]


# --- sampling distributions ---

def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the tokens with non-zero expected probability."""
    support = expected_probs > 0
    total = counts.sum()
    expected = expected_probs[support] * total
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2).item()


def sample_counts(params: SamplingParams, draws: int = 40000, seed: int = 1) -> torch.Tensor:
    sampler = make_sampler(seed)
    rows = 4000
    counts = torch.zeros(V)
    for _ in range(draws // rows):
        out = sampler(BASE.repeat(rows, 1), batch_of([params] * rows))
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=V)
    return counts


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_distribution(temperature: float) -> None:
    counts = sample_counts(SamplingParams(temperature=temperature))
    assert chi_square_p_value(counts, torch.softmax(BASE / temperature, -1)) > 1e-3
    if temperature != 1.0:  # the test has power: the untempered distribution is rejected
        assert chi_square_p_value(counts, torch.softmax(BASE, -1)) < 1e-6


def test_top_p_distribution() -> None:
    params = SamplingParams(temperature=0.8, top_p=0.7)
    counts = sample_counts(params)
    scaled = BASE / 0.8
    keep = torch.zeros(V, dtype=torch.bool)
    keep[list(ref_kept_top_p(scaled.tolist(), 0.7))] = True
    expected = torch.softmax(scaled.masked_fill(~keep, -math.inf), -1)
    assert counts[~keep].sum() == 0
    assert chi_square_p_value(counts, expected) > 1e-3


def test_top_k_and_min_p_distribution() -> None:
    counts = sample_counts(SamplingParams(top_k=4, min_p=0.3), draws=20000)
    support = ref_kept_top_k(BASE.tolist(), 4) & ref_kept_min_p(BASE.tolist(), 0.3)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[list(support)] = True
    assert counts[~keep].sum() == 0
    assert chi_square_p_value(counts, torch.softmax(BASE.masked_fill(~keep, -math.inf), -1)) > 1e-3


def test_draw_never_picks_zero_probability_tokens() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(5000, 1)
    picks = draw(probs, [None] * 5000, torch.Generator().manual_seed(3))
    assert set(picks.tolist()) == {1, 3}


# --- greedy, mixed batches, seeds ---

def test_greedy_and_random_rows_mixed() -> None:
    greedy = SamplingParams(temperature=0.0)
    random = SamplingParams(temperature=1.0, top_k=2)
    out = make_sampler()(BASE.repeat(6, 1), batch_of([greedy, random] * 3))
    assert out.token_ids[0::2] == [4, 4, 4]
    assert set(out.token_ids[1::2]) <= {4, 11}


def test_greedy_with_repetition_penalty() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert make_sampler()(BASE.clone().unsqueeze(0), batch_of([params], [[4]])).token_ids == [11]


def test_repetition_penalty_prompt_tokens_computed_once_per_request() -> None:
    """Rows built from sequences keep their prompt's distinct tokens on the request: later steps reuse them (same
    result as an uncached batch), and the n sequences of one request share them."""
    params = dict(repetition_penalty=1.3, frequency_penalty=0.2)
    first, other = make_seq([9, 1, 9, 2, 1], "a", **params), make_seq([3, 3], "b", **params)
    sibling = Sequence(request=first.request, token_ids=list(first.token_ids), num_prompt_tokens=5, index=1)
    for step, token in enumerate([4, 0, 4]):
        seqs = [first, other, sibling]
        logits = torch.stack([BASE * (1 + 0.1 * i) for i in range(len(seqs))])
        expected = logits.clone()
        make_sampler().apply_processors(expected, batch_of([s.request.params for s in seqs],
                                                           [s.output_token_ids for s in seqs],
                                                           [s.token_ids[:s.num_prompt_tokens] for s in seqs]))
        make_sampler().apply_processors(logits, SamplingBatch.from_sequences(seqs))
        assert torch.equal(logits, expected)
        assert first.request.distinct_prompt_token_ids.tolist() == [1, 2, 9]
        if step == 0:
            cached = first.request.distinct_prompt_token_ids
        assert first.request.distinct_prompt_token_ids is cached  # not recomputed
        for seq in seqs:
            seq.token_ids.append(token)


def run_seeded(mix: list[tuple[SamplingParams, int | None]], steps: int = 25) -> list[list[int]]:
    """Sample `steps` tokens for each row of mix (params, seed); returns each seeded row's tokens."""
    sampler = make_sampler(seed=len(mix))  # the shared generator differs between mixes too
    generators = [torch.Generator().manual_seed(s) if s is not None else None for _, s in mix]
    logits = torch.stack([BASE * (1 + 0.1 * i) for i in range(len(mix))])
    tokens: list[list[int]] = [[] for _ in mix]
    for _ in range(steps):
        out = sampler(logits.clone(), batch_of([p for p, _ in mix], generators=generators))
        for row, token in enumerate(out.token_ids):
            tokens[row].append(token)
    return [t for t, (_, s) in zip(tokens, mix) if s is not None]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    p = SamplingParams(temperature=1.0)
    q = SamplingParams(temperature=0.9, top_p=0.9)
    # The seeded request is always row 0's logits (BASE) in these mixes, so its tokens must match.
    alone = run_seeded([(p, 42)])
    with_unseeded = run_seeded([(p, 42), (q, None), (p, None), (SamplingParams(temperature=0.0), None)])
    with_seeded = run_seeded([(p, 42), (q, 7), (p, None)])
    assert alone == [with_unseeded[0]] == [with_seeded[0]]
    assert run_seeded([(p, 43)]) != alone  # and the seed matters


def test_seeded_row_position_in_batch_does_not_matter() -> None:
    params = SamplingParams(temperature=1.2, min_p=0.05)
    tokens = []
    for position, size in [(0, 1), (2, 3), (5, 8)]:
        generators: list[torch.Generator | None] = [None] * size
        generators[position] = torch.Generator().manual_seed(5)
        sampler = make_sampler(seed=position)
        logits = torch.randn(size, V, generator=torch.Generator().manual_seed(99 + size))
        logits[position] = BASE
        seq = []
        for _ in range(20):
            out = sampler(logits.clone(), batch_of([params] * size, generators=generators))
            seq.append(out.token_ids[position])
        tokens.append(seq)
    assert tokens[0] == tokens[1] == tokens[2]


def test_unseeded_rows_follow_the_shared_generator() -> None:
    params = [SamplingParams()] * 8
    first = make_sampler(seed=11)(BASE.repeat(8, 1), batch_of(params)).token_ids
    again = make_sampler(seed=11)(BASE.repeat(8, 1), batch_of(params)).token_ids
    assert first == again


# --- logprobs ---

def test_logprobs_come_from_raw_logits_with_ranks() -> None:
    params = SamplingParams(temperature=0.3, logprobs=3, repetition_penalty=1.5, logit_bias={9: 100})
    plain = SamplingParams()
    out = make_sampler()(torch.stack([BASE, BASE]), batch_of([params, plain], [[4], [4]]))
    raw = torch.log_softmax(BASE, -1)
    order = raw.argsort(descending=True).tolist()
    sampled = out.token_ids[0]
    assert sampled == 9  # the bias decided the token ...
    assert out.logprob_token_ids[0] == [9, *order[:3]]  # ... but the logprobs are the raw model's
    assert out.logprob_values[0] == pytest.approx([raw[9].item(), *raw[order[:3]].tolist()], abs=1e-6)
    assert out.logprob_ranks[0] == [order.index(9) + 1, 1, 2, 3]
    assert out.logprob_token_ids[1] == out.logprob_values[1] == out.logprob_ranks[1] == []


def test_logprobs_zero_gives_only_the_sampled_token() -> None:
    out = make_sampler()(BASE.clone().unsqueeze(0), batch_of([SamplingParams(temperature=0.0, logprobs=0)]))
    assert out.logprob_token_ids == [[4]]
    assert out.logprob_ranks == [[1]]
    assert out.logprob_values[0][0] == pytest.approx(torch.log_softmax(BASE, -1)[4].item())


def test_logprobs_rows_with_different_counts() -> None:
    params = [SamplingParams(temperature=0.0, logprobs=n) for n in (1, 5, 2)]
    out = make_sampler()(BASE.repeat(3, 1), batch_of(params))
    assert [len(ids) for ids in out.logprob_token_ids] == [2, 6, 3]
    assert [r[1:] for r in out.logprob_ranks] == [[1], [1, 2, 3, 4, 5], [1, 2]]


def test_prompt_logprobs() -> None:
    logits = torch.stack([BASE, BASE.flip(0)])
    ids, values, ranks = compute_prompt_logprobs(logits, [3, 0], 2)
    lp = torch.log_softmax(logits, -1)
    assert ids[0][0] == 3 and ids[1][0] == 0
    assert values[0][0] == pytest.approx(lp[0, 3].item()) and values[1][0] == pytest.approx(lp[1, 0].item())
    assert ranks[0][0] == int((lp[0] > lp[0, 3]).sum()) + 1
    assert ids[0][1:] == lp[0].topk(2).indices.tolist() and ranks[1][1:] == [1, 2]


def test_half_precision_logits_accepted() -> None:
    out = make_sampler()(BASE.half().unsqueeze(0), batch_of([SamplingParams(temperature=0.0, logprobs=1)]))
    assert out.token_ids == [4]
