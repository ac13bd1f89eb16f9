"""Fine-tuning from saved weights, and runs whose total batch differs from the one a config was tuned for
(docs/finetune.md, docs/training.md).

- init: the backbone starts from a file (a released TransFace .pt, our model.pt, the backbone inside one of our
  training checkpoints or the release's checkpoint_gpu_*.pt, an arcface_torch CNN .pt), read strictly by the loader evaluation uses; the head,
  optimiser and schedule start fresh. init_head also takes the Partial FC centres of a training checkpoint with
  the same class set, re-partitioned for this run's processes as a resume does.
- backbone_lr_scale and layer_decay: the LR of each backbone parameter group as a multiple of lr ("lr_scale",
  which PolyScheduler applies); 0 freezes the backbone.
- reference_batch and lr_scaling: the LR of a run on another number of GPUs.
"""
import math
import os

from easydict import EasyDict as edict

from partial_fc import merge_shards, shard_for_rank
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils import release_checkpoint
from utils.model_loading import load_strict
from utils.resume import resume_training
from utils.utils_config import LR_SCALING


def start(cfg, env, logger, steps_per_epoch, modules):
    """Where the run starts: (epoch, step in it, global step, RNG state or None). A resume when resume=True or when a
    fine-tune's output already holds a checkpoint (a preempted fine-tune continues from its own save instead of
    starting again from `init`); otherwise step 0, the backbone from cfg.init when it is set."""
    if resumes(cfg, logger):
        position = resume_training(cfg, env, logger, steps_per_epoch, *modules)
        if position[2] > 0 or not cfg.init:
            return position
    if cfg.init:
        init_from(cfg, env, logger, modules[0], modules[1])
    return 0, 0, 0, None


def resumes(cfg, logger):
    """resume=True, or init set and a checkpoint (a complete set or checkpoint_gpu_0.pt) in cfg.output."""
    if cfg.resume:
        return True
    if cfg.init and (checkpoint_set.newest_set(cfg.output) or os.path.exists(ckpt.checkpoint_path(cfg.output, 0))):
        logger.info(f"init={cfg.init}, but {cfg.output} holds a checkpoint: resuming this fine-tune from it")
        return True
    return False


# --- the total batch and the LR ---

def total_batch(cfg, world_size):
    return world_size * cfg.batch_size * cfg.gradient_acc


def scaled_lr(lr, total, reference, rule):
    """The LR for a total batch `total` when `lr` was tuned for `reference`: unchanged ("none"), proportional to the
    batch ("linear", Goyal et al. 2017) or to its square root ("sqrt", the usual rule for Adam-type optimisers)."""
    if rule == "linear":
        return lr * total / reference
    if rule == "sqrt":
        return lr * math.sqrt(total / reference)
    return lr


def fit_to_batch(cfg, world_size, logger):
    """-> a copy of `cfg` whose lr is scaled (cfg.lr_scaling) from cfg.reference_batch to this run's total batch; a
    total batch other than the reference is logged with its numbers. The warm-up and the schedule are counted in
    epochs, i.e. in samples: they stay the same samples, so their step counts follow the total batch."""
    total = total_batch(cfg, world_size)
    reference = cfg.reference_batch or total
    lr = scaled_lr(cfg.lr, total, reference, cfg.lr_scaling)
    if total != reference:
        other = {rule: f"{scaled_lr(cfg.lr, total, reference, rule):.4g}" for rule in LR_SCALING}
        logger.warning(
            f"total batch {total} = {world_size} process(es) x batch_size {cfg.batch_size} x gradient_acc "
            f"{cfg.gradient_acc}, but the config was tuned for reference_batch {reference} ({total / reference:g}x): "
            f"lr_scaling={cfg.lr_scaling} trains with lr {lr:.4g} (none: {other['none']}, linear: {other['linear']}, "
            f"sqrt: {other['sqrt']}); the warm-up stays {cfg.warmup_epoch} epoch(s) of samples (docs/training.md)")
    cfg = edict(cfg)
    cfg.lr = lr
    return cfg


# --- LR multipliers of the backbone ---

def layer_id(name, depth):
    """Depth of a ViT parameter in BEiT/timm's numbering: 0 for the patch and position embeddings and the mask token,
    i + 1 for block i, depth + 1 for everything after the blocks (final norm, feature head, SE gate)."""
    if name.startswith(("patch_embed.", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def backbone_param_groups(backbone, backbone_lr_scale=1.0, layer_decay=1.0):
    """Optimiser groups of the backbone, each with its "lr_scale": backbone_lr_scale * layer_decay ** (depth + 1 -
    layer_id), so the layers after the last block train at backbone_lr_scale and each block below at layer_decay
    times the one above. layer_decay 1: one group with every parameter (the released optimiser's)."""
    if layer_decay == 1:
        return [{"params": list(backbone.parameters()), "lr_scale": backbone_lr_scale}]
    depth = len(backbone.blocks)
    groups = {}
    for name, param in backbone.named_parameters():
        groups.setdefault(layer_id(name, depth), []).append(param)
    return [{"params": params, "lr_scale": backbone_lr_scale * layer_decay ** (depth + 1 - layer)}
            for layer, params in sorted(groups.items())]


# --- starting from a file ---

def init_from(cfg, env, logger, backbone, head):
    """Load cfg.init into `backbone` (strictly), and with cfg.init_head the Partial FC centres into `head`."""
    state = load_strict(backbone, cfg.init, cfg.network, map_location=env.device)
    logger.info(f"init: backbone {cfg.network} (embedding width {cfg.embedding_size}) from {cfg.init}: all "
                f"{len(state)} tensors loaded; the optimiser and LR schedule start fresh")
    if cfg.init_head:
        shard = head_shard(cfg.init, cfg.num_classes, cfg.embedding_size, env.rank, env.world_size)
        head.load_state_dict({**head.state_dict(), "weight": shard.to(head.weight.device)})  # AdaFace stats: fresh
        logger.info(f"init_head: {cfg.num_classes} Partial FC centres from the checkpoints next to {cfg.init}, "
                    f"rank {env.rank} of {env.world_size} holds {shard.shape[0]}")
    else:
        logger.info("init: the Partial FC head starts fresh (init_head=False)")


def head_shard(path, num_classes, embedding_size, rank, world_size):
    """This rank's shard of the centres saved by the run that wrote the training checkpoint `path`, re-partitioned for
    `world_size` ranks. `path`: a checkpoint set (its shared.pt or folder, or an output folder: its newest complete
    set) or a single-file checkpoint_gpu_<rank>.pt (this project's earlier versions, the release) next to those of
    the run's other ranks."""
    paths = head_files(os.fspath(path))
    shards = []
    for rank_path in paths:
        if not os.path.exists(rank_path):
            raise FileNotFoundError(f"{rank_path}: init_head needs the head shards of all {len(paths)} ranks of the "
                                    f"run that wrote {path}; this one is missing")
        shards.append(ckpt.load(rank_path)["state_dict_softmax_fc"]["weight"])
    full = merge_shards(shards)
    if tuple(full.shape) != (num_classes, embedding_size):
        raise ckpt.CheckpointError(
            f"{path}: init_head=True needs the same class set: the saved head has {full.shape[0]} centres of width "
            f"{full.shape[1]}, this run num_classes={num_classes}, embedding_size={embedding_size} (set "
            "init_head=False to start the head fresh)")
    return shard_for_rank(full, rank, world_size)


def head_files(path):
    """The files holding the Partial FC shards of ranks 0, 1, ... of the run that saved `path`."""
    set_folder = None
    if os.path.isdir(path):
        set_folder = path if os.path.exists(os.path.join(path, checkpoint_set.SHARED)) else \
            checkpoint_set.newest_set(path)
    elif os.path.basename(path) == checkpoint_set.SHARED:
        set_folder = os.path.dirname(path)
    if set_folder is not None:
        world = checkpoint_set.read_shared(set_folder)["world_size"]
        return [os.path.join(set_folder, checkpoint_set.rank_file(r)) for r in range(world)]
    saved = ckpt.load(path) if not os.path.isdir(path) else None
    if not (isinstance(saved, dict) and "state_dict_softmax_fc" in saved):
        raise ckpt.CheckpointError(
            f"{path}: init_head=True needs a training checkpoint (a checkpoint set or checkpoint_gpu_*.pt) holding the "
            "Partial FC centres; this holds a backbone only (set init_head=False to start the head fresh)")
    folder = os.path.dirname(path)
    # the release records no world size: its run wrote one file per rank
    world = saved.get("world_size") or release_checkpoint.release_world_size(folder)
    return [ckpt.checkpoint_path(folder, r) for r in range(world)]
