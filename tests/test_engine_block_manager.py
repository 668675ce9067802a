from lmport.engine.block_manager import BlockManager
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
