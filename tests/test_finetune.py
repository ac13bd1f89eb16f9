"""Fine-tuning (finetune.py, docs/finetune.md): init from every accepted file, init_head re-partitioned, resume wins
over init, a frozen backbone, layer-wise LR decay and the LR for another total batch, against direct computations."""
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

import finetune
import train
from backbones import get_model
from lr_scheduler import PolyScheduler
from partial_fc import PartialFC
from losses import CombinedMarginLoss
from tests.dist_utils import run_distributed
from tests.release_format import write_release_checkpoints
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils.distributed import DistEnv
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1}'
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
LOG = logging.getLogger("test_finetune")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(output, *opts):
    base = [f"output={output}", f"network_kwargs={TINY}", "embedding_size=32", "batch_size=8", "num_classes=10",
            "num_image=32", "num_epoch=1", "warmup_epoch=0", "frequent=2", "export_onnx=False", "amp=none", "seed=7"]
    return get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), base + list(opts))


def tiny_backbone(cfg, seed):
    torch.manual_seed(seed)
    return get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs)


def released_file(cfg, path, seed=1):
    """A released-layout file: the bare state_dict of the unwrapped backbone."""
    state = tiny_backbone(cfg, seed).state_dict()
    torch.save(state, path)
    return state


def assert_same(a, b, keys=None):
    keys = list(a) if keys is None else keys
    assert sorted(keys) == sorted(keys & b.keys())
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def test_released_backbone_as_init_with_lr0_keeps_every_weight(tmp_path):
    cfg = tiny_cfg(tmp_path, "lr=0")
    init = released_file(cfg, tmp_path / "released.pt")
    assert train.train(tiny_cfg(tmp_path / "run", "lr=0", f"init={tmp_path / 'released.pt'}"), CPU)["global_step"] == 4
    trained = ckpt.load(tmp_path / "run" / "model.pt")
    params = {name for name, _ in tiny_backbone(cfg, 0).named_parameters()}
    assert_same(init, trained, params)  # every parameter bit-identical (AdamW with lr 0 changes nothing)
    # the rest are the BatchNorm running statistics of the feature head, which a training-mode forward updates
    assert {key.rsplit(".", 1)[1] for key in set(init) - params} == {"running_mean", "running_var",
                                                                     "num_batches_tracked"}
    assert int(trained["feature.1.num_batches_tracked"]) == 8  # 4 steps of 2 forwards: DPAP's and the loss's


def test_frozen_backbone_is_bit_identical_and_the_head_trains(tmp_path):
    first = tiny_cfg(tmp_path / "first", "save_all_states=True", "lr=0.01")
    train.train(first, CPU)
    init = checkpoint_set.read_newest(tmp_path / "first", 0)
    # init from an output folder: the backbone of its newest checkpoint set, and its head
    frozen = tiny_cfg(tmp_path / "frozen", f"init={tmp_path / 'first'}", "init_head=True",
                      "backbone_lr_scale=0", "lr=0.01", "save_all_states=True")
    assert train.train(frozen, CPU)["status"] == "finished"
    after = checkpoint_set.read_newest(tmp_path / "frozen", 0)
    assert_same(init["state_dict_backbone"], ckpt.load(tmp_path / "frozen" / "model.pt"))  # buffers included
    assert not torch.equal(init["state_dict_softmax_fc"]["weight"], after["state_dict_softmax_fc"]["weight"])
    # no backward ran through the backbone: its parameters got no gradient, hence no optimiser state
    backbone_group, head_group = after["state_optimizer"]["param_groups"]
    assert backbone_group["lr_scale"] == 0 and backbone_group["lr"] == 0
    assert not set(backbone_group["params"]) & set(after["state_optimizer"]["state"])
    assert set(head_group["params"]) <= set(after["state_optimizer"]["state"])


def kinds(cfg, folder):
    """(kind, path, backbone state it must load) for every file init accepts."""
    os.makedirs(folder, exist_ok=True)
    released = released_file(cfg, folder / "released.pt", seed=2)
    ours = tiny_backbone(cfg, 3).state_dict()
    ckpt.atomic_save(ours, folder / "model.pt")
    ckpt.atomic_save({"epoch": 1, "global_step": 4, "world_size": 1, "rank": 0, "network": cfg.network,
                      "state_dict_backbone": ours, "state_dict_softmax_fc": {"weight": torch.zeros(10, 32)}},
                     folder / "checkpoint_gpu_0.pt")
    release_run = tiny_cfg(folder / "release_run")
    saved = write_release_checkpoints(release_run, 2, epoch=1, global_step=2, seed=4)
    ddp = {f"module.{key}": value for key, value in released.items()}  # saved from the DDP wrapper
    torch.save(ddp, folder / "ddp.pt")
    return [("released .pt", folder / "released.pt", released), ("our model.pt", folder / "model.pt", ours),
            ("our checkpoint_gpu_0.pt", folder / "checkpoint_gpu_0.pt", ours),
            ("the release's checkpoint_gpu_1.pt", folder / "release_run" / "checkpoint_gpu_1.pt",
             saved[1]["state_dict_backbone"]),
            ("module.-prefixed .pt", folder / "ddp.pt", released)]


def test_init_from_each_accepted_file_kind(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path)
    for kind, path, expected in kinds(cfg, tmp_path / "files"):
        backbone = tiny_backbone(cfg, 0)
        head = PartialFC(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 32, 10, 1.0)
        fresh_head = head.weight.detach().clone()
        with caplog.at_level(logging.INFO, logger=LOG.name):
            finetune.init_from(tiny_cfg(tmp_path, f"init={path}"), CPU, LOG, backbone, head)
        assert_same(expected, backbone.state_dict())
        assert torch.equal(head.weight, fresh_head), kind  # init_head=False: the head starts fresh
        assert f"from {path}: all {len(expected)} tensors loaded" in caplog.text, kind


def test_init_from_an_arcface_torch_cnn(tmp_path):
    cfg = tiny_cfg(tmp_path, "network=mbf", "network_kwargs={}")
    torch.manual_seed(5)
    state = get_model("mbf", num_features=32).state_dict()
    torch.save(state, tmp_path / "mbf.pt")
    backbone = get_model("mbf", num_features=32)
    head = PartialFC(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 32, 10, 1.0)
    finetune.init_from(tiny_cfg(tmp_path, "network=mbf", "network_kwargs={}", f"init={tmp_path / 'mbf.pt'}"), CPU,
                       LOG, backbone, head)
    assert cfg.dpap is False and cfg.ehsm is False
    assert_same(state, backbone.state_dict())


def test_wrong_network_for_the_init_file_is_one_line(tmp_path):
    released_file(tiny_cfg(tmp_path), tmp_path / "released.pt")
    run = subprocess.run([sys.executable, "train.py", "configs/tiny_cpu.py", "--opts", f"output={tmp_path / 'out'}",
                          f"init={tmp_path / 'released.pt'}", "num_image=32", "batch_size=8"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'released.pt'} does not fit --network vit_t")
    assert lines[0].endswith("missing keys: none; unexpected keys: none; shape mismatches (file vs model): pos_embed "
                             "(1, 144, 32) vs (1, 144, 64), mask_token (1, 1, 32) vs (1, 1, 64), patch_embed.proj."
                             "weight (32, 3, 9, 9) vs (64, 3, 9, 9), patch_embed.proj.bias (32,) vs (64,), "
                             "blocks.0.norm1.weight (32,) vs (64,) (+34 more)")


def test_init_head_repartitions_the_centres(tmp_path):
    """Centres of a 1-process run on 2 processes, and of a 2-process release run on 3: each rank holds its rows of
    the same matrix."""
    one = tiny_cfg(tmp_path / "one", "save_all_states=True", "lr=0.01")
    train.train(one, CPU)
    centres = checkpoint_set.read_newest(tmp_path / "one", 0)["state_dict_softmax_fc"]["weight"]
    shards = [finetune.head_shard(tmp_path / "one", 10, 32, rank, 2) for rank in range(2)]
    assert [s.shape[0] for s in shards] == [5, 5] and torch.equal(torch.cat(shards), centres)

    release = tiny_cfg(tmp_path / "release", "num_classes=11")
    saved = write_release_checkpoints(release, 2, epoch=1, global_step=2)
    full = torch.cat([s["state_dict_softmax_fc"]["weight"] for s in saved])
    shards = [finetune.head_shard(tmp_path / "release" / "checkpoint_gpu_1.pt", 11, 32, rank, 3) for rank in range(3)]
    assert [s.shape[0] for s in shards] == [4, 4, 3] and torch.equal(torch.cat(shards), full)

    with pytest.raises(ckpt.CheckpointError, match="same class set: the saved head has 11 centres"):
        finetune.head_shard(tmp_path / "release" / "checkpoint_gpu_0.pt", 12, 32, 0, 1)
    with pytest.raises(ckpt.CheckpointError, match="model.pt: init_head=True needs a training checkpoint"):
        finetune.head_shard(tmp_path / "one" / "model.pt", 10, 32, 0, 1)


def _init_head_worker(rank, world_size, output, init):
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    cfg = tiny_cfg(output, f"init={init}", "init_head=True", "lr=0", "save_all_states=True", "num_image=64")
    return train.train(cfg, env)


def test_init_head_on_two_processes_from_a_one_process_run(tmp_path):
    train.train(tiny_cfg(tmp_path / "one", "save_all_states=True", "lr=0.01"), CPU)
    saved = checkpoint_set.read_newest(tmp_path / "one", 0)
    init = os.path.join(checkpoint_set.newest_set(tmp_path / "one"), checkpoint_set.SHARED)  # a set's shared.pt
    results = run_distributed(_init_head_worker, 2, str(tmp_path / "two"), init)
    assert results == [{"status": "finished", "global_step": 4}] * 2
    after = [checkpoint_set.read_newest(tmp_path / "two", r) for r in (0, 1)]
    shards = [state["state_dict_softmax_fc"]["weight"] for state in after]
    assert [s.shape[0] for s in shards] == [5, 5]
    assert torch.equal(torch.cat(shards), saved["state_dict_softmax_fc"]["weight"])  # lr 0: the centres as loaded
    params = [name for name, _ in tiny_backbone(tiny_cfg(tmp_path), 0).named_parameters()]
    assert_same(saved["state_dict_backbone"], after[1]["state_dict_backbone"], params)


def test_resume_wins_over_init(tmp_path):
    released_file(tiny_cfg(tmp_path), tmp_path / "released.pt")
    common = [f"init={tmp_path / 'released.pt'}", "save_all_states=True", "num_epoch=2", "lr=0.01"]
    whole = tiny_cfg(tmp_path / "whole", *common)
    assert train.train(whole, CPU) == {"status": "finished", "global_step": 8}
    part = tiny_cfg(tmp_path / "part", *common)
    assert train.train(part, CPU, stop=lambda step: step == 3)["status"] == "preempted"
    # the same command again (resume=False, init still set): it continues from its checkpoint set
    assert train.train(tiny_cfg(tmp_path / "part", *common), CPU) == {"status": "finished", "global_step": 8}
    assert_same(ckpt.load(tmp_path / "whole" / "model.pt"), ckpt.load(tmp_path / "part" / "model.pt"))


def test_layer_decay_lrs_equal_a_direct_computation(tmp_path):
    cfg = tiny_cfg(tmp_path, "layer_decay=0.5", "backbone_lr_scale=0.2", "lr=0.1")
    backbone = tiny_backbone(cfg, 0)
    head = PartialFC(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 32, 10, 1.0)
    optimizer = train.build_optimizer(cfg, backbone, head)
    scheduler = PolyScheduler(optimizer, cfg.lr, 10, 2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    base = 0.1 * (1 - 1 / 8) ** 2  # lr(3) of the poly schedule: warm-up 2, 10 steps
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(backbone.named_parameters())
    # depth 2: embeddings are layer 0, blocks.i layer i + 1, everything after the blocks layer 3
    expected = {"patch_embed.proj.weight": 0.2 * 0.5**3, "pos_embed": 0.2 * 0.5**3, "mask_token": 0.2 * 0.5**3,
                "blocks.0.attn.qkv.weight": 0.2 * 0.5**2, "blocks.1.mlp.fc2.bias": 0.2 * 0.5, "norm.weight": 0.2,
                "feature.0.weight": 0.2, "senet.0.weight": 0.2}
    for name, scale in expected.items():
        assert lr_of[id(names[name])] == pytest.approx(base * scale, rel=1e-12), name
    assert lr_of[id(head.weight)] == pytest.approx(base, rel=1e-12)
    assert len(optimizer.param_groups) == 5 and sum(len(g["params"]) for g in optimizer.param_groups) == \
        len(names) + 1
    assert scheduler.get_last_lr()[-1] == pytest.approx(base, rel=1e-12)


@pytest.mark.parametrize("rule,factor", [("none", 1.0), ("linear", 32 / 128), ("sqrt", math.sqrt(32 / 128))])
def test_lr_scaling_equals_the_formula(tmp_path, caplog, rule, factor):
    cfg = tiny_cfg(tmp_path, "lr=0.004", "batch_size=16", "reference_batch=128", f"lr_scaling={rule}")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        fitted = finetune.fit_to_batch(cfg, 2, LOG)  # total batch 2 x 16 = 32
    assert fitted.lr == pytest.approx(0.004 * factor, rel=1e-15) and cfg.lr == 0.004
    assert ("total batch 32 = 2 process(es) x batch_size 16 x gradient_acc 1, but the config was tuned for "
            f"reference_batch 128 (0.25x): lr_scaling={rule} trains with lr {0.004 * factor:.4g}") in caplog.text
    caplog.clear()
    same = finetune.fit_to_batch(tiny_cfg(tmp_path, "batch_size=16", "gradient_acc=4", "reference_batch=128",
                                          f"lr_scaling={rule}"), 2, LOG)
    assert same.lr == 1e-3 and caplog.text == ""  # 2 x 16 x 4 = 128: nothing to scale, nothing logged


def test_documented_fine_tune_commands_are_valid_configs():
    """The fine-tune command of the README and docs/finetune.md parses, and every override is a config field."""
    for doc in ("README.md", os.path.join("docs", "finetune.md")):
        with open(os.path.join(REPO, doc)) as handle:
            lines = [line for line in handle.read().splitlines() if line.startswith("torchrun") and "init=" in line]
        assert len(lines) == 1, doc
        args = train.parse_args(lines[0].split("train.py", 1)[1].split())
        cfg = get_config(os.path.join(REPO, args.config), args.opts)
        assert cfg.init == "glint360k_model_TransFace_S.pt" and cfg.backbone_lr_scale == 0.1, doc
