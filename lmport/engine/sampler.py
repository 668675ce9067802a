"""Turns a batch of next-token logits into sampled tokens, vectorized over the batch.

Order per row, as in vLLM V1: a structured-output row's grammar bitmask first (lmport.engine.structured_outputs);
logprobs are taken from those logits; then allowed_token_ids, bad_words, min_tokens
(EOS / stop tokens banned), logit_bias, repetition/frequency/presence penalties; greedy rows take the argmax of that;
random rows go on through temperature, min_p, top_k, top_p and draw from the result. Every stage runs only on the
rows that need it, so an all-greedy or all-plain batch costs an argmax or a softmax plus one draw.

A seeded row draws with its own generator, from its own row only: its tokens do not depend on the rest of the
batch. Unseeded rows share the engine's generator.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmport.engine.sampling_params import SamplingParams
from lmport.engine.structured_outputs import TokenBitmask

if TYPE_CHECKING:
    import xgrammar

    from lmport.engine.sequence import Request, Sequence

NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingBatch:
    """Per-row inputs of one sampling step (row i of the logits belongs to entry i of each list)."""
    params: list[SamplingParams]
    token_ids: list[list[int]]  # prompt followed by the output so far
    num_prompt_tokens: list[int]
    generators: list[torch.Generator | None]  # a seeded row's own generator, else None
    bad_words: list[list[list[int]] | None]  # tokenized bad_words (SamplingParams.bad_words_token_ids)
    requests: list[Request | None]  # where a row's per-prompt values are cached across steps (None: not cached)
    matchers: list[xgrammar.GrammarMatcher | None]  # a structured-output row's grammar state, else None

    @classmethod
    def from_sequences(cls, seqs: Seq[Sequence]) -> SamplingBatch:
        return cls(params=[s.request.params for s in seqs], token_ids=[s.token_ids for s in seqs],
                   num_prompt_tokens=[s.num_prompt_tokens for s in seqs], generators=[s.generator for s in seqs],
                   bad_words=[s.request.bad_words_token_ids for s in seqs], requests=[s.request for s in seqs],
                   matchers=[s.matcher for s in seqs])

    @classmethod
    def build(cls, params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
              generators: list[torch.Generator | None] | None = None,
              bad_words: list[list[list[int]] | None] | None = None) -> SamplingBatch:
        """From separate prompt and output token lists (tests, callers without Sequence objects)."""
        return cls(params=params, token_ids=[p + o for p, o in zip(prompts, outputs)],
                   num_prompt_tokens=[len(p) for p in prompts], generators=generators or [None] * len(params),
                   bad_words=bad_words or [None] * len(params), requests=[None] * len(params),
                   matchers=[None] * len(params))

    def output_ids(self, row: int) -> list[int]:
        return self.token_ids[row][self.num_prompt_tokens[row]:]

    def output_tail(self, row: int, length: int) -> list[int]:
        """The last `length` output tokens (fewer if the output is shorter), without copying the whole output."""
        tokens = self.token_ids[row]
        return tokens[max(self.num_prompt_tokens[row], len(tokens) - length):]

    def distinct_prompt_ids(self, row: int, device: torch.device) -> torch.Tensor:
        """The prompt's distinct token ids (sorted, int64, on device). The prompt never changes, so a row with a
        request computes them once and keeps them on the request for the following steps."""
        request = self.requests[row]
        cached = request.distinct_prompt_token_ids if request is not None else None
        if cached is None or cached.device != device:
            prompt = self.token_ids[row][:self.num_prompt_tokens[row]]
            cached = torch.unique(torch.tensor(prompt, dtype=torch.int64, device=device))
            if request is not None:
                request.distinct_prompt_token_ids = cached
        return cached


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row (empty lists for rows that asked for no logprobs): the sampled token first, then the top-`logprobs`
    # tokens; their raw log-probabilities; their 1-based ranks.
    logprob_token_ids: list[list[int]]
    logprob_values: list[list[float]]
    logprob_ranks: list[list[int]]


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: set[int] | Seq[int], generator: torch.Generator) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.generator = generator  # shared by the unseeded rows
        self.bitmask = TokenBitmask(vocab_size)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V] for the B rows of batch; it may be modified in place."""
        params = batch.params
        if all(_plain_greedy(p) for p in params):  # the common case: an argmax in the model's dtype, no upcast copy
            return SamplerOutput(argmax(logits).tolist(), *([[] for _ in params] for _ in range(3)))
        logits = logits.float().contiguous()
        if any(m is not None for m in batch.matchers):  # first, as in vLLM: logprobs see the constrained logits
            self.bitmask.apply(logits, batch.matchers)
        num_rows = len(params)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(_rows(logits, logprob_rows), dim=-1) if logprob_rows else None

        self.apply_processors(logits, batch)
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            sampled = argmax(logits)
        elif any(greedy):
            greedy_ids = argmax(logits)  # before temperature and truncation touch the logits
            sampled = torch.where(torch.tensor(greedy, device=logits.device), greedy_ids,
                                  self._sample_random(logits, params, batch.generators))
        else:
            sampled = self._sample_random(logits, params, batch.generators)

        out = SamplerOutput(sampled.tolist(), *([[] for _ in range(num_rows)] for _ in range(3)))
        if raw_logprobs is not None:
            ids, values, ranks = gather_logprobs(raw_logprobs, sampled[logprob_rows] if len(logprob_rows) < num_rows
                                                 else sampled, [params[i].logprobs for i in logprob_rows])
            for j, i in enumerate(logprob_rows):
                out.logprob_token_ids[i], out.logprob_values[i], out.logprob_ranks[i] = ids[j], values[j], ranks[j]
        return out

    # --- logits processors (each only touches the rows that asked for it) ---

    def apply_processors(self, logits: torch.Tensor, batch: SamplingBatch) -> None:
        """In place, in vLLM V1's order: allowed_token_ids, bad_words, min_tokens, logit_bias, penalties."""
        self._apply_bans(logits, batch)
        params = batch.params
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        if bias_rows:
            apply_logit_bias(logits, bias_rows, params)
        penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if penalty_rows:
            apply_penalties(logits, penalty_rows, batch)

    def _apply_bans(self, logits: torch.Tensor, batch: SamplingBatch) -> None:
        """allowed_token_ids, bad_words and min_tokens: set banned logits to -inf."""
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i, p in enumerate(batch.params):
            if p.allowed_token_ids is not None:
                keep = torch.tensor(p.allowed_token_ids, device=logits.device)
                allowed = logits[i, keep]
                logits[i].fill_(NEG_INF)
                logits[i, keep] = allowed
            words = batch.bad_words[i]
            if words:
                banned = _banned_by_bad_words(words, batch.output_tail(i, max(len(w) for w in words) - 1))
                ban_rows.extend([i] * len(banned))
                ban_cols.extend(banned)
            # A grammar decides where a structured output ends: banning its end would leave no token at all.
            if p.min_tokens and batch.matchers[i] is None and len(batch.token_ids[i]) - batch.num_prompt_tokens[i] < p.min_tokens:
                stops = (p.stop_token_ids or []) + ([] if p.ignore_eos else self.eos_token_ids)
                ban_rows.extend([i] * len(stops))
                ban_cols.extend(stops)
        if ban_rows:
            logits[torch.tensor(ban_rows, device=logits.device), torch.tensor(ban_cols, device=logits.device)] = NEG_INF

    # --- random sampling ---

    def _sample_random(self, logits: torch.Tensor, params: list[SamplingParams],
                       generators: list[torch.Generator | None]) -> torch.Tensor:
        device = logits.device
        temps = [1.0 if p.is_greedy else p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            logits.div_(torch.tensor(temps, device=device).unsqueeze(1))
        min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
        if min_p_rows:
            apply_min_p(logits, min_p_rows, [params[i].min_p for i in min_p_rows])
        top_k_rows = [i for i, p in enumerate(params) if 0 < p.top_k < self.vocab_size]
        if top_k_rows:
            apply_top_k(logits, top_k_rows, [params[i].top_k for i in top_k_rows])
        top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            apply_top_p(logits, top_p_rows, [params[i].top_p for i in top_p_rows])
        return draw(torch.softmax(logits, dim=-1), generators, self.generator)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first index of the maximum, like torch.argmax): max().indices is 2-5x faster on CPU."""
    return logits.max(dim=-1).indices


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing that touches the logits or needs their log-softmax."""
    return (p.is_greedy and p.logprobs is None and not p.logit_bias and p.allowed_token_ids is None
            and not p.bad_words and not p.has_penalties and p.min_tokens == 0 and p.structured_outputs is None)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: a uniform draw per row, located in the row's cumulative sum (one
    random number per row instead of one per vocabulary entry). Seeded rows draw their uniform from their own
    generator, so their token depends only on their own row and seed."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=shared)
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand(1, device=probs.device, generator=gen)
    # The first token whose cumulative mass reaches the target: a zero-probability token shares its cumulative value
    # with the token before it, so it can only be chosen by a zero target, which the clamp rules out.
    target = u.clamp_(min=1e-12) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_(max=probs.shape[1] - 1).squeeze(1)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=x.device)]


def _put_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if values is x:  # processed in place (all rows)
        return
    if len(rows) == x.shape[0]:
        x.copy_(values)
    else:
        x[torch.tensor(rows, device=x.device)] = values


def _banned_by_bad_words(bad_words: list[list[int]], tail: list[int]) -> list[int]:
    """Last token of each bad word whose other tokens end the output (`tail`: its last tokens)."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or (len(prefix) <= len(tail) and tail[-len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


def apply_logit_bias(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
    r, c, v = [], [], []
    for i in rows:
        bias = params[i].logit_bias or {}
        r.extend([i] * len(bias))
        c.extend(bias.keys())
        v.extend(bias.values())
    device = logits.device
    logits.index_put_((torch.tensor(r, device=device), torch.tensor(c, device=device)),
                      torch.tensor(v, device=device), accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[int], batch: SamplingBatch) -> None:
    """vLLM's formulas: repetition over tokens seen in prompt or output (positive logits divided, negative
    multiplied), then frequency x count and presence x seen over the output only.

    Sparse: only the (row, token) entries that occur are touched, so the cost follows the token counts, not
    rows x vocabulary."""
    params = batch.params
    width = logits.shape[1]
    flat = logits.view(-1)
    out_keys, out_counts = _occurrences(logits, rows, [batch.output_ids(i) for i in rows])
    rep_rows = [i for i in rows if params[i].repetition_penalty != 1.0]
    if rep_rows:
        prompt_keys = _prompt_keys(logits, rep_rows, batch)
        keys = torch.unique(torch.cat([prompt_keys, out_keys]))  # a penalty of 1.0 leaves other rows unchanged
        penalty = _per_row(logits, [p.repetition_penalty for p in params])[keys // width]
        seen = flat[keys]
        flat[keys] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if out_keys.numel():
        row_of = out_keys // width
        frequency = _per_row(logits, [p.frequency_penalty for p in params])[row_of]
        presence = _per_row(logits, [p.presence_penalty for p in params])[row_of]
        flat.index_add_(0, out_keys, -(frequency * out_counts + presence))


def _prompt_keys(logits: torch.Tensor, rows: list[int], batch: SamplingBatch) -> torch.Tensor:
    """Flat indices (row * width + token) into logits of the given rows' distinct prompt tokens."""
    device = logits.device
    distinct = [batch.distinct_prompt_ids(i, device) for i in rows]
    counts = [d.numel() for d in distinct]
    row_ids = torch.repeat_interleave(torch.tensor(rows, device=device), torch.tensor(counts, device=device),
                                      output_size=sum(counts))
    return row_ids * logits.shape[1] + torch.cat(distinct)


def _occurrences(logits: torch.Tensor, rows: list[int],
                 token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct flat indices (row * width + token) into logits of the given rows' tokens, with their counts."""
    device = logits.device
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64, device=device)
    if not tokens.numel():
        return tokens, tokens.float()
    row_ids = torch.repeat_interleave(torch.tensor(rows, device=device),
                                      torch.tensor([len(t) for t in token_lists], device=device))
    keys, counts = torch.unique(row_ids * logits.shape[1] + tokens, return_counts=True)
    return keys, counts.float()


def _per_row(logits: torch.Tensor, values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=logits.dtype, device=logits.device)


def apply_min_p(logits: torch.Tensor, rows: list[int], min_p: list[float]) -> None:
    """Drop tokens less likely than min_p x the most likely one; in logit space: logit < max + log(min_p)."""
    sub = _rows(logits, rows)
    floor = sub.amax(dim=-1, keepdim=True) + torch.tensor(min_p, device=logits.device).log().unsqueeze(1)
    _put_rows(logits, rows, sub.masked_fill_(sub < floor, NEG_INF))


def apply_top_k(logits: torch.Tensor, rows: list[int], top_k: list[int]) -> None:
    """Keep every token at least as likely as the k-th most likely one (ties at the boundary survive)."""
    sub = _rows(logits, rows)
    top = sub.topk(max(top_k), dim=-1).values
    kth = top.gather(1, torch.tensor(top_k, device=logits.device).unsqueeze(1) - 1)
    _put_rows(logits, rows, sub.masked_fill_(sub < kth, NEG_INF))


TOP_P_CANDIDATES = 1024  # top-p looks for the nucleus among this many top tokens first (a full sort is ~20x slower)


def apply_top_p(logits: torch.Tensor, rows: list[int], top_p: list[float]) -> None:
    """Keep the most likely tokens up to and including the one whose cumulative probability reaches top_p."""
    sub = _rows(logits, rows)
    probs = torch.softmax(sub, dim=-1)
    p = torch.tensor(top_p, device=logits.device).unsqueeze(1)
    drop, complete = _nucleus_drop(probs, p, min(TOP_P_CANDIDATES, probs.shape[1]))
    if not bool(complete.all()):  # flat rows whose nucleus is wider than the candidates: sort them fully
        redo = complete.logical_not().nonzero().squeeze(1)
        drop[redo] = _nucleus_drop(probs[redo], p[redo], probs.shape[1])[0]
    _put_rows(logits, rows, sub.masked_fill_(drop, NEG_INF))


def _nucleus_drop(probs: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop mask of top-p among each row's k most likely tokens, and whether the nucleus closed within them."""
    top, index = probs.topk(k, dim=-1)
    cumulative = top.cumsum(dim=-1)
    keep = (cumulative - top) < p  # the probability of the strictly more likely tokens is still below p
    drop = torch.ones_like(probs, dtype=torch.bool).scatter_(1, index, keep.logical_not())
    return drop, cumulative[:, -1] >= p[:, 0]


# --- logprobs ---

def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_top: list[int]) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
    """For each row of logprobs [R, V]: the given token then the row's num_top[r] most likely tokens, with their
    log-probabilities and 1-based ranks (the given token's rank: 1 + the number of strictly more likely tokens)."""
    token_ids = token_ids.to(logprobs.device).long().view(-1, 1)
    chosen = logprobs.gather(1, token_ids)
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    k = max(num_top, default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (chosen[:, :0], token_ids[:, :0])
    ids = torch.cat([token_ids, top_ids], dim=1).tolist()
    values = torch.cat([chosen, top_values], dim=1).tolist()
    rank_rows = ranks.tolist()
    out_ids, out_values, out_ranks = [], [], []
    for r, n in enumerate(num_top):
        out_ids.append(ids[r][:n + 1])
        out_values.append(values[r][:n + 1])
        out_ranks.append([rank_rows[r], *range(1, n + 1)])
    return out_ids, out_values, out_ranks


@torch.inference_mode()
def compute_prompt_logprobs(logits: torch.Tensor, target_ids: list[int],
                            num_top: int) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
    """Prompt logprobs from logits [T, V] where row t predicts target_ids[t]: per position the target token then
    the num_top most likely ones (raw distribution, like generated-token logprobs)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return gather_logprobs(logprobs, torch.tensor(target_ids, device=logits.device), [num_top] * len(target_ids))
