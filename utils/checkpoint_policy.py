"""When to save a resumable checkpoint, which saved sets to keep and which one to resume (docs/training.md,
"Checkpoints"). Pure functions of numbers and set descriptions; utils/checkpoint_set.py does the file work.

A set is the checkpoint of one global step, written by every rank of a run; it is complete when every rank of that
run (0 .. world_size - 1) has left its completion marker, which each rank writes after its own files are on disk.
"""
from collections import namedtuple

# step: global step of the save; markers: {rank: world size that rank recorded} for each marker found
SetInfo = namedtuple("SetInfo", "step markers")


def steps_due(global_step, every_steps):
    """A save every `every_steps` optimiser steps (0: off). Every rank computes the same answer."""
    return every_steps > 0 and global_step % every_steps == 0


def minutes_due(seconds_since_save, every_minutes):
    """This rank's clock says a save is due (0: off). Clocks differ between ranks, so train.py agrees on the flag at
    its sync point (MAX over ranks) and every rank saves at that step."""
    return every_minutes > 0 and seconds_since_save >= every_minutes * 60


def world_size(info):
    """The world size of the run that wrote the set, or None when its markers disagree (or there are none)."""
    sizes = set(info.markers.values())
    return sizes.pop() if len(sizes) == 1 else None


def is_complete(info):
    size = world_size(info)
    return size is not None and set(info.markers) == set(range(size))


def missing_ranks(info):
    """Ranks whose marker is absent (all of 0 .. world size - 1 as far as the markers tell)."""
    size = max([w for w in info.markers.values()] + [0])
    return [rank for rank in range(size) if rank not in info.markers]


def newest_complete(sets):
    """-> (the complete set of the highest step or None, the incomplete sets newer than it, newest first)."""
    chosen = max((s for s in sets if is_complete(s)), key=lambda s: s.step, default=None)
    floor = chosen.step if chosen is not None else -1
    skipped = sorted((s for s in sets if s.step > floor and not is_complete(s)), key=lambda s: -s.step)
    return chosen, skipped


def sets_to_delete(sets, keep, just_saved):
    """After this run wrote the set of step `just_saved` (its own part; other ranks may still be writing theirs):
    the sets to remove, oldest first. Kept: the `keep` newest complete sets up to `just_saved`, any set newer than
    the newest complete one up to `just_saved` (still being written), and every set above `just_saved`: the other
    ranks may already be writing a later save while rank 0's writer is still on this one. Removed: older complete
    sets and incomplete sets older than a complete one (left by a killed run: no rank writes them any more, each
    rank finishes one save before it starts the next)."""
    own = [s for s in sets if s.step <= just_saved]
    complete = sorted((s.step for s in own if is_complete(s)), reverse=True)
    kept = set(complete[:max(keep, 1)])
    newest = complete[0] if complete else -1
    return sorted((s for s in own if s.step not in kept and (is_complete(s) or s.step < newest)), key=lambda s: s.step)


def stale_at_start(sets, start_step):
    """The sets a run starting at `start_step` removes before it writes anything, oldest first: incomplete sets (their
    run was stopped while writing them) and every set above `start_step` (an abandoned run's future: this run resumed
    from an earlier step or started afresh, so it will write those steps again)."""
    return sorted((s for s in sets if not is_complete(s) or s.step > start_step), key=lambda s: s.step)
