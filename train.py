"""Train a TransFace (or arcface_torch CNN) face-recognition backbone with a Partial FC head.

    torchrun --nproc_per_node=8 train.py --config configs/ms1mv2_vit_s.py
    python -m torch.distributed.launch --nproc_per_node=8 train.py --config configs/ms1mv2_vit_s.py
    python train.py --config configs/tiny_cpu.py --opts batch_size=16 amp=none

One optimiser step (REFERENCE.md §1.6), repeated for `gradient_acc` micro-batches before the update:
    no-grad forward (train mode) -> patch weights -> DPAP (only if cfg.dpap)
    forward with grad -> EHSM weights from the patch entropies (only if cfg.ehsm) -> Partial FC loss -> backward
    [fp16: GradScaler] unscale -> clip grad-norm `grad_clip` on the backbone only -> optimiser -> zero_grad -> LR step

Host-device syncs: none inside the step with the released sample_rate 1 (Partial FC sampling, sample_rate < 1,
has data-dependent shapes, as in the release). A non-finite loss is detected on the device (`found_inf`, all-reduced
MAX over ranks, a collective but no host read) and handed to the fused optimiser, whose kernel then skips the update
(params, moments and the Adam step count stay as they were); with fp16 the GradScaler does the same with the found_inf
of the gradients. The loss sum and the non-finite counters (run length, count in the window, last bad step, the step
the run reached `max_nonfinite_steps`) stay on the device (NonFiniteMonitor) and are read in ONE transfer at the
logging interval (global_step % frequent == 0), before every save (epoch end, stop) and so at the end. Then a run of
`max_nonfinite_steps` stops training with no save: skipped steps leave the parameters finite, and no checkpoint is
overwritten after the run began to diverge. Stop requests (SIGTERM/SIGINT, or the `stop` callback) are host flags:
a world of one acts on them after the current step; with several ranks they are agreed (all-reduce MAX, in the same
read) at the next logging interval or epoch end, so every rank saves at the same step — preemption takes effect within
`frequent` steps on multi-rank runs.

Deviations from the released train.py: the no-grad forward does not also call the FC head (its output was
discarded); the LR scheduler counts optimiser steps and has no one-iteration lag (lr_scheduler.py); SGD works;
`gradient_acc` is honoured; mid-epoch resume; resume with a different world size re-partitions the Partial FC shards.
"""
import argparse
import os
import random
import signal
import sys
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from backbones import get_model
from dataset import get_dataloader
from dpap import dpap
from losses import CombinedMarginLoss, ehsm_weights
from lr_scheduler import PolyScheduler
from partial_fc import PartialFC, merge_shards, shard_for_rank
from utils import checkpoint as ckpt
from utils.distributed import all_gather_tensor, all_reduce_max, barrier, cleanup_distributed, setup_distributed
from utils.utils_callbacks import CallBackLogging, CallBackVerification
from utils.utils_config import get_config
from utils.utils_logging import AverageMeter, init_logging

EXIT_NONFINITE = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="TransFace training")
    parser.add_argument("--config", default="configs/ms1mv2_vit_s.py", help="config file, e.g. configs/ms1mv2_vit_s.py")
    # torch.distributed.launch passes --local-rank=N (new) or --local_rank=N (old torch); torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key=value, e.g. lr=0.01 amp=bf16")
    return parser.parse_args(argv)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_amp(cfg, device, logger):
    """-> (autocast dtype or None, use GradScaler). fp16 autocast on CPU is poorly supported: fall back to bf16."""
    amp = cfg.amp
    if amp == "fp16" and device.type != "cuda":
        logger.warning("amp=fp16 needs CUDA; running on CPU with bf16 autocast instead (no GradScaler)")
        amp = "bf16"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp]
    return dtype, amp == "fp16"


def build_optimizer(cfg, backbone, head):
    """Fused AdamW / SGD (CPU and CUDA): their kernels take a device-side `found_inf` and skip the whole update when
    it is non-zero, so a non-finite step is skipped without reading anything on the host."""
    groups = [{"params": list(backbone.parameters())}, {"params": list(head.parameters())}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class NonFiniteMonitor:
    """Device-side bookkeeping between two host reads: the sum of finite step losses of the window, the current run
    of non-finite steps, their count in the window, the global step of the last one and the step at which a run first
    reached `max_nonfinite` (0: never). record() launches a few tiny kernels and never syncs; read() is the one
    device->host transfer (with the cross-rank agreement on the stop flag) and starts a new window."""

    def __init__(self, device, start_step, max_nonfinite):
        f64 = dict(device=device, dtype=torch.float64)  # exact step numbers
        self.max_nonfinite = max_nonfinite
        self.step = torch.full((), float(start_step), **f64)  # mirrors global_step on the device
        self.consecutive = torch.zeros((), **f64)
        self.window_bad = torch.zeros((), **f64)
        self.last_bad = torch.zeros((), **f64)
        self.tripped = torch.zeros((), **f64)
        self.loss_sum = torch.zeros((), device=device)
        self.window_steps = 0

    @torch.no_grad()
    def record(self, step_loss, found_inf):
        bad = found_inf.to(torch.float64)
        self.step += 1
        self.consecutive = (self.consecutive + 1) * bad
        self.window_bad += bad
        self.last_bad = torch.where(bad > 0, self.step, self.last_bad)
        self.tripped = torch.where((self.tripped == 0) & (self.consecutive >= self.max_nonfinite), self.step,
                                   self.tripped)
        self.loss_sum += torch.where(found_inf > 0, torch.zeros_like(step_loss), step_loss)
        self.window_steps += 1

    @torch.no_grad()
    def read(self, stop_requested, distributed):
        """-> dict(stop, consecutive, window_bad, last_bad, tripped, window_steps, mean_loss). The stop flag and the
        counters are all-reduced MAX over ranks (counters are already equal: found_inf is all-reduced each step);
        the loss is this rank's own."""
        agreed = torch.stack([torch.full_like(self.consecutive, float(bool(stop_requested))), self.consecutive,
                              self.window_bad, self.last_bad, self.tripped])
        if distributed:
            all_reduce_max(agreed)
        stop, consecutive, window_bad, last_bad, tripped, loss_sum = torch.cat(
            [agreed, self.loss_sum.to(torch.float64).reshape(1)]).tolist()  # the one host read
        finite = self.window_steps - int(window_bad)
        out = {"stop": bool(stop), "consecutive": int(consecutive), "window_bad": int(window_bad),
               "last_bad": int(last_bad), "tripped": int(tripped), "window_steps": self.window_steps,
               "mean_loss": loss_sum / finite if finite else None, "finite_steps": finite}
        self.window_bad.zero_()
        self.loss_sum.zero_()
        self.window_steps = 0
        return out


def schedule(cfg, loader_len, world_size):
    """(batches used per epoch, optimiser steps per epoch); §3.3 with the loader as an upper bound."""
    batches = min(loader_len, cfg.num_image // (cfg.batch_size * world_size))
    steps = batches // cfg.gradient_acc
    if steps < 1:
        raise ValueError(f"num_image={cfg.num_image} gives no optimiser step per epoch at batch_size={cfg.batch_size}"
                         f" x world_size={world_size} x gradient_acc={cfg.gradient_acc}")
    return steps * cfg.gradient_acc, steps


def repartition_states(cfg, env, saved):
    """Resume from `saved` (this rank's checkpoint) when it was written by a different world size: merge the Partial
    FC shards (and their optimiser state) of all old ranks and cut this rank's shard."""
    old_world = saved["world_size"]
    paths = [ckpt.checkpoint_path(cfg.output, r) for r in range(old_world)]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"cannot re-partition the Partial FC shards for {env.world_size} rank(s): {path} is missing. The "
                f"previous run used {old_world} ranks and all of its checkpoint files (checkpoint_gpu_0.pt .. "
                f"checkpoint_gpu_{old_world - 1}.pt) are needed in the output folder {cfg.output}; copy them there, "
                f"or resume with {old_world} ranks")
    states = [ckpt.load(path) for path in paths]
    for path, state in zip(paths, states):
        if state.get("world_size") != old_world or state.get("global_step") != saved.get("global_step"):
            raise RuntimeError(
                f"cannot re-partition the Partial FC shards: {path} was written by a run of "
                f"{state.get('world_size')} rank(s) at global step {state.get('global_step')}, but this resume needs "
                f"the checkpoints of {old_world} rank(s) at global step {saved.get('global_step')}; the "
                f"checkpoint_gpu_*.pt files in {cfg.output} must all come from the same save of the previous run")
    merged = merge_shards([s["state_dict_softmax_fc"]["weight"] for s in states])
    saved["state_dict_softmax_fc"] = {"weight": shard_for_rank(merged, env.rank, env.world_size)}
    opt = saved["state_optimizer"]
    head_index = opt["param_groups"][1]["params"][0]
    head_state = {}
    for key, value in opt["state"].get(head_index, {}).items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == states[0]["state_dict_softmax_fc"][
                "weight"].shape[0]:
            full = merge_shards([s["state_optimizer"]["state"][head_index][key] for s in states])
            value = shard_for_rank(full, env.rank, env.world_size)
        head_state[key] = value
    if head_state:
        opt["state"][head_index] = head_state
    # the same samples were seen: convert the position inside the epoch to the new global batch
    seen = saved["step_in_epoch"] * cfg.gradient_acc * cfg.batch_size * old_world
    saved["step_in_epoch"] = seen // (cfg.gradient_acc * cfg.batch_size * env.world_size)
    return saved


def load_resume(cfg, env, logger):
    own = ckpt.checkpoint_path(cfg.output, env.rank)
    first = ckpt.checkpoint_path(cfg.output, 0)
    saved, used, error = None, None, None
    try:
        if not os.path.exists(first):
            logger.warning(f"resume=True but {first} does not exist; starting from scratch")
        else:
            used = own if os.path.exists(own) else first
            saved = ckpt.load(used)
            if saved["world_size"] != env.world_size:
                logger.info(f"checkpoint written by {saved['world_size']} ranks, running on {env.world_size}: "
                            "re-partitioning the Partial FC shards")
                saved = repartition_states(cfg, env, saved)
    except Exception as e:  # every rank still joins the agreement below, so the others fail too instead of hanging
        error = e
    if env.distributed:
        check_resume_agreement(cfg, env, saved, used, error)
    if error is not None:
        raise error
    return saved


def check_resume_agreement(cfg, env, saved, used, error):
    """Every rank must resume from the same save: gather (global step, file index) of all ranks and raise a clear
    error when they differ, e.g. a stale checkpoint_gpu_1.pt of an earlier 2-rank run next to the checkpoint_gpu_0.pt
    of a later 1-rank run (rank 1 would silently resume from an older step)."""
    step = -2 if error is not None else (-1 if saved is None else int(saved["global_step"]))
    index = -1 if used is None else int(os.path.basename(used)[len("checkpoint_gpu_"):-len(".pt")])
    rows = all_gather_tensor(torch.tensor([step, index], dtype=torch.int64, device=env.device))
    rows = [tuple(int(v) for v in row.tolist()) for row in rows]
    if error is not None:
        return  # this rank raises its own error
    if any(s == -2 for s, _ in rows):
        bad = [r for r, (s, _) in enumerate(rows) if s == -2]
        raise RuntimeError(f"resume failed on rank(s) {bad} (see their error); rank {env.rank} stops too")
    steps = {s for s, _ in rows}
    if len(steps) > 1:
        desc = ", ".join(f"rank {r}: " + (f"checkpoint_gpu_{i}.pt at global step {s}" if s >= 0 else "no checkpoint")
                         for r, (s, i) in enumerate(rows))
        raise RuntimeError(
            f"cannot resume: the ranks would continue from different checkpoints ({desc}) in {cfg.output}. The "
            "checkpoint_gpu_*.pt files there come from different saves, e.g. a stale file left by an earlier run "
            "with more ranks; keep only the files of the latest save (delete the older ones: a resume with a "
            "different world size re-partitions the Partial FC shards from checkpoint_gpu_0.pt .. of that save)")


def save_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch, step_in_epoch, global_step):
    """Per-rank resumable checkpoint (atomic)."""
    ckpt.atomic_save({
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "world_size": env.world_size, "rank": env.rank, "network": cfg.network,
        "state_dict_backbone": ckpt.unwrap(backbone).state_dict(),
        "state_dict_softmax_fc": head.state_dict(),
        "state_optimizer": optimizer.state_dict(),
        "state_lr_scheduler": scheduler.state_dict(),
        "state_scaler": scaler.state_dict() if scaler is not None else {},
        "rng": ckpt.rng_state(),
    }, ckpt.checkpoint_path(cfg.output, env.rank))


def export_onnx(cfg, backbone, logger):
    try:
        from tools.torch2onnx import export_onnx as export
        import onnx  # noqa: F401
    except ImportError as e:
        logger.warning(f"ONNX export skipped: {e}")
        return
    try:
        path = export(ckpt.unwrap(backbone), os.path.join(cfg.output, "model.onnx"),
                      img_size=getattr(ckpt.unwrap(backbone), "img_size", 112))
        logger.info(f"exported {path}")
    except Exception as e:  # an export problem must never lose a finished training run
        logger.warning(f"ONNX export failed: {e!r}")


def train(cfg, env, stop=None):
    """Run training. `stop(global_step) -> bool` is polled on the host after every optimiser step (SIGTERM/SIGINT
    handler in main(); tests use it to interrupt at a chosen step): a world of one saves and stops at that step;
    several ranks latch the request and agree on it at the next logging interval or epoch end (module docstring).
    Returns {"status": "finished"|"preempted"|"nonfinite",
    "global_step": int}."""
    logger = init_logging(env.rank, cfg.output)
    # temp files of saves interrupted by a kill: each rank removes those of its own files
    own_files = [os.path.basename(ckpt.checkpoint_path(cfg.output, env.rank))] + (["model.pt"] if env.rank == 0 else [])
    for path in ckpt.remove_stale_temp_files(cfg.output, own_files):
        logger.info(f"removed {path}, left by a save that was interrupted")
    seed_everything(cfg.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if env.rank == 0:
        logger.info("config:\n" + "\n".join(f"  {k}: {cfg[k]!r}" for k in sorted(cfg)))
    amp_dtype, use_scaler = resolve_amp(cfg, env.device, logger)

    loader = get_dataloader(cfg.rec, env.local_rank, cfg.batch_size, dali=cfg.dali, seed=cfg.seed,
                            num_workers=cfg.num_workers, num_classes=cfg.num_classes)
    batches_per_epoch, steps_per_epoch = schedule(cfg, len(loader), env.world_size)
    total_step = steps_per_epoch * cfg.num_epoch
    warmup_step = steps_per_epoch * cfg.warmup_epoch

    backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs).to(env.device)
    is_vit = hasattr(backbone, "patch_size")
    head = PartialFC(CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list, cfg.interclass_filtering_threshold),
                     cfg.embedding_size, cfg.num_classes, cfg.sample_rate, amp_dtype).to(env.device)
    optimizer = build_optimizer(cfg, backbone, head)
    head.register_optimizer(optimizer)
    scheduler = PolyScheduler(optimizer, cfg.lr, total_step, warmup_step)
    scaler = torch.amp.GradScaler("cuda", growth_interval=100) if use_scaler else None

    start_epoch, start_in_epoch, global_step = 0, 0, 0
    pending_rng = None
    saved = load_resume(cfg, env, logger) if cfg.resume else None
    if saved is not None:
        backbone.load_state_dict(saved["state_dict_backbone"])
        head.load_state_dict(saved["state_dict_softmax_fc"])
        optimizer.load_state_dict(saved["state_optimizer"])
        scheduler.load_state_dict(saved["state_lr_scheduler"])
        if scaler is not None and saved["state_scaler"]:
            scaler.load_state_dict(saved["state_scaler"])
        if saved["world_size"] == env.world_size:
            pending_rng = saved["rng"]
        start_epoch, start_in_epoch, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
        if start_in_epoch >= steps_per_epoch:
            start_epoch, start_in_epoch = start_epoch + 1, 0
        logger.info(f"resumed at epoch {start_epoch}, step {start_in_epoch} of the epoch, global step {global_step}")
        del saved

    model = backbone
    if env.distributed:
        model = DistributedDataParallel(backbone, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                        broadcast_buffers=False, bucket_cap_mb=16,
                                        find_unused_parameters=is_vit)  # as released (ViT aux outputs vary by switch)
    model.train()
    head.train()

    writer = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
    log_callback = CallBackLogging(cfg.frequent, total_step, cfg.batch_size * cfg.gradient_acc, env.world_size,
                                   global_step, writer, logger)
    verify = CallBackVerification(cfg.val_targets, cfg.rec, writer=writer, logger=logger) if env.rank == 0 else None
    loss_meter = AverageMeter()
    monitor = NonFiniteMonitor(env.device, global_step, cfg.max_nonfinite_steps)
    stop_requested = False  # host flag, latched
    status = "finished"
    autocast = dict(device_type=env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def sync_point():
        """The host read (monitor.read). -> (stop agreed by the ranks, non-finite limit reached). Logs non-finite
        steps of the window, and the error when the limit was reached."""
        state = monitor.read(stop_requested, env.distributed)
        if state["finite_steps"] and env.rank == 0:
            loss_meter.update(state["mean_loss"], state["finite_steps"])
        if state["window_bad"]:
            logger.warning(f"non-finite loss in {state['window_bad']} of the last {state['window_steps']} step(s), "
                           f"the last at global step {state['last_bad']} ({state['consecutive']} in a row now); "
                           "their updates were skipped")
        if state["tripped"]:
            logger.error(f"stopping at global step {global_step}: the loss was non-finite for "
                         f"{cfg.max_nonfinite_steps} consecutive steps (reached at global step {state['tripped']}, "
                         f"last non-finite at global step {state['last_bad']}); checkpoints in {cfg.output} were not "
                         "overwritten — lower lr, use amp=bf16/none or check the data, then resume")
        return state["stop"], bool(state["tripped"])

    def save_for_stop(epoch, step_in_epoch):
        save_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch, step_in_epoch, global_step)
        barrier()
        logger.warning(f"stop requested: saved a resumable checkpoint at global step {global_step} (epoch "
                       f"{epoch}, step {step_in_epoch} of {steps_per_epoch}) in {cfg.output}; continue with "
                       "--opts resume=True")

    for epoch in range(start_epoch, cfg.num_epoch):
        loader.sampler.set_epoch(epoch)
        skip = start_in_epoch * cfg.gradient_acc if epoch == start_epoch else 0
        if skip:
            loader.sampler.set_start_batch(skip)
        step_in_epoch = skip // cfg.gradient_acc
        if pending_rng is not None and not skip:
            ckpt.set_rng_state(pending_rng)
            pending_rng = None
        step_loss = torch.zeros((), device=env.device)
        read_at = None  # global step of the last sync_point
        for batch_idx, (images, labels) in enumerate(loader, start=skip):
            if batch_idx >= batches_per_epoch:
                break
            if pending_rng is not None:
                # mid-epoch: the uninterrupted run drew the loader's base seed before this step, so restore after
                ckpt.set_rng_state(pending_rng)
                pending_rng = None
            last_micro = (batch_idx + 1) % cfg.gradient_acc == 0
            if cfg.dpap:
                with torch.no_grad(), torch.autocast(**autocast):
                    _, patch_weights, _ = backbone(images, return_aux=True)
                images = dpap(images, patch_weights.float(), top_k=cfg.dpap_top_k, prob=cfg.dpap_prob,
                              patch_size=backbone.patch_size, alpha=cfg.dpap_alpha)
            sync_ctx = model.no_sync() if env.distributed and not last_micro else torch.enable_grad()
            with sync_ctx:
                with torch.autocast(**autocast):
                    if cfg.ehsm:
                        embeddings, _, patch_entropy = model(images, return_aux=True)
                        weights = ehsm_weights(patch_entropy.float(), gamma=cfg.ehsm_gamma, top_k=cfg.ehsm_top_k,
                                               measure=cfg.ehsm_measure, reduction=cfg.ehsm_reduction)
                    else:
                        embeddings, weights = model(images), None
                loss = head(embeddings, labels, weights)
                scaled = loss / cfg.gradient_acc
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_loss += loss.detach() / cfg.gradient_acc
            if not last_micro:
                continue

            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.grad_clip)
            # 1.0 when the loss is NaN/Inf on any rank; stays on the device (a collective, no host read)
            found_inf = all_reduce_max((~torch.isfinite(step_loss)).float())
            if scaler is not None:
                # GradScaler finds inf/nan in the unscaled gradients itself and skips the update (documented torch
                # behaviour; with these fused optimisers it passes its found_inf to the kernel without a host read)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.found_inf = found_inf  # the fused kernel skips params, moments and the step count
                try:
                    optimizer.step()
                finally:
                    del optimizer.found_inf
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            monitor.record(step_loss, found_inf)
            step_loss = torch.zeros((), device=env.device)
            if stop is not None and not stop_requested:
                stop_requested = bool(stop(global_step))  # host flag only

            stop_now = False
            if global_step % cfg.frequent == 0 or (stop_requested and not env.distributed):
                read_at = global_step
                stop_now, nonfinite = sync_point()
                if nonfinite:
                    status = "nonfinite"
                    break
            if global_step % cfg.frequent == 0 and env.rank == 0:
                log_callback(global_step, loss_meter, epoch, scheduler.get_last_lr()[0],
                             scaler.get_scale() if scaler is not None else None)
            if verify is not None and global_step % cfg.verbose == 0:
                verify(global_step, backbone)
            if stop_now:
                save_for_stop(epoch, step_in_epoch)
                status = "preempted"
                break
        if status != "finished":
            break
        # epoch end: read the counters (and agree on a stop) before anything is saved
        stop_now = False
        if read_at != global_step:
            stop_now, nonfinite = sync_point()
            if nonfinite:
                status = "nonfinite"
                break
        if cfg.save_all_states or stop_now:
            save_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch + 1, 0, global_step)
        if env.rank == 0:
            ckpt.atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        if stop_now:
            barrier()
            logger.warning(f"stop requested: saved a resumable checkpoint at global step {global_step} (end of "
                           f"epoch {epoch}) in {cfg.output}; continue with --opts resume=True")
            status = "preempted"
            break

    if status == "finished" and env.rank == 0:
        ckpt.atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        if cfg.export_onnx:
            export_onnx(cfg, backbone, logger)
    if writer is not None:
        writer.close()
    return {"status": status, "global_step": global_step}


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.config, args.opts)
    env = setup_distributed(args.local_rank)
    requested = {"signal": None}

    def on_signal(signum, frame):
        requested["signal"] = signum  # acted on after the current optimiser step, on every rank together

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    code = 0
    try:
        result = train(cfg, env, stop=lambda step: requested["signal"] is not None)
        if result["status"] == "nonfinite":
            code = EXIT_NONFINITE
        elif result["status"] == "preempted":
            if requested["signal"] is not None:
                reason = f"interrupted by signal {requested['signal']}"
            else:  # this rank got no signal: the cross-rank stop flag was raised by another rank
                reason = "stopped because another rank requested a stop (it received SIGTERM/SIGINT)"
            print(f"rank {env.rank}: {reason}; state saved at global step {result['global_step']}", file=sys.stderr)
    finally:
        cleanup_distributed()
    if env.distributed:
        # gloo processes sometimes abort in interpreter teardown after all work is done (REFERENCE §7); everything
        # is written and the group is destroyed, so leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    from utils.cli import run_main  # a bad config, checkpoint or dataset: one line "error: ...", exit 2

    warnings.filterwarnings("ignore", message=".*torch.distributed.launch.*")
    run_main(main)
