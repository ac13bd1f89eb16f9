"""utils/resume.py on its own: the checkpoint keys save_state writes (as a set), load_states restoring them, and
load_resume's choice of file. (Re-partitioning and the cross-rank agreement are exercised in test_train.py.)"""
import logging
import os

import pytest
import torch

from lr_scheduler import PolyScheduler
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils.distributed import DistEnv
from utils.resume import load_resume, load_states, resume_training, save_state
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"epoch", "step_in_epoch", "global_step", "world_size", "rank", "network", "state_dict_backbone",
        "state_dict_softmax_fc", "state_optimizer", "state_lr_scheduler", "state_scaler", "rng"}


def cfg_for(output):
    return get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), [f"output={output}"])


def parts(seed):
    torch.manual_seed(seed)
    backbone, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 5, bias=False)
    optimizer = torch.optim.AdamW([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=0.1)
    scheduler = PolyScheduler(optimizer, 0.1, 10, 2)
    head(backbone(torch.randn(2, 3))).sum().backward()
    optimizer.step()
    scheduler.step()
    return backbone, head, optimizer, scheduler


def test_save_state_keys_and_round_trip(tmp_path):
    """Rank 0 writes the shared part, every rank its own; put together they are the per-rank dict of earlier
    versions (the keys of checkpoint_gpu_<rank>.pt)."""
    cfg = cfg_for(tmp_path)
    backbone, head, optimizer, scheduler = parts(0)
    for rank in range(3):
        save_state(cfg, DistEnv(rank=rank, local_rank=rank, world_size=3, device=torch.device("cpu")), backbone, head,
                   optimizer, scheduler, None, 2, 5, 17)
    folder = tmp_path / "checkpoints" / "step_000000017"
    assert sorted(os.listdir(folder)) == ["rank_0.done", "rank_0.pt", "rank_1.done", "rank_1.pt", "rank_2.done",
                                          "rank_2.pt", "shared.pt"]
    saved = checkpoint_set.read_rank_state(folder, 1)
    assert set(saved) == KEYS
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["world_size"], saved["rank"],
            saved["network"], saved["state_scaler"]) == (2, 5, 17, 3, 1, "vit_t", {})
    assert set(saved["rng"]) == {"torch", "cuda", "numpy", "python"}
    # only the head's optimiser state is per rank; the backbone's is in shared.pt once
    assert set(ckpt.load(folder / "rank_1.pt")["state_optimizer_head"]) == {2}
    assert set(ckpt.load(folder / "shared.pt")["state_optimizer"]["state"]) == {0, 1}

    fresh = parts(1)
    load_states(saved, *fresh, None)
    for a, b in zip(list(backbone.parameters()) + list(head.parameters()),
                    list(fresh[0].parameters()) + list(fresh[1].parameters())):
        assert torch.equal(a, b)
    assert fresh[3].last_epoch == 1 and fresh[3].get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(fresh[2].state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_load_resume_without_checkpoint(tmp_path, caplog):
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        assert load_resume(cfg_for(tmp_path), env, logging.getLogger("resume-test")) is None
    assert (f"resume=True but {tmp_path / 'checkpoint_gpu_0.pt'} does not exist and {tmp_path} holds no complete "
            "checkpoint set; starting from scratch") in caplog.text


def test_load_resume_reads_own_file(tmp_path):
    for rank, step in ((0, 8), (1, 9)):
        ckpt.atomic_save({"world_size": 2, "global_step": step}, ckpt.checkpoint_path(tmp_path, rank))
    env = DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    assert load_resume(cfg_for(tmp_path), env, logging.getLogger("resume-test"))["global_step"] == 9


def test_load_resume_names_a_broken_file(tmp_path):
    (tmp_path / "checkpoint_gpu_0.pt").write_bytes(b"not a checkpoint")
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match=rf"cannot load checkpoint {tmp_path / 'checkpoint_gpu_0.pt'}: "):
        load_resume(cfg_for(tmp_path), env, logging.getLogger("resume-test"))


def test_resume_training_position_and_rng(tmp_path):
    """The saved position is returned (an epoch's end becomes the next epoch's start) and loaded into the modules;
    the RNG state comes back only for the same world size (the streams are per rank)."""
    cfg = cfg_for(tmp_path)
    one = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    backbone, head, optimizer, scheduler = parts(0)
    logger = logging.getLogger("resume-test")
    for step_in_epoch, expected in ((3, (2, 3, 11)), (4, (3, 0, 11))):
        save_state(cfg, one, backbone, head, optimizer, scheduler, None, 2, step_in_epoch, 11)
        fresh = parts(1)
        epoch, in_epoch, global_step, rng = resume_training(cfg, one, logger, 4, *fresh, None)
        assert (epoch, in_epoch, global_step) == expected
        assert torch.equal(rng["torch"], checkpoint_set.read_newest(tmp_path, 0)["rng"]["torch"])
        assert torch.equal(fresh[0].weight, backbone.weight)
    # the set of a 2-rank run with a one-row head shard each (a newer step): merged for one rank
    for rank in range(2):
        save_state(cfg, DistEnv(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu")), backbone,
                   head, optimizer, scheduler, None, 2, 4, 12)
    fresh = parts(1)
    fresh[1].weight.data = torch.zeros(10, 4)  # the merged head of both shards
    assert resume_training(cfg, one, logger, 4, *fresh, None) == (3, 0, 12, None)
    assert torch.equal(fresh[1].weight, torch.cat([head.weight, head.weight]))
