"""training.log lines in the release's layout, read back with the regexes arcface_torch users parse logs with."""
import re

import numpy as np
import pytest
import torch

from eval.verification import write_bin
from utils import utils_callbacks
from utils.utils_callbacks import CallBackLogging, CallBackVerification
from utils.utils_config import get_config
from utils.utils_logging import AverageMeter, config_lines, init_logging

# What a typical parser of arcface_torch / TransFace logs uses.
PREFIX = re.compile(r"^Training: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})-(.*)$")
SPEED = re.compile(r"Speed\s+([\d.]+) samples/sec\s+Loss\s+([\d.]+)\s+LearningRate\s+([\d.]+)\s+Epoch: (\d+)\s+"
                   r"Global Step: (\d+)")
SCALE = re.compile(r"Fp16 Grad Scale: (\d+)\s+Required: (\d+) hours$")
REQUIRED = re.compile(r"Required: (\d+) hours$")
CONFIG = re.compile(r"^: (\S+)\s+(.*)$")
VERIF = {"xnorm": re.compile(r"\[(\w+)\]\[(\d+)\]XNorm: ([\d.]+)$"),
         "flip": re.compile(r"\[(\w+)\]\[(\d+)\]Accuracy-Flip: ([\d.]+)\+-([\d.]+)$"),
         "best": re.compile(r"\[(\w+)\]\[(\d+)\]Accuracy-Highest: ([\d.]+)$")}


def read_messages(path):
    lines = open(path).read().splitlines()
    matches = [PREFIX.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    return [m.group(2) for m in matches]


class Clock:
    def __init__(self, t):
        self.t = t

    def time(self):
        return self.t


@pytest.mark.parametrize("grad_scale", [65536.0, None])
def test_speed_line(tmp_path, monkeypatch, grad_scale):
    clock = Clock(1000.0)
    monkeypatch.setattr(utils_callbacks, "time", clock)
    logger = init_logging(0, str(tmp_path))
    callback = CallBackLogging(frequent=10, total_step=5000, batch_size=128, world_size=8, start_step=0,
                               logger=logger)
    meter = AverageMeter()
    callback(10, meter, 0, 1e-4, grad_scale)  # first call: starts the clock, logs nothing
    clock.t = 1000.0 + 3600.0  # 10 steps took one hour
    meter.update(12.34567, 10)
    callback(20, meter, 3, 0.000123456, grad_scale)
    for handler in logger.handlers:
        handler.flush()
    (message,) = read_messages(tmp_path / "training.log")
    # the release's ETA: int(3600 s) / (20 - 0 + 1) steps * (5000 - 20 - 1) steps left
    eta = 3600 / 21 * 4979 / 3600
    head = "Speed %.2f samples/sec   Loss %.4f   LearningRate %.6f   Epoch: %d   Global Step: %d   " % (
        10 * 128 * 8 / 3600, 12.34567, 0.000123456, 3, 20)
    tail = ("Fp16 Grad Scale: %2.f   Required: %1.f hours" % (grad_scale, eta) if grad_scale
            else "Required: %1.f hours" % eta)
    assert message == head + tail
    speed, loss, lr, epoch, step = SPEED.search(message).groups()
    assert (float(speed), float(loss), float(lr), int(epoch), int(step)) == (2.84, 12.3457, 0.000123, 3, 20)
    if grad_scale:
        assert SCALE.search(message).groups() == ("65536", "237")
    else:
        assert REQUIRED.search(message).group(1) == "237" and "Fp16" not in message


def test_other_ranks_name_themselves(tmp_path, capsys):
    logger = init_logging(1, str(tmp_path))
    logger.warning("careful")
    out = capsys.readouterr().out
    assert re.match(r"^Training: \S+ \S+-rank1-careful$", out.strip())


def test_config_dump_layout(tmp_path):
    cfg = get_config("configs/glint360k_vit_s.py")
    derived = {"total_batch_size": 1024, "warmup_step": 66764, "total_step": 667640}
    lines = config_lines(cfg, derived)
    assert lines[0] == ": margin_list              (1.0, 0.5, 0.0)"
    assert lines[-3:] == [": total_batch_size         1024", ": warmup_step              66764",
                          ": total_step               667640"]
    keys = [*cfg, *derived]
    assert all(line[2:27] == key.ljust(25) for line, key in zip(lines, keys) if len(key) < 25)
    # a key of 25+ characters runs into its value, exactly as in the release's dump
    assert ": interclass_filtering_threshold0.0" in lines
    parsed = dict(CONFIG.match(line).groups() for line, key in zip(lines, keys) if len(key) < 25)
    assert parsed["network"] == "vit_s_dp005_mask_0" and parsed["total_step"] == "667640"


def test_verification_lines(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 112, 112, 3), dtype=np.uint8)
    write_bin(str(tmp_path / "lfw.bin"), images, [True, False] * 5)
    logger = init_logging(0, str(tmp_path))
    torch.manual_seed(0)
    from backbones import get_model
    backbone = get_model("vit_t", embed_dim=32, depth=1, num_features=16)
    verify = CallBackVerification(["lfw"], str(tmp_path), logger=logger)
    (name, acc, std, xnorm), = verify(2000, backbone)
    for handler in logger.handlers:
        handler.flush()
    messages = read_messages(tmp_path / "training.log")
    assert messages == ["[lfw][2000]XNorm: %f" % xnorm, "[lfw][2000]Accuracy-Flip: %1.5f+-%1.5f" % (acc, std),
                        "[lfw][2000]Accuracy-Highest: %1.5f" % acc]
    assert VERIF["xnorm"].match(messages[0]).groups() == ("lfw", "2000", "%f" % xnorm)
    assert VERIF["flip"].match(messages[1]).groups() == ("lfw", "2000", "%1.5f" % acc, "%1.5f" % std)
    assert VERIF["best"].match(messages[2]).groups() == ("lfw", "2000", "%1.5f" % acc)
