from lmport.engine.block_manager import BlockManager
from lmport.engine.scheduler import Scheduler
from lmport.engine.sequence import SequenceStatus
from tests.engine_helpers import make_seq


def step_done(batch) -> None:
    """Pretend the model ran the batch and sampled one token for every sequence that finished its prompt."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=32, chunked=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(bm, max_num_seqs, max_tokens, chunked), bm


def test_decodes_go_first_and_the_token_budget_is_respected():
    sched, _ = make_scheduler(max_tokens=16)
    a = make_seq(list(range(10)), "a")
    sched.add(a)
    step_done(sched.schedule())
    b = make_seq(list(range(40)), "b")
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 15] and batch.num_decodes == 1


def test_chunked_prefill_splits_a_long_prompt():
    sched, _ = make_scheduler(max_tokens=8)
    seq = make_seq(list(range(20)), "a")
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        step_done(batch)
    assert chunks == [8, 8, 4]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched, _ = make_scheduler(max_tokens=16, chunked=False)
    sched.add(make_seq(list(range(10)), "a"))
    sched.add(make_seq(list(range(10)), "b"))
    batch = sched.schedule()
    assert [s.request.request_id for s in batch.seqs] == ["a"]


def test_max_num_seqs_limits_the_running_batch():
    sched, _ = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq([1, 2], f"r{i}"))
    assert len(sched.schedule().seqs) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_newest_sequence_and_requeues_it_first():
    sched, bm = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq(list(range(8)), "a"), make_seq(list(range(8)), "b")
    sched.add(a)
    sched.add(b)
    step_done(sched.schedule())  # each fills 2 blocks; its sampled 9th token needs a third
    batch = sched.schedule()
    assert batch.seqs == [a] and sched.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and sched.waiting[0] is b
    assert b.num_computed_tokens == 0  # recomputed from scratch, outputs included
    step_done(batch)
    sched.finish(a)
    assert bm.num_free_blocks == 4
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [9]


def test_finish_returns_blocks_from_any_state():
    sched, bm = make_scheduler()
    running, waiting = make_seq(list(range(9)), "a"), make_seq([1, 2, 3], "b")
    sched.add(running)
    sched.schedule()
    sched.add(waiting)
    sched.finish(running)
    sched.finish(waiting)
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_work()
