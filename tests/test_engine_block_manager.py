from lmport.engine.block_manager import FREED_BLOCK, BlockManager
from tests.engine_helpers import compute, make_seq

BS = 4


def prefilled(bm: BlockManager, tokens: list[int], request_id: str = "a"):
    seq = make_seq(tokens, request_id)
    bm.match_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens)
    compute(seq, seq.num_uncomputed_tokens)
    bm.cache_full_blocks(seq)
    return seq


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_allocation_fails_without_side_effects_when_full():
    bm = BlockManager(2, BS)
    seq = make_seq(list(range(12)))
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(16, BS)
    first = prefilled(bm, list(range(10)))
    second = make_seq(list(range(8)) + [99, 98], "b")
    assert bm.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    exact = make_seq(list(range(8)), "c")  # the whole prompt is cached, but its last token must be recomputed
    assert bm.match_prefix(exact) == 4
    assert bm.prefix_cache_hits == 12 and bm.prefix_cache_queries == 28


def test_prefix_hit_needs_the_whole_chain_to_match():
    bm = BlockManager(16, BS)
    prefilled(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Same second block, different first block: the chained hash differs, so nothing is reused.
    other = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")
    assert bm.match_prefix(other) == 0


def test_freed_cached_blocks_are_still_hit_until_evicted():
    bm = BlockManager(4, BS)
    first = prefilled(bm, list(range(9)))
    bm.free(first)
    again = make_seq(list(range(9)), "b")
    assert bm.match_prefix(again) == 8
    bm.free(again)
    filler = make_seq([50 + i for i in range(16)], "c")  # takes every block, evicting the cached ones
    assert bm.allocate_slots(filler, 16)
    bm.free(filler)
    assert bm.match_prefix(make_seq(list(range(9)), "d")) == 0


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(8, BS)
    parent = prefilled(bm, list(range(6)))  # block 0 full, block 1 holds 2 of 4
    child = make_seq(list(range(6)), "r")
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    parent.token_ids.append(7)
    assert bm.allocate_slots(parent, 1)  # writes into the shared partial block -> copy on write
    copies = bm.take_pending_copies()
    assert copies == [(child.block_table[1], parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0] and parent.block_table[1] != child.block_table[1]
    assert bm.blocks[child.block_table[1]].ref_count == 1
    child.token_ids.append(8)
    assert bm.allocate_slots(child, 1) and bm.take_pending_copies() == []  # now private: no copy
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def held_blocks(seq) -> list[int]:
    return [b for b in seq.block_table if b != FREED_BLOCK]


def decode(bm: BlockManager, seq, steps: int) -> None:
    for _ in range(steps):
        seq.token_ids.append(len(seq.token_ids))
        assert bm.allocate_slots(seq, 1)
        compute(seq, 1)
        bm.cache_full_blocks(seq)


def test_sliding_window_frees_the_blocks_behind_it_and_keeps_positions():
    window = 6  # unaligned to the block size: a query's 6 keys span at most 3 blocks
    bm = BlockManager(16, BS, sliding_window=window)
    seq = prefilled(bm, list(range(10)))
    assigned = list(seq.block_table)  # position -> block id, as first allocated
    most_held = 0
    for _ in range(30):  # 40 tokens: 10 blocks of positions, never more than 3 held
        decode(bm, seq, 1)
        assigned += seq.block_table[len(assigned):]
        first_needed = (seq.num_computed_tokens - 1 - window + 1) // BS  # this step's query's first key's block
        assert seq.block_table == [FREED_BLOCK] * first_needed + assigned[first_needed:]
        most_held = max(most_held, len(held_blocks(seq)))
        assert bm.num_free_blocks == 16 - len(held_blocks(seq))
    assert len(seq.block_table) == 10 and most_held == 3
    bm.free(seq)
    assert bm.num_free_blocks == 16


def test_blocks_freed_by_the_window_stay_cached_and_shared_ones_stay_held():
    bm = BlockManager(32, BS, sliding_window=4)
    prompt = list(range(12))
    first = prefilled(bm, prompt)
    prompt_blocks = list(first.block_table)
    sharer = make_seq(prompt + [99], "b")
    assert bm.match_prefix(sharer) == 12  # attaches first's three blocks; its allocation lets go of two again
    assert bm.allocate_slots(sharer, 1)
    assert sharer.block_table[:3] == [FREED_BLOCK] * 2 + prompt_blocks[2:]
    assert [bm.blocks[b].ref_count for b in prompt_blocks] == [1, 1, 2]
    decode(bm, first, 8)  # first leaves its whole prompt behind
    assert first.block_table[:3] == [FREED_BLOCK] * 3
    assert [bm.blocks[b].ref_count for b in prompt_blocks] == [0, 0, 1]  # block 2: still in sharer's window
    assert bm.num_free_blocks == 32 - len(held_blocks(first)) - len(held_blocks(sharer))
    # freed blocks keep their hash and contents until reused: a later request still hits the whole prompt
    again = make_seq(prompt + [7], "c")
    assert bm.match_prefix(again) == 12
    for seq in (first, sharer, again):
        bm.free(seq)
    assert bm.num_free_blocks == 32


def test_window_fork_and_preempted_recompute_return_every_block():
    bm = BlockManager(16, BS, sliding_window=5)
    parent = prefilled(bm, list(range(14)))  # allocating 14 at once, then the window frees blocks 0-1 next step
    decode(bm, parent, 1)
    assert parent.block_table[:2] == [FREED_BLOCK] * 2
    child = make_seq(list(parent.token_ids), "r")
    bm.fork(parent, child)  # skips the freed entries
    decode(bm, child, 5)
    decode(bm, parent, 5)
    bm.free(parent)  # preempted: the recompute starts over from the prefix cache
    assert parent.block_table == [] and parent.num_computed_tokens == 0
    hits = bm.match_prefix(parent)
    assert hits == 16 and bm.allocate_slots(parent, parent.num_uncomputed_tokens)
    assert parent.block_table[:3] == [FREED_BLOCK] * 3  # cached blocks behind the window are not held again
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 16
