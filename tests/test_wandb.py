"""Weights & Biases logging: the same scalars as TensorBoard (a tiny training in wandb's offline mode, the run file
read back), wandb imported only when enabled, a missing package and an API key in a config are one-line errors."""
import json
import os
import struct
import sys
import time

import numpy as np
import pytest
import torch

import train
from utils.distributed import DistEnv
from utils.utils_callbacks import CallBackLogging
from utils.utils_config import ConfigError, get_config
from utils.utils_logging import AverageMeter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TINY = ["network_kwargs={'embed_dim': 32, 'depth': 1, 'num_heads': 2}", "embedding_size=32", "batch_size=8",
        "num_classes=10", "num_image=48", "num_epoch=2", "frequent=1", "verbose=3", "export_onnx=False", "seed=7"]


def wandb_scalars(path, timeout=30.0):
    """{tag: {step: value}} of the history records of a .wandb run file, once its exit record is there (wandb's
    service process may still be writing the file when run.finish() has returned)."""
    deadline = time.monotonic() + timeout
    while True:
        scalars, finished = read_wandb_file(path)
        if finished or time.monotonic() > deadline:
            assert finished, f"{path}: no exit record after {timeout} s"
            return scalars
        time.sleep(0.1)


def read_wandb_file(path):
    """-> ({tag: {step: value}} of the history records, whether the exit record was found).  The file is a
    LevelDB-style log (7-byte file header ":W&B" + magic + version; 32 KiB blocks of chunks with a 7-byte header:
    crc32, little-endian length, type 1 full / 2 first / 3 middle / 4 last) of protobuf Records; wandb no longer
    ships a Python reader."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, chunks, scalars, finished = 7, [], {}, False
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4) and pos <= len(data):  # a complete record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            finished |= record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                        scalars.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return scalars, finished


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_offline_run_logs_exactly_the_tensorboard_scalars(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("wandb")
    from eval.verification import write_bin

    # a verification set where the synthetic source's rec prefix points (relative to the working directory)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    os.makedirs("synthetic")
    write_bin("synthetic/lfw.bin", rng.integers(0, 256, (20, 112, 112, 3)), [i % 2 == 0 for i in range(10)])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = get_config(os.path.join(REPO, "configs", "tiny_cpu.py"),
                     [f"output={tmp_path / 'out'}", "using_wandb=True", "wandb_project=transface-test",
                      "wandb_run_name=tiny", "val_targets=['lfw']", *TINY])
    assert train.train(cfg, CPU)["status"] == "finished"

    [run_file] = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "wandb") for f in files
                  if f.endswith(".wandb")]
    logged, tensorboard = wandb_scalars(run_file), tensorboard_scalars(str(tmp_path / "out" / "tensorboard"))
    assert set(tensorboard) == {"loss", "learning_rate", "time_for_end", "samples_per_sec", "lfw/accuracy",
                                "lfw/xnorm"}
    assert len(tensorboard["loss"]) == 11 and sorted(tensorboard["lfw/accuracy"]) == [3, 6, 9, 12]
    assert set(logged) == set(tensorboard)
    for tag, points in tensorboard.items():
        assert sorted(logged[tag]) == sorted(points), tag
        for step, value in points.items():  # TensorBoard keeps float32, wandb the float64 it was given
            assert np.float32(logged[tag][step]) == np.float32(value), (tag, step)


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_grad_scale_is_logged_when_there_is_one():
    writer, meter = Recorder(), AverageMeter()
    meter.update(2.0, 1)
    log = CallBackLogging(1, 10, 8, 1, writer=writer, logger=type("L", (), {"info": lambda self, msg: None})())
    log(1, meter, 0, 0.1, grad_scale=None)  # first call only starts the clock
    log(2, meter, 0, 0.1, grad_scale=65536.0)
    log(3, meter, 0, 0.1, grad_scale=None)
    assert [s for s in writer.scalars if s[0] == "grad_scale"] == [("grad_scale", 65536.0, 2)]


def test_without_wandb_everything_else_works(tmp_path, monkeypatch):
    """wandb is needed only with using_wandb (timm imports it by itself when it is installed, so 'not in
    sys.modules' cannot be the check): with it unimportable, config and TensorBoard writer still work."""
    from utils.writer import build_writer

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), [f"output={tmp_path}"])
    writer = build_writer(cfg)
    writer.add_scalar("loss", 1.5, 3)
    writer.close()
    assert writer.wandb_run is None
    assert tensorboard_scalars(str(tmp_path / "tensorboard")) == {"loss": {3: 1.5}}


def test_missing_wandb_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec answers None: not installed
    with pytest.raises(ConfigError, match=r"^using_wandb=True needs the wandb package.*: pip install wandb$"):
        get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), ["using_wandb=True"])


@pytest.mark.parametrize("field", ["wandb_key", "wandb_api_key"])
def test_api_key_in_a_config_is_refused(tmp_path, field):
    path = tmp_path / "job.py"
    path.write_text(f'from easydict import EasyDict\nconfig = EasyDict()\nconfig.{field} = "0123abcd"\n')
    with pytest.raises(ConfigError, match=f"{field}.*WANDB_API_KEY") as error:
        get_config(str(path))
    assert "\n" not in str(error.value) and "0123abcd" not in str(error.value)
    with pytest.raises(ConfigError, match="WANDB_API_KEY") as error:
        get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), [f"{field}=0123abcd"])
    assert "0123abcd" not in str(error.value)
