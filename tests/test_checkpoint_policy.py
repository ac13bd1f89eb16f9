"""utils/checkpoint_policy.py: when to save, which set to resume, which sets to delete (pure functions)."""
from utils.checkpoint_policy import (SetInfo, is_complete, minutes_due, missing_ranks, newest_complete, sets_to_delete,
                                     stale_at_start, steps_due, world_size)


def full(step, world=2):
    return SetInfo(step, {rank: world for rank in range(world)})


def test_steps_and_minutes_triggers():
    assert [s for s in range(1, 13) if steps_due(s, 4)] == [4, 8, 12]
    assert not any(steps_due(s, 0) for s in range(1, 13))  # 0: off
    assert minutes_due(600, 10) and minutes_due(601, 10) and not minutes_due(599.9, 10)
    assert minutes_due(30, 0.5) and not minutes_due(10 ** 9, 0)


def test_completeness_from_markers():
    assert is_complete(full(5)) and world_size(full(5, 3)) == 3
    half = SetInfo(7, {0: 2})
    assert not is_complete(half) and missing_ranks(half) == [1]
    assert not is_complete(SetInfo(7, {}))  # no marker at all
    assert not is_complete(SetInfo(7, {0: 2, 1: 3}))  # markers of two different runs
    assert world_size(SetInfo(7, {0: 2, 1: 3})) is None
    assert not is_complete(SetInfo(7, {1: 2, 2: 2}))  # rank 0 missing, a stray rank 2


def test_newest_complete_skips_newer_incomplete_sets():
    sets = [full(10), SetInfo(30, {1: 2}), full(20), SetInfo(25, {0: 2}), SetInfo(5, {0: 2})]
    chosen, skipped = newest_complete(sets)
    assert chosen.step == 20
    assert [s.step for s in skipped] == [30, 25]  # newest first; the incomplete 5 is older: not reported
    assert newest_complete([SetInfo(3, {0: 2})]) == (None, [SetInfo(3, {0: 2})])
    assert newest_complete([]) == (None, [])


def test_sets_to_delete_keeps_newest_complete_and_the_set_being_written():
    sets = [full(10), full(20), SetInfo(25, {0: 2}), full(30), SetInfo(40, {0: 2})]
    # rank 0 just wrote its part of 40; rank 1 may still be writing it: 40 stays, and the `keep` newest complete
    assert [s.step for s in sets_to_delete(sets, 1, 40)] == [10, 20, 25]
    assert [s.step for s in sets_to_delete(sets, 2, 40)] == [10, 25]  # keep counts complete sets only
    assert [s.step for s in sets_to_delete(sets, 3, 40)] == [25]  # 25: left by a killed run
    # the incomplete set just above the newest complete one may still be written by a slower rank
    assert sets_to_delete([full(10), SetInfo(20, {0: 2}), SetInfo(30, {0: 2})], 1, 30) == []
    # sets above the one just saved stay: the other ranks may already be writing a later save
    assert sets_to_delete([full(20), full(30), full(40), full(22)], 2, 22) == []
    assert [s.step for s in sets_to_delete([full(10), full(20), SetInfo(50, {1: 2})], 1, 20)] == [10]
    assert sets_to_delete([full(10)], 0, 10) == []  # at least one complete set is always kept


def test_stale_at_start_drops_incomplete_and_abandoned_sets():
    sets = [full(20), full(30), full(40), SetInfo(25, {0: 2}), SetInfo(5, {1: 2}), full(10)]
    # a run that resumed from step 20 drops the abandoned run's later sets and every incomplete one
    assert [s.step for s in stale_at_start(sets, 20)] == [5, 25, 30, 40]
    assert [s.step for s in stale_at_start(sets, 0)] == [5, 10, 20, 25, 30, 40]  # started afresh
    assert stale_at_start([full(10), full(20)], 20) == []
