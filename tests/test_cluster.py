"""Clusters and failures (docs/cluster.md): the launcher's ranks from torchrun's or SLURM's variables, two torchrun
"nodes" and hand-made srun tasks training the same model as one node, and torchrun --max-restarts finishing a run
whose rank was killed or hung with the model of an uninterrupted run. 2 gloo processes on this machine."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import free_port
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils.distributed import failure_line, first_hostname, init_method, launch_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 epochs of 16 steps on 2 ranks, a checkpoint set every 4 steps; resume=True from the start, as the restartable
# command passes it
OPTS = ["network_kwargs={'embed_dim': 32, 'depth': 1, 'num_heads': 2}", "embedding_size=32", "batch_size=4",
        "num_classes=10", "num_image=128", "num_epoch=2", "warmup_epoch=0", "frequent=2", "export_onnx=False",
        "amp=none", "save_every_steps=4", "num_workers=0", "resume=True", "dist_timeout_minutes=0.15"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


# ---- pure functions

def test_launch_ranks_torchrun_slurm_or_none():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}
    assert launch_ranks(torchrun) == (3, 8, 1)  # torchrun inside a SLURM job: torchrun's variables win
    assert launch_ranks({"RANK": "1", "WORLD_SIZE": "2"}, local_rank_arg=1) == (1, 2, 1)  # torch.distributed.launch
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0"}
    assert launch_ranks(srun) == (5, 16, 5)
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0"}  # no srun step: not a task
    assert launch_ranks(batch_script) == (0, 1, 0)
    assert launch_ranks({}) == (0, 1, 0)


def test_first_hostname_and_rendezvous():
    assert first_hostname("node07") == "node07"
    assert first_hostname("gpu[007-009,012],cpu3") == "gpu007"
    assert first_hostname("gpu-a[1,3],gpu-b5") == "gpu-a1"
    assert first_hostname("n[2-4]-ib,x1") == "n2-ib"
    assert init_method({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "SLURM_JOB_ID": "7"}) == "env://"
    srun = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "a[1-9]", "SLURM_STEP_NODELIST": "a[3-4]"}
    assert init_method(srun) == "tcp://a3:23456"
    assert init_method({**srun, "MASTER_PORT": "4000"}) == "tcp://a3:4000"
    with pytest.raises(RuntimeError, match="no MASTER_ADDR"):
        init_method({"SLURM_PROCID": "0"})


def test_failure_line_names_rank_step_and_timeout():
    error = RuntimeError("[gloo/unbound_buffer.cc:81] Timed out waiting 9000ms for recv operation to complete")
    line = failure_line(1, 41, 0.15, error)
    assert line.startswith("rank 1 failed in global step 42: RuntimeError: [gloo/unbound_buffer.cc:81] Timed out ")
    assert "dist_timeout_minutes=0.15 for a rank that hung or died" in line
    assert failure_line(0, None, 10, ValueError("bad\nvalue")) == \
        "rank 0 failed before the first optimiser step of this start: ValueError: bad value"


# ---- launches

def job_id_with_free_port():
    """A SLURM job id whose derived rendezvous port (20000 + id % 10000) is free here."""
    for job_id in range(4242, 14242, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 10000))
            except OSError:
                continue
            return str(job_id)
    raise RuntimeError("no free port in 20000..29999")


def environ(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def train_cmd(output, *extra):
    return [os.path.join(REPO, "train.py"), "--config", "configs/tiny_cpu.py", "--opts", f"output={output}", *OPTS,
            *extra]


def start(cmd, log, **env):
    return subprocess.Popen(cmd, cwd=REPO, env=environ(**env), stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(procs, log_path, timeout=120):
    for proc in procs:
        proc.wait(timeout=timeout)
    text = log_path.read_text()
    assert all(p.returncode == 0 for p in procs), text[-4000:]
    return text


def assert_same_model(a, b):
    ma, mb = ckpt.load(a / "model.pt"), ckpt.load(b / "model.pt")
    assert ma.keys() == mb.keys()
    for key, value in ma.items():
        assert torch.equal(value, mb[key]), key
    for rank in range(2):  # and the same resumable state, Partial FC shard and optimiser included
        sa, sb = checkpoint_set.read_newest(a, rank), checkpoint_set.read_newest(b, rank)
        assert sa["global_step"] == sb["global_step"] == 32
        assert torch.equal(sa["state_dict_softmax_fc"]["weight"], sb["state_dict_softmax_fc"]["weight"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One node, 2 processes, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    with open(out / "stdout", "w") as log:
        proc = start([*TORCHRUN, "--standalone", "--nproc_per_node=2", *train_cmd(out)], log)
        finish([proc], out / "stdout")
    return out


def test_two_nodes_equal_one_node(reference, tmp_path):
    port = free_port()
    with open(tmp_path / "stdout", "w") as log:
        nodes = [start([*TORCHRUN, "--nnodes=2", f"--node-rank={node}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cluster-test", *train_cmd(tmp_path)], log)
                 for node in range(2)]
        finish(nodes, tmp_path / "stdout")
    assert_same_model(reference, tmp_path)


def test_srun_tasks_equal_torchrun(reference, tmp_path):
    """What `srun --ntasks=2 python train.py ...` sets in each task, by hand; the rendezvous comes from the node list
    and the job id, as on a cluster without MASTER_ADDR."""
    slurm = dict(SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_JOB_ID=job_id_with_free_port(),
                 SLURM_JOB_NODELIST="localhost")
    with open(tmp_path / "stdout", "w") as log:
        tasks = [start([sys.executable, *train_cmd(tmp_path)], log, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm)
                 for r in range(2)]
        finish(tasks, tmp_path / "stdout")
    assert_same_model(reference, tmp_path)


# ---- a rank dies or hangs: torchrun --max-restarts restarts the group, which resumes and finishes

def worker_pids(parent):
    """{rank: pid} of torchrun's worker processes (its children), read from /proc."""
    pids = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:  # gone meanwhile
            continue
        if b"RANK" in env:
            pids[int(env[b"RANK"])] = int(entry)
    return pids


def run_with_fault(output, signum):
    """Send `signum` to rank 1 once the first checkpoint set (step 4 of 16) is complete; -> the run's output."""
    with open(output / "stdout", "w") as log:
        proc = start([*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", *train_cmd(output)], log)
        deadline = time.monotonic() + 60
        while checkpoint_set.newest_set(output) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (output / "stdout").read_text()[-3000:]
            time.sleep(0.01)
        os.kill(worker_pids(proc.pid)[1], signum)
        return finish([proc], output / "stdout")


def resumed_mid_epoch(output):
    """(epoch, step in it) the restarted group resumed at, from training.log."""
    found = re.findall(r"resumed at epoch (\d+), step (\d+) of the epoch", (output / "training.log").read_text())
    assert len(found) == 1, found
    return tuple(int(v) for v in found[0])


def test_killed_rank_restarts_and_ends_with_the_uninterrupted_model(reference, tmp_path):
    text = run_with_fault(tmp_path, signal.SIGKILL)
    assert "rank 0 failed in global step" in text  # the survivor names itself and its step, then torchrun restarts
    epoch, step = resumed_mid_epoch(tmp_path)
    assert step % 4 == 0 and 0 < step < 16  # from a set written mid-epoch
    assert_same_model(reference, tmp_path)


def test_hung_rank_times_out_restarts_and_ends_with_the_uninterrupted_model(reference, tmp_path):
    text = run_with_fault(tmp_path, signal.SIGSTOP)  # rank 1 stops answering; rank 0 waits 0.15 min, then fails
    assert "Timed out" in text
    assert "(a collective waited dist_timeout_minutes=0.15 for a rank that hung or died;" in text
    epoch, step = resumed_mid_epoch(tmp_path)
    assert step % 4 == 0 and 0 < step < 16
    assert_same_model(reference, tmp_path)
