"""scheduler.py's host-side decisions (no device): shape buckets, prefill grouping, slot admission
lowest first, decode shapes over the occupied prefix, and dropping a request's waiting choices."""

from pgpt_jax.scheduler import Scheduler, buckets


def test_shape_sets():
    assert buckets(128, 16) == (16, 32, 64, 128) and buckets(100, 16) == (16, 32, 64, 100)
    s = Scheduler(32, 1024, max_prefill_tokens=1024)
    assert s.buckets[:3] == (16, 32, 64) and s.windows == (128, 256, 512, 1024)
    assert s.row_buckets == (1, 4, 8, 16, 32) and Scheduler(300, 1024).row_buckets == (1, 4, 8, 16, 64, 256, 300)
    assert s.prefill_rows[16] == (1, 4, 16) and s.prefill_rows[64] == (1, 4, 16) and s.prefill_rows[512] == (1,)
    assert Scheduler(8, 128, split_slots=True).row_buckets == (8,)  # a data axis: every slot runs


def test_prefill_calls_group_one_bucket_and_cap_rows():
    s = Scheduler(8, 128, max_prefill_tokens=1024)  # bucket 16: rows of 1 or 4 (16 > 8 slots)
    items = [("a", 3), ("b", 20), ("c", 5), ("d", 16), ("e", 1), ("f", 2), ("g", 30)]
    calls = s.prefill_calls(items, length=lambda it: it[1])
    assert [(b, r, [i[0] for i in chunk]) for b, r, chunk in calls] == [
        (16, 4, ["a", "c", "d", "e"]), (16, 1, ["f"]), (32, 4, ["b", "g"])]
    alone = s.prefill_calls(items[:2], length=lambda it: it[1], alone=True)
    assert [(b, r, len(chunk)) for b, r, chunk in alone] == [(16, 1, 1), (32, 1, 1)]


def test_admission_takes_free_slots_lowest_first_and_skips_ended_requests():
    s = Scheduler(4, 128)
    s.place(1, "busy", 10)
    s.waiting.extend([("r1", 0), ("gone", 0), ("r1", 1), ("r2", 0), ("r2", 1)])
    got = list(s.admissions(done=lambda entry: entry == "gone"))
    assert got == [("r1", 0, 0), ("r1", 1, 2), ("r2", 0, 3)]
    assert list(s.waiting) == [("r2", 1)]  # no slot left for it
    s.drop("r2")
    assert not s.waiting


def test_decode_shape_covers_the_occupied_prefix_and_the_longest_row():
    """(window, rows, span): span is what the furthest occupied row reads, its position + steps + 1."""
    s = Scheduler(32, 1024)
    s.place(0, "a", 100)
    assert s.decode_shape(steps=4) == (128, 1, 105)
    s.place(5, "b", 300)
    assert s.decode_shape(steps=4) == (512, 8, 305)
    s.release(5, owner="someone else")  # not its owner: nothing happens
    assert s.active == 2
    s.release(5)
    assert s.decode_shape(steps=30) == (256, 1, 131)  # 100 + 30 + 1 > 128
    assert s.advance(4) == {0: "a"} and s.position[0] == 104


def test_rows_read_by_position_take_one_window_and_verify_keeps_the_buckets():
    """Row buckets whose decode reads only what its positions need (the kernel, the blocked
    path) get the context as window (their span bounds the read), so warm-up compiles one
    decode shape for each of them."""
    s = Scheduler(32, 1024, reads_by_position=lambda rows: rows >= 8)
    assert s.context_window_rows == {8, 16, 32}
    s.place(5, "b", 300)
    assert s.decode_shape(steps=4) == (1024, 8, 305)
    assert s.decode_shape(steps=4, verify=True) == (512, 8, 305)
    s.release(5)
    s.place(0, "a", 100)
    assert s.decode_shape(steps=4) == (128, 1, 105)  # one row: einsum over the window bucket
    assert s.decode_shapes() == [(1, 128), (1, 256), (1, 512), (1, 1024), (4, 128), (4, 256), (4, 512), (4, 1024),
                                 (8, 1024), (16, 1024), (32, 1024)]
    assert s.decode_shapes(need=200) == [(1, 128), (1, 256), (4, 128), (4, 256), (8, 1024), (16, 1024), (32, 1024)]
    assert len(Scheduler(32, 1024).decode_shapes()) == 20  # no such rows: every window for every bucket


def test_every_decode_shape_is_one_warm_up_compiles():
    """Whatever the occupied slots and positions, a Decode's (rows, window) is among
    `decode_shapes()` and a Verify's among every (row bucket, window)."""
    for by_position in (lambda rows: False, lambda rows: rows >= 8):
        s = Scheduler(32, 1024, reads_by_position=by_position)
        shapes = set(s.decode_shapes())
        for last in (0, 3, 4, 7, 8, 15, 16, 31):
            for position in range(0, 1024, 37):
                s.clear()
                s.place(last, "a", position)
                for steps in (1, 4):
                    window, rows, span = s.decode_shape(steps)
                    assert (rows, window) in shapes and span <= window
                    window, rows, span = s.decode_shape(steps, verify=True)
                    assert window in s.windows and rows in s.row_buckets and span <= window


def test_batch_work_holds_only_the_rows_interactive_decodes_pay_for():
    s = Scheduler(32, 1024, batch_slack=1.25)
    assert s.interactive_need() == 0 and s.background_limit(0) == 32
    assert s.background_limit(1) == 1  # no costs measured: the interactive bucket only
    s.decode_cost = {1: 1.0, 4: 1.1, 8: 1.3, 16: 1.6, 32: 3.0}
    s.place(0, "chat", 10)
    assert s.interactive_need() == 1 and s.background_limit(1) == 4  # 4 rows cost 1.1x one: within the slack
    for slot in range(1, 5):
        s.place(slot, f"chat{slot}", 10)
    assert s.background_limit(s.interactive_need()) == 16  # 5 rows need 8; 16 costs 1.23x that, 32 2.3x
    s.place(20, "late", 10)
    assert s.interactive_need() == 21 and s.background_limit(21) == 32  # a row up there: 32 rows anyway
    # Batch choices are admitted only below the limit; interactive ones anywhere.
    t = Scheduler(8, 128)
    t.place(0, "chat", 5)
    t.background.extend([("b", 0), ("b", 1)])
    assert list(t.admissions(limit=1)) == []
    t.waiting.append(("i", 0))
    assert t.shortfall(limit=1) == 1 and list(t.admissions(limit=4, reserve=1)) == [("i", 0, 1), ("b", 0, 2)]
    assert list(t.background) == [("b", 1)]  # slot 3 stays free for the next interactive arrival
    assert list(t.admissions(limit=8, most=0)) == []  # no batch admissions this plan


def test_prefill_calls_pad_little():
    """A call is padded by at most a quarter of its rows (or 2): a wave of 8 short prompts on
    a 32-slot engine goes in two calls of 4 rows, not one of 16 (half of it padding)."""
    s = Scheduler(32, 1024, max_prefill_tokens=1024)
    assert [s.call_sizes(n, 32) for n in (1, 2, 3, 4, 5, 8, 10, 12, 16, 18)] == [
        [1], [2], [3], [4], [4, 1], [4, 4], [4, 4, 2], [12], [16], [16, 2]]
    items = [(str(i), 20) for i in range(8)]
    assert [(b, r, len(chunk)) for b, r, chunk in s.prefill_calls(items, length=lambda it: it[1])] == [
        (32, 4, 4), (32, 4, 4)]
    assert s.call_sizes(3, 1024) == [1, 1, 1]  # bucket 1024: one prompt a call (rows x tokens <= 1024)
