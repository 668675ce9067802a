"""Fixed-size KV-cache blocks with reference counting and prefix caching.

A full, computed block is registered under a hash chained over every block before it, so two prompts share a
cached block only when their whole prefix up to and including that block is equal (tokens are compared too, so a
hash collision can never serve the wrong K/V). Freed blocks keep their contents and hash until they are reused,
least recently freed first, so a later request with the same prefix can still hit them.

With a sliding window shared by every attention layer, a sequence's blocks that lie wholly before its next query's
window are never read again: they are freed as it advances (their table entries become FREED_BLOCK, so positions
keep their slots) and stay in the prefix cache until reused, so a long sequence holds about window / block_size + 1.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmport.engine.sequence import Sequence

FREED_BLOCK = -1  # block-table entry of a block freed because it fell out of the sliding window (never read)


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix cache
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # every layer's window, or None (global or mixed layers: keep all)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # chained hash -> block id
        self._pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the model runner
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens served from the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks of seq's longest cached prefix; returns how many tokens they hold.

        At least one token is always left to compute, since the last position's logits are needed.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        size = self.block_size
        usable = (seq.num_tokens - 1) // size
        self.prefix_cache_queries += seq.num_tokens
        parent: int | None = seq.prefix_cache_salt
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * size:(i + 1) * size])
            chained = hash((parent, tokens))
            block_id = self._cached.get(chained)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(chained)
            parent = chained
        hit_tokens = len(seq.block_table) * size
        self.prefix_cache_hits += hit_tokens
        seq.num_computed_tokens = hit_tokens
        return hit_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for num_new_tokens more K/V entries of seq; False if the cache is full (then the only change is
        that blocks no longer in seq's window have been freed)."""
        self._free_outside_window(seq)
        table = seq.block_table
        start = seq.num_computed_tokens
        num_new_blocks = self.blocks_needed(start + num_new_tokens) - len(table)
        write_block = start // self.block_size
        copy_on_write = write_block < len(table) and self.blocks[table[write_block]].ref_count > 1
        if num_new_blocks + copy_on_write > self.num_free_blocks:
            return False
        if copy_on_write:  # a fork shares this partial block: give seq its own copy before it writes
            shared = self.blocks[table[write_block]]
            shared.ref_count -= 1
            private = self._take_free_block()
            self._pending_copies.append((shared.block_id, private.block_id))
            table[write_block] = private.block_id
        for _ in range(num_new_blocks):
            table.append(self._take_free_block().block_id)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's newly completed (full and computed) blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else seq.prefix_cache_salt
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            tokens = tuple(seq.token_ids[i * size:(i + 1) * size])
            chained = hash((parent, tokens))
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and chained not in self._cached:
                block.hash, block.token_ids = chained, tokens
                self._cached[chained] = block.block_id
            seq.block_hashes.append(chained)
            parent = chained

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (copy-on-write happens on its first write to a shared block)."""
        for block_id in parent.block_table:
            if block_id != FREED_BLOCK:
                self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        # Tail blocks go to the free list first, so they are evicted before the (more shareable) head blocks.
        for block_id in reversed(seq.block_table):
            if block_id != FREED_BLOCK:
                self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _free_outside_window(self, seq: Sequence) -> None:
        """Free seq's blocks wholly before its next query's window: that query, at position num_computed_tokens,
        sees keys from num_computed_tokens - sliding_window + 1 on (and so do all later ones)."""
        if self.sliding_window is None:
            return
        table = seq.block_table
        first_needed = max(0, seq.num_computed_tokens - self.sliding_window + 1) // self.block_size
        # backwards from the newest dead block to the previously freed ones: tail blocks first, as in free()
        for i in range(min(first_needed, len(table)) - 1, -1, -1):
            if table[i] == FREED_BLOCK:
                break
            self._release(table[i])
            table[i] = FREED_BLOCK

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def _take_free_block(self) -> Block:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its prefix-cache entry: its contents are about to be overwritten
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block
