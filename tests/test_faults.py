"""Fault injection into real training processes on CPU.

  1. SIGKILL at random moments and while a checkpoint is being written (the killer watches for the temporary
     files of utils.checkpoint.atomic_save): after every kill the newest complete checkpoint set loads, the next run resumes
     from exactly that checkpoint, and the final run finishes with the same weights as an uninterrupted run.
  2. SIGTERM / SIGINT: the process saves at the current step, says so and exits 0; the resumed run continues
     mid-epoch with the same batches (the label sequence of interrupted + resumed equals the uninterrupted one)
     and ends with bit-identical parameters. With two ranks (gloo) a SIGTERM that reaches rank 1 only stops both
     ranks at the same step (agreed at the logging interval, frequent=1 here), and the 2-rank resume matches an
     uninterrupted 2-rank run rank by rank.
  3. A NaN injected into the loss from step 5 on: training stops after max_nonfinite_steps (exit code 3, the
     step number in the log) and the last good checkpoint and model.pt are byte-identical to what they were
     when the first NaN appeared. (With fp16 on CUDA the GradScaler skips such steps by itself; CPU runs without
     a scaler, so only the skip-and-stop logic of train.py is shown here.)

Every training run is a real `train.main()` in its own process. To keep ~45 process starts affordable, one runner
process (python tests/test_faults.py <dir>) imports train.py once and fork()s a child per run (the runner never
runs torch ops itself, so forking is safe); kills and signals go to the child's pid. The only change to a child is
a PartialFC subclass that logs each step's labels, can sleep (to make a signal land mid-epoch) and can inject NaN.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny_cpu.py")
NUM_CLASSES, PER_CLASS = 4, 16  # 64 images: 8 steps per epoch at num_image=64
KILLS = 12
KILL_EPOCHS = 30  # num_image=16, batch 8 -> 2 steps per epoch, a checkpoint after each epoch
COMMON = ["batch_size=8", f"num_classes={NUM_CLASSES}", "embedding_size=32", "export_onnx=False", "amp=none",
          'network_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}', "save_all_states=True", "seed=7",
          "frequent=1000", "warmup_epoch=0", "dpap_prob=0.5"]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_rec(root):
    """A tiny insightface-layout dataset with distinct images, so the batch order is observable."""
    from utils.recordio import IRHeader, IndexedRecordWriter, encode_image, pack_header

    rng = np.random.default_rng(11)
    os.makedirs(root)
    n = NUM_CLASSES * PER_CLASS
    a = 1 + n
    with IndexedRecordWriter(os.path.join(root, "train.rec"), os.path.join(root, "train.idx")) as w:
        w.write_idx(0, pack_header(IRHeader(0, [a, a + NUM_CLASSES], 0, 1)))
        for i in range(n):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            w.write_idx(1 + i, pack_header(IRHeader(0, float(i // PER_CLASS), 1 + i, 0), encode_image(img, 75)))
        for c in range(NUM_CLASSES):
            w.write_idx(a + c, pack_header(IRHeader(0, [1 + c * PER_CLASS, 1 + (c + 1) * PER_CLASS], 0, 0)))


# ---------------------------------------------------------------- runner process

def child_main(opts, out_file, probe, environ):
    """In the forked child: redirect output, install the probe, run train.main, exit with its code."""
    import torch
    import train

    code = 99
    try:
        os.environ.update(environ)
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        torch.set_num_threads(1)

        class Probe(train.PartialFC):
            calls = 0

            def forward(self, embeddings, labels, sample_weights=None):
                loss = super().forward(embeddings, labels, sample_weights)
                Probe.calls += 1
                if probe.get("labels"):
                    with open(probe["labels"], "a") as f:
                        f.write(" ".join(str(int(v)) for v in labels) + "\n")
                if probe.get("nan_from") and Probe.calls >= probe["nan_from"]:
                    if Probe.calls == probe["nan_from"]:
                        with open(probe["hashes"], "w") as f:
                            json.dump(output_hashes(probe["output"]), f)
                    loss = loss * float("nan")
                time.sleep(probe.get("sleep", 0))
                return loss

        train.PartialFC = Probe
        code = train.main(["--config", CONFIG, "--opts", *opts])
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def saved_files_and_temps(output):
    """The files of the checkpoint sets, model.pt and the temporary files of saves in `output`, relative to it."""
    found = [n for n in os.listdir(output) if n.startswith("model.pt")] if os.path.isdir(output) else []
    for folder, _, names in os.walk(os.path.join(output, "checkpoints")):
        found += [os.path.relpath(os.path.join(folder, n), output) for n in names]
    return sorted(found)


def saved_files(output):
    return [n for n in saved_files_and_temps(output) if ".tmp." not in n]


def output_hashes(output):
    """sha256 of saved_files(output) once the newest save is on disk (sets are written off the training thread)."""
    from utils import checkpoint_set

    start = time.monotonic()
    while checkpoint_set.newest_set(output) is None and time.monotonic() - start < 30:
        time.sleep(0.01)
    time.sleep(0.2)  # pruning of older sets follows the marker
    return {n: sha256(os.path.join(output, n)) for n in saved_files(output)}


def snapshot(output, to):
    """Copy the checkpoint sets and model.pt of `output` to the folder `to`."""
    os.makedirs(to)
    for name in saved_files(output):
        os.makedirs(os.path.dirname(os.path.join(to, name)), exist_ok=True)
        try:
            shutil.copy(os.path.join(output, name), os.path.join(to, name))
        except FileNotFoundError:  # a temp file renamed meanwhile (a saving rank still runs)
            continue


def fork_run(opts, out_file, probe=None, environ=None):
    pid = os.fork()
    if pid == 0:
        child_main(opts, out_file, probe or {}, environ or {})
    return pid


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fork_ranks(opts, name, root, sleep=0.0):
    """Two ranks like torchrun would start them (gloo on CPU); each logs its labels to <name>_<rank>.labels."""
    port = str(free_port())
    return [fork_run(opts, os.path.join(root, f"{name}_{rank}.out"),
                     {"labels": os.path.join(root, f"{name}_{rank}.labels"), "sleep": sleep},
                     {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": port})
            for rank in range(2)]


def wait(pid):
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run(opts, out_file, probe=None):
    return wait(fork_run(opts, out_file, probe))


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def kill_scenario(root, data):
    """Item 2: KILLS runs, each SIGKILLed: odd runs as soon as their checkpoint temp file appears (a save in
    progress), even runs at a random moment (after 1-4 further steps plus 0-30 ms: inside a step, a save or the
    resume), a snapshot of the checkpoint files after each kill, then one run to the end."""
    rng = np.random.default_rng(5)
    out = os.path.join(root, "kill")
    labels = os.path.join(root, "kill.labels")
    base = COMMON + [f"rec={data}", "num_image=16", f"num_epoch={KILL_EPOCHS}"]
    opts = base + [f"output={out}", "resume=True"]
    probe = {"labels": labels, "sleep": 0.005}
    ref_code = run(base + [f"output={os.path.join(root, 'kill_ref')}"], os.path.join(root, "kill_ref.out"))
    runs = []
    for i in range(KILLS):
        mode = "during_save" if i % 2 else "random"
        seen = count_lines(labels)
        steps, delay = int(rng.integers(1, 5)), float(rng.uniform(0, 0.03))
        pid = fork_run(opts, os.path.join(root, f"kill_{i}.out"), probe)
        start, code = time.monotonic(), None
        while time.monotonic() - start < 60:
            if mode == "during_save":
                if any(n.endswith(f".tmp.{pid}") for n in saved_files_and_temps(out)):
                    break
            elif count_lines(labels) >= seen + steps:
                time.sleep(delay)
                break
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped:  # finished before its kill: the test reports it
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.0002)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            code = wait(pid)
        snapshot(out, os.path.join(root, f"snap_{i}"))
        present = saved_files_and_temps(out)
        runs.append({"mode": mode, "code": code, "tmp_left": sorted(n for n in present if n.endswith(f".tmp.{pid}"))})
    final = run(opts, os.path.join(root, "kill_final.out"))
    return {"ref_code": ref_code, "runs": runs, "final_code": final, "out": out, "ref": os.path.join(root, "kill_ref")}


def signal_scenario(root, data, sig):
    """Item 3: uninterrupted run vs. run interrupted by `sig` after its third step + resumed run."""
    opts = COMMON + [f"rec={data}", "num_image=64", "num_epoch=2"]  # 8 steps per epoch
    tag = signal.Signals(sig).name
    ref = os.path.join(root, "sig_ref")
    if not os.path.isdir(ref):
        assert run(opts + [f"output={ref}"], os.path.join(root, "sig_ref.out"),
                   {"labels": os.path.join(root, "sig_ref.labels")}) == 0
    out = os.path.join(root, f"sig_{tag}")
    labels = os.path.join(root, f"sig_{tag}.labels")
    pid = fork_run(opts + [f"output={out}"], os.path.join(root, f"sig_{tag}.out"), {"labels": labels, "sleep": 0.2})
    start = time.monotonic()
    while time.monotonic() - start < 60:
        if os.path.exists(labels) and len(open(labels).read().splitlines()) >= 3:
            break
        time.sleep(0.005)
    os.kill(pid, sig)
    code = wait(pid)
    snapshot(out, os.path.join(root, f"sig_{tag}_saved"))
    resumed_labels = os.path.join(root, f"sig_{tag}_resumed.labels")
    resumed = run(opts + [f"output={out}", "resume=True"], os.path.join(root, f"sig_{tag}_resumed.out"),
                  {"labels": resumed_labels})
    return {"code": code, "resumed_code": resumed, "out": out, "ref": ref}


def two_rank_signal_scenario(root, data):
    """Item 3 with two ranks: SIGTERM reaches rank 1 only; both ranks must save at the same step and the 2-rank
    resume must match an uninterrupted 2-rank run."""
    # global batch 16: 4 steps per epoch; several ranks agree on a stop at the logging interval: frequent=1
    opts = COMMON + [f"rec={data}", "num_image=64", "num_epoch=2", "frequent=1"]
    codes = {"ref": [wait(pid) for pid in fork_ranks(opts + [f"output={os.path.join(root, 'dist_ref')}"],
                                                     "dist_ref", root)]}
    out = os.path.join(root, "dist")
    pids = fork_ranks(opts + [f"output={out}"], "dist", root, sleep=0.2)
    labels = os.path.join(root, "dist_1.labels")
    start = time.monotonic()
    while time.monotonic() - start < 60 and count_lines(labels) < 2:
        time.sleep(0.005)
    os.kill(pids[1], signal.SIGTERM)
    codes["interrupted"] = [wait(pid) for pid in pids]
    snapshot(out, os.path.join(root, "dist_saved"))
    codes["resumed"] = [wait(pid) for pid in fork_ranks(opts + [f"output={out}", "resume=True"], "dist_resumed",
                                                        root)]
    return {"codes": codes, "out": out, "ref": os.path.join(root, "dist_ref")}


def nan_scenario(root, data):
    """Item 4: NaN loss from the 5th step (epoch 1 of 4-step epochs), stop after 3 in a row. The counters are read
    at the logging interval: frequent=1 stops right at step 7."""
    out = os.path.join(root, "nan")
    opts = COMMON + [f"rec={data}", "num_image=32", "num_epoch=3", "max_nonfinite_steps=3", "dpap=False",
                     "frequent=1", f"output={out}"]
    code = run(opts, os.path.join(root, "nan.out"),
               {"nan_from": 5, "output": out, "hashes": os.path.join(root, "nan_hashes.json")})
    return {"code": code, "out": out}


def runner(root):
    sys.path.insert(0, REPO)
    import train  # noqa: F401  imported once here, inherited by every forked run

    data = os.path.join(root, "data")  # written by the test before this process starts
    result = {"kill": kill_scenario(root, data), "nan": nan_scenario(root, data),
              "SIGTERM": signal_scenario(root, data, signal.SIGTERM),
              "SIGINT": signal_scenario(root, data, signal.SIGINT), "two_ranks": two_rank_signal_scenario(root, data)}
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults"))
    make_rec(os.path.join(root, "data"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU runs: exact
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), root], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(root, "result.json")) as f:
        return root, json.load(f)


def read(path):
    with open(path) as f:
        return f.read()


def load(output, rank=0):
    """The state of `rank` in the newest complete checkpoint set of `output`, or None without one."""
    from utils import checkpoint_set
    return checkpoint_set.read_newest(output, rank) if checkpoint_set.newest_set(output) else None


def assert_same_weights(a, b):
    import torch
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict_backbone"].items():
        assert torch.equal(value, b["state_dict_backbone"][key]), key
    assert torch.equal(a["state_dict_softmax_fc"]["weight"], b["state_dict_softmax_fc"]["weight"])


def test_sigkill_at_random_moments_and_during_saves(scenarios):
    from utils.model_loading import read_state_dict

    root, result = scenarios
    kill = result["kill"]
    runs = kill["runs"]
    assert kill["ref_code"] == 0
    killed = [r for r in runs if r["code"] == -signal.SIGKILL]
    assert len(killed) == KILLS, runs
    # the killer did interrupt writes in progress: the dead process left its temp file behind
    assert sum(bool(r["tmp_left"]) for r in runs if r["mode"] == "during_save") >= KILLS // 4, runs
    previous_step = 0
    for i, r in enumerate(runs):
        snap = os.path.join(root, f"snap_{i}")
        next_out = read(os.path.join(root, f"kill_{i + 1}.out" if i + 1 < KILLS else "kill_final.out"))
        saved = load(snap)  # every kill leaves a loadable checkpoint
        if saved is None:
            assert previous_step == 0 and "starting from scratch" in next_out
            continue
        assert saved["step_in_epoch"] == 0 and saved["global_step"] == 2 * saved["epoch"]
        assert saved["global_step"] >= previous_step  # resuming never goes backwards
        previous_step = saved["global_step"]
        # ... and the next process resumed from exactly that checkpoint
        assert (f"resumed at epoch {saved['epoch']}, step 0 of the epoch, global step {saved['global_step']}"
                in next_out), next_out[-2000:]
        if os.path.exists(os.path.join(snap, "model.pt")):
            assert "patch_embed.proj.weight" in read_state_dict(os.path.join(snap, "model.pt"))
    assert previous_step > 0
    assert kill["final_code"] == 0
    # the temp files the killed saves left behind were deleted by the next start (utils/checkpoint.py)
    assert [n for n in saved_files_and_temps(kill["out"]) if ".tmp." in n] == []
    final = load(kill["out"])
    assert final["global_step"] == 2 * KILL_EPOCHS
    assert_same_weights(final, load(kill["ref"]))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_saves_and_resumes_mid_epoch_with_same_data_order(scenarios, sig):
    root, result = scenarios
    r = result[sig]
    number = int(getattr(signal, sig))
    assert r["code"] == 0
    saved = load(os.path.join(root, f"sig_{sig}_saved"))
    step = saved["global_step"]
    assert 3 <= step < 8 and saved["epoch"] == 0 and saved["step_in_epoch"] == step  # mid-epoch, current step
    out = read(os.path.join(root, f"sig_{sig}.out"))
    assert f"interrupted by signal {number}; state saved at global step {step}" in out
    assert f"saved a resumable checkpoint at global step {step} (epoch 0, step {step} of 8)" in out
    assert r["resumed_code"] == 0
    assert f"resumed at epoch 0, step {step} of the epoch, global step {step}" in read(
        os.path.join(root, f"sig_{sig}_resumed.out"))
    ref_labels = read(os.path.join(root, "sig_ref.labels")).splitlines()
    first = read(os.path.join(root, f"sig_{sig}.labels")).splitlines()
    second = read(os.path.join(root, f"sig_{sig}_resumed.labels")).splitlines()
    assert len(ref_labels) == 16 and len(first) == step
    assert first + second == ref_labels  # no batch repeated or skipped, same order
    assert_same_weights(load(r["out"]), load(r["ref"]))


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(scenarios):
    root, result = scenarios
    r = result["two_ranks"]
    assert r["codes"] == {"ref": [0, 0], "interrupted": [0, 0], "resumed": [0, 0]}
    saved = [load(os.path.join(root, "dist_saved"), rank) for rank in range(2)]
    step = saved[0]["global_step"]
    assert 2 <= step < 4 and all(s["global_step"] == step and s["step_in_epoch"] == step for s in saved)
    assert [s["rank"] for s in saved] == [0, 1] and all(s["world_size"] == 2 for s in saved)
    assert f"interrupted by signal {int(signal.SIGTERM)}; state saved at global step {step}" in read(
        os.path.join(root, "dist_1.out"))
    assert (f"rank 0: stopped because another rank requested a stop (it received SIGTERM/SIGINT); state saved at "
            f"global step {step}") in read(os.path.join(root, "dist_0.out"))
    for rank in range(2):
        ref_labels = read(os.path.join(root, f"dist_ref_{rank}.labels")).splitlines()
        first = read(os.path.join(root, f"dist_{rank}.labels")).splitlines()
        second = read(os.path.join(root, f"dist_resumed_{rank}.labels")).splitlines()
        assert len(ref_labels) == 8 and len(first) == step and first + second == ref_labels
        assert_same_weights(load(r["out"], rank), load(r["ref"], rank))


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(scenarios):
    import torch

    root, result = scenarios
    r = result["nan"]
    assert r["code"] == 3  # train.EXIT_NONFINITE
    out = read(os.path.join(root, "nan.out"))
    assert "non-finite loss in 1 of the last 1 step(s), the last at global step 5 (1 in a row now)" in out
    assert ("stopping at global step 7: the loss was non-finite for 3 consecutive steps (reached at global step 7, "
            "last non-finite at global step 7)") in out
    with open(os.path.join(root, "nan_hashes.json")) as f:
        before = json.load(f)
    assert output_hashes(r["out"]) == before
    saved = load(r["out"])
    assert saved["epoch"] == 1 and saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict_backbone"].values() if v.is_floating_point())


if __name__ == "__main__":
    runner(sys.argv[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_skip_yields_the_same_batches_and_flips(tmp_path, num_workers):
    """What the SIGTERM resume relies on, at the loader level: after set_start_batch(k) the remaining batches of
    the epoch are bit-identical (order and random flips) to those of an uninterrupted pass, with workers too."""
    import torch
    from dataset import get_dataloader

    make_rec(str(tmp_path / "data"))

    def batches(start, workers):
        loader = get_dataloader(str(tmp_path / "data"), 0, 8, seed=3, num_workers=workers, num_classes=NUM_CLASSES)
        loader.sampler.set_epoch(1)
        loader.sampler.set_start_batch(start)
        return list(loader)

    whole = batches(0, 0)
    assert len(whole) == 8
    for start in (0, 3):
        part = batches(start, num_workers)
        assert len(part) == 8 - start
        for (x, y), (xr, yr) in zip(part, whole[start:]):
            assert torch.equal(y, yr) and torch.equal(x, xr)
