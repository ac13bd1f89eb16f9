"""Checkpoint sets in real (tiny, in-process) training runs: periodic saves by steps and by minutes, exact resume
from a mid-epoch set, incomplete sets skipped and named, a full disk, and the backbone from every format."""
import errno
import os
import shutil
import threading

import pytest
import torch

import train
from tests.release_format import write_release_checkpoints
from tests.test_train import CPU, tiny_cfg
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils.background import BackgroundJob
from utils.model_loading import read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["num_image=32", "num_epoch=2", "dpap_prob=1.0"]  # 4 steps per epoch, 8 in all


def sets(output):
    return sorted(s.step for s in checkpoint_set.scan(output))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run with a save every 3 steps, all sets kept."""
    out = tmp_path_factory.mktemp("whole")
    torch.set_num_threads(1)
    assert train.train(tiny_cfg(out, *STEPS, "save_every_steps=3", "keep_checkpoints=5"), CPU)["global_step"] == 8
    return out


def test_periodic_sets_and_exact_resume_from_mid_epoch(whole, tmp_path):
    assert sets(whole) == [3, 6]
    saved = checkpoint_set.read_newest(whole, 0)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 2, 6)  # mid-epoch 1
    # a run killed after step 7: its set of step 6 is complete, a later one only half written
    part = tmp_path / "part"
    shutil.copytree(whole / "checkpoints", part / "checkpoints")
    shutil.rmtree(part / "checkpoints" / "step_000000003")
    os.makedirs(part / "checkpoints" / "step_000000007")
    (part / "checkpoints" / "step_000000007" / "shared.pt").write_bytes(b"half written")
    assert train.train(tiny_cfg(part, *STEPS, "save_every_steps=3", "resume=True"), CPU)["global_step"] == 8
    log = (part / "training.log").read_text()
    assert (f"skipping {part / 'checkpoints' / 'step_000000007'}: incomplete, no rank finished it (the run stopped "
            "during that save); resuming from the newest set every rank saved") in log
    assert f"resuming from {part / 'checkpoints' / 'step_000000006'}: global step 6, the newest set all 1 rank(s)" in log
    assert f"removed {part / 'checkpoints' / 'step_000000007'}: an incomplete checkpoint set" in log
    a, b = ckpt.load(whole / "model.pt"), ckpt.load(part / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    assert sets(part) == [6]


def test_a_fresh_run_removes_the_abandoned_runs_sets_before_it_saves(whole, tmp_path):
    shutil.copytree(whole / "checkpoints", tmp_path / "checkpoints")
    before = checkpoint_set.read_newest(tmp_path, 0)["state_dict_backbone"]
    assert train.train(tiny_cfg(tmp_path, *STEPS, "save_every_steps=3", "keep_checkpoints=5"), CPU)["global_step"] == 8
    log = (tmp_path / "training.log").read_text()
    for step in (3, 6):
        assert (f"removed {tmp_path / 'checkpoints' / f'step_{step:09d}'}: a set above this run's start at step 0, "
                "left by an abandoned run (this run writes those steps again)") in log
    assert sets(tmp_path) == [3, 6]  # written again by this run: the same steps, the same deterministic weights
    after = checkpoint_set.read_newest(tmp_path, 0)["state_dict_backbone"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_minutes_trigger_saves_at_sync_points_only(tmp_path):
    # due at once; agreed at the logging interval (frequent=3: steps 3 and 6 inside the epochs)
    cfg = tiny_cfg(tmp_path, *STEPS, "frequent=3", "save_every_minutes=1e-9", "keep_checkpoints=9")
    assert train.train(cfg, CPU)["global_step"] == 8
    assert sets(tmp_path) == [3, 6]


def test_keep_checkpoints_and_epoch_end_saves(tmp_path):
    cfg = tiny_cfg(tmp_path, *STEPS, "save_every_steps=2", "save_all_states=True", "keep_checkpoints=2")
    assert train.train(cfg, CPU)["global_step"] == 8
    assert sets(tmp_path) == [6, 8]  # 2, 4 (also an epoch end: saved once), 6, 8; the newest 2 kept
    saved = checkpoint_set.read_newest(tmp_path, 0)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 4)  # the periodic save; the epoch end's is not repeated


def test_full_disk_names_the_file_and_keeps_the_previous_set(tmp_path, monkeypatch):
    """The write of the second set fails on the writer thread with ENOSPC: train() raises it as one line naming the
    file and the free space, and the first set stays the newest complete one."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(threading.current_thread().name)  # the training thread writes model.pt only
        if calls.count("checkpoint-writer") == 3:  # shared.pt of the second set
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ckpt.DiskFullError) as error:
        train.train(tiny_cfg(tmp_path, *STEPS, "save_every_steps=3"), CPU)
    path = tmp_path / "checkpoints" / "step_000000006" / "shared.pt"
    message = str(error.value)
    assert message.startswith(f"cannot write checkpoint {path}: no space left on the device (")
    assert f" free in {path.parent}); the previous checkpoint is kept" in message and "\n" not in message
    # the sets on the writer thread (its failure raised on the training thread), model.pt of epoch 0 on this one
    assert sorted(calls) == ["MainThread"] + ["checkpoint-writer"] * 3
    assert os.listdir(path.parent) == []  # no temp file, no marker
    assert sets(tmp_path) == [3, 6] and checkpoint_set.read_newest(tmp_path, 0)["global_step"] == 3


def test_background_job_runs_one_at_a_time_and_hands_errors_over():
    job, order, gate = BackgroundJob(), [], threading.Event()

    def first():
        gate.wait()
        order.append("first")

    job.run(first)
    assert job.busy()
    gate.set()
    job.run(lambda: order.append("second"))  # waits for the first
    job.wait()
    assert order == ["first", "second"] and not job.busy()
    job.run(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        job.wait()
    job.wait()  # raised once
    inline = BackgroundJob(background=False)
    inline.run(lambda: order.append("inline"))
    assert order[-1] == "inline" and inline.thread is None


def test_backbone_from_every_checkpoint_format(whole, tmp_path):
    model = ckpt.load(whole / "model.pt")
    newest = checkpoint_set.set_dir(whole, 6)
    for path in (whole, newest, os.path.join(newest, "shared.pt")):
        state = checkpoint_set.backbone_state_dict(path)
        assert state.keys() == model.keys()
    shared = read_state_dict(os.path.join(newest, "shared.pt"))  # what the evaluation tools load
    assert all(torch.equal(shared[k], v) for k, v in checkpoint_set.backbone_state_dict(whole).items())
    assert all(torch.equal(checkpoint_set.backbone_state_dict(whole)[k], v)
               for k, v in checkpoint_set.read_newest(whole, 0)["state_dict_backbone"].items())
    # the single-file checkpoint_gpu_<rank>.pt of earlier versions, and the release's
    ckpt.atomic_save(checkpoint_set.read_newest(whole, 0), tmp_path / "checkpoint_gpu_0.pt")
    state = checkpoint_set.backbone_state_dict(tmp_path / "checkpoint_gpu_0.pt")
    assert all(torch.equal(state[k], v) for k, v in checkpoint_set.backbone_state_dict(newest).items())
    release = tmp_path / "release"
    (saved,) = write_release_checkpoints(tiny_cfg(release), 1, epoch=1, global_step=4)
    state = checkpoint_set.backbone_state_dict(release / "checkpoint_gpu_0.pt")
    assert all(torch.equal(state[k], v) for k, v in saved["state_dict_backbone"].items())
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint set"):
        checkpoint_set.backbone_state_dict(tmp_path / "release")


def test_bench_byte_count_matches_the_files(whole):
    """bench/checkpoint.py's exact tensor bytes of a set against the files a real save wrote (a world of one): the
    files add only the zip and pickle framing."""
    from bench.checkpoint import set_bytes

    cfg = tiny_cfg(whole, *STEPS)
    counted = set_bytes(cfg, world_size=1)
    head_bytes = cfg.num_classes * cfg.embedding_size * 4 * 3 + 4  # weights, two moments, step
    assert counted["rank0"] == head_bytes and counted["total"] == counted["shared"] + head_bytes
    assert counted["single_file_total"] == counted["total"]  # one rank: nothing was written twice
    folder = checkpoint_set.set_dir(whole, 6)
    shared, own = (os.path.getsize(os.path.join(folder, n)) for n in ("shared.pt", "rank_0.pt"))
    assert counted["shared"] < shared < counted["shared"] + 200_000
    assert counted["rank0"] < own < counted["rank0"] + 40_000  # RNG states: ~10 KB
    eight = set_bytes(cfg, world_size=8)
    assert eight["single_file_total"] - eight["total"] == 7 * eight["shared"]
