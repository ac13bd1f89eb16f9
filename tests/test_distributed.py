"""utils/distributed.py: rank and world size with and without a process group (Partial FC and the data loader use
these)."""
import torch

from utils.distributed import all_gather_tensor, all_reduce_max, is_initialized, rank_and_world_size


def test_world_of_one():
    assert not is_initialized()
    assert rank_and_world_size() == (0, 1)
    t = torch.tensor([3.0])
    assert all_reduce_max(t) is t and t.tolist() == [3.0]
    assert [x.tolist() for x in all_gather_tensor(t)] == [[3.0]]


def _worker(rank, world_size):
    t = torch.tensor([float(rank)])
    return is_initialized(), rank_and_world_size(), all_reduce_max(t).tolist()


def test_two_ranks():
    from dist_utils import run_distributed

    assert run_distributed(_worker, 2) == [(True, (0, 2), [1.0]), (True, (1, 2), [1.0])]
