"""Train a TransFace (or arcface_torch CNN) face-recognition backbone with a Partial FC head.

    torchrun --nproc_per_node=8 train.py --config configs/ms1mv2_vit_s.py
    python -m torch.distributed.launch --nproc_per_node=8 train.py        # the release's line: glint360k_vit_s
    python train.py configs/tiny_cpu.py --opts batch_size=16 amp=none    # positional config, as arcface_torch

The step is train_step(); host syncs, non-finite steps, stop requests and preemption, and where this loop differs
from the released train.py are described in docs/training_loop.md.
"""
import argparse
import contextlib
import logging
import os
import random
import sys
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from backbones import get_model
from dataset import get_dataloader
import finetune
from dpap import dpap
from losses import build_margin_loss, ehsm_weights
from lr_scheduler import PolyScheduler
from partial_fc import PartialFC
from utils import checkpoint as ckpt
from utils.amp import AMP_DTYPES, resolve_amp
from utils.cli import UserError
from utils.distributed import (all_reduce_max, barrier, cleanup_distributed, failure_line, setup_distributed,
                               wrap_ddp)
from utils.nonfinite import NonFiniteMonitor, log_window
from utils.resume import CheckpointSaver
from utils.stop import StopRequest
from utils.utils_callbacks import CallBackLogging, CallBackVerification
from utils.utils_config import get_config
from utils.utils_logging import AverageMeter, init_logging, log_config
from utils.writer import build_writer

EXIT_NONFINITE = 3
DEFAULT_CONFIG = "configs/glint360k_vit_s.py"  # the released train.py's default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="TransFace training")
    parser.add_argument("config_file", nargs="?", default=None, help="config file as a positional argument "
                        "(arcface_torch's train_v2.py style); same as --config")
    parser.add_argument("--config", default=None, help=f"config file (default: {DEFAULT_CONFIG}, as released)")
    # torch.distributed.launch passes --local-rank=N (new) or --local_rank=N (old torch); torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key=value, e.g. lr=0.01 amp=bf16")
    args = parser.parse_args(argv)
    if args.config and args.config_file and args.config != args.config_file:
        parser.error(f"two configs given: {args.config_file} and --config {args.config}")
    args.config = args.config or args.config_file or DEFAULT_CONFIG
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg, env):
    """Logger, leftovers of interrupted saves, seeds, the AMP mode in the log. -> (logger, AMP dtype or None, the
    torch.autocast kwargs)."""
    logger = init_logging(env.rank, cfg.output)
    # temp files of saves interrupted by a kill: each rank removes those of its own files
    own_files = [os.path.basename(ckpt.checkpoint_path(cfg.output, env.rank))] + (["model.pt"] if env.rank == 0 else [])
    for path in ckpt.remove_stale_temp_files(cfg.output, own_files):
        logger.info(f"removed {path}, left by a save that was interrupted")
    seed_everything(cfg.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(cfg.amp, env.device)
    if cfg.amp == "fp16" and amp != "fp16":
        logger.warning("amp=fp16 needs CUDA; running on CPU with bf16 autocast instead (no GradScaler)")
    elif cfg.amp == "auto":
        logger.info(f"amp=auto: {amp} on {env.device.type}")
    amp_dtype = AMP_DTYPES[amp]
    return logger, amp_dtype, dict(device_type=env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def build_data(cfg, env, logger):
    """-> (loader, optimiser steps per epoch, total steps, warm-up steps); rank 0 logs the config as released."""
    loader = get_dataloader(cfg.rec, env.local_rank, cfg.batch_size, dali=cfg.dali, seed=cfg.seed,
                            num_workers=cfg.num_workers, num_classes=cfg.num_classes)
    steps_per_epoch = count_steps(cfg, len(loader), env.world_size)
    total_step, warmup_step = steps_per_epoch * cfg.num_epoch, steps_per_epoch * cfg.warmup_epoch
    if env.rank == 0:  # the release's config dump and derived schedule, for the scripts that parse it
        log_config(logger, cfg, env.world_size, warmup_step, total_step)
    return loader, steps_per_epoch, total_step, warmup_step


def count_steps(cfg, loader_len, world_size):
    """Optimiser steps per epoch: num_image samples per epoch, the loader's length as an upper bound."""
    steps = min(loader_len, cfg.num_image // (cfg.batch_size * world_size)) // cfg.gradient_acc
    if steps < 1:
        raise ValueError(f"num_image={cfg.num_image} gives no optimiser step per epoch at batch_size={cfg.batch_size}"
                         f" x world_size={world_size} x gradient_acc={cfg.gradient_acc}")
    return steps


def build_optimizer(cfg, backbone, head):
    """Fused AdamW / SGD (CPU and CUDA): their kernels take a device-side `found_inf` and skip the whole update when
    it is non-zero, so a non-finite step is skipped without reading anything on the host. The backbone's groups carry
    their LR multipliers (finetune.py), the head is the last group."""
    if cfg.backbone_lr_scale == 0:  # frozen: autograd records nothing in the backbone, no backward runs through it
        backbone.requires_grad_(False)
    groups = finetune.backbone_param_groups(backbone, cfg.backbone_lr_scale, cfg.layer_decay)
    groups.append({"params": list(head.parameters())})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def build_model(cfg, env, amp_dtype, total_step, warmup_step):
    """Backbone, Partial FC head, optimiser, LR schedule and GradScaler (fp16 only, else None)."""
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs).to(env.device)
    head = PartialFC(build_margin_loss(cfg), cfg.embedding_size, cfg.num_classes, cfg.sample_rate, amp_dtype)
    head = head.to(env.device)
    if cfg.compile:
        backbone.compile()  # in place: state_dict keys, DDP and checkpoints see the plain module
    optimizer = build_optimizer(cfg, backbone, head)
    head.register_optimizer(optimizer)
    scheduler = PolyScheduler(optimizer, cfg.lr, total_step, warmup_step)
    scaler = torch.amp.GradScaler("cuda", growth_interval=100) if amp_dtype == torch.float16 else None
    backbone.train(cfg.backbone_lr_scale > 0)  # a frozen backbone runs as in evaluation (no BN updates, no masking)
    head.train()
    return backbone, head, optimizer, scheduler, scaler


def train_step(model, head, optimizer, scheduler, scaler, cfg, micro_batches, autocast):
    """One optimiser step over `micro_batches`, cfg.gradient_acc (images, labels) pairs. `model` is the backbone or
    its DDP wrapper, `scaler` a GradScaler (fp16) or None, `autocast` the torch.autocast kwargs.
    -> (step loss, found_inf): 0-dim tensors left on the device (no host read)."""
    backbone = ckpt.unwrap(model)
    step_loss = torch.zeros((), device=head.weight.device)
    for i, (images, labels) in enumerate(micro_batches):
        if cfg.dpap:  # no-grad forward in train mode -> patch weights -> perturbed batch
            with torch.no_grad(), torch.autocast(**autocast):
                _, patch_weights, _ = backbone(images, return_aux=True)
            images = dpap(images, patch_weights.float(), top_k=cfg.dpap_top_k, prob=cfg.dpap_prob,
                          patch_size=backbone.patch_size, alpha=cfg.dpap_alpha)
        # DDP all-reduces the gradients with the backward of the last micro-batch only
        last = i == len(micro_batches) - 1
        ddp_skip = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if ddp_skip else contextlib.nullcontext():
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

    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.grad_clip)
    # 1.0 when the loss is NaN/Inf on any rank; stays on the device (a collective, no host read)
    found_inf = all_reduce_max((~torch.isfinite(step_loss)).float())
    if scaler is not None:
        # GradScaler finds inf/nan in the unscaled gradients itself and skips the update; with these fused
        # optimisers it hands its found_inf to the kernel without a host read
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
    return step_loss, found_inf


def build_callbacks(cfg, env, logger, total_step, global_step):
    """-> (scalar writer: TensorBoard and optionally W&B, logging callback, verification callback); writer and
    verification on rank 0 only."""
    writer = build_writer(cfg) if env.rank == 0 else None  # TensorBoard, and W&B with using_wandb
    log_callback = CallBackLogging(cfg.frequent, total_step, cfg.batch_size * cfg.gradient_acc, env.world_size,
                                   global_step, writer, logger)
    verify = CallBackVerification(cfg.val_targets, cfg.rec, writer=writer, logger=logger) if env.rank == 0 else None
    return writer, log_callback, verify


def save_final_model(cfg, backbone, logger):
    """model.pt at the end of training, and its ONNX export when asked for."""
    ckpt.atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
    if cfg.export_onnx:
        export_onnx(cfg, backbone, logger)


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
    """Run training; `stop(global_step) -> bool` is polled after every optimiser step (main() passes a StopRequest,
    tests a lambda). -> {"status": "finished" | "preempted" | "nonfinite", "global_step": int}."""
    # ---- setup, data
    logger, amp_dtype, autocast = setup(cfg, env)
    cfg = finetune.fit_to_batch(cfg, env.world_size, logger)  # lr for this run's total batch (cfg.lr_scaling)
    loader, steps_per_epoch, total_step, warmup_step = build_data(cfg, env, logger)

    # ---- backbone, Partial FC head, optimiser and schedule; resume; the checkpoint writer
    modules = build_model(cfg, env, amp_dtype, total_step, warmup_step)
    backbone, head, optimizer, scheduler, scaler = modules
    start_epoch, start_in_epoch, global_step, pending_rng = (  # a resume, else step 0 (from cfg.init's weights)
        finetune.start(cfg, env, logger, steps_per_epoch, modules))
    saver = CheckpointSaver(cfg, env, logger, modules, global_step)

    model = wrap_ddp(backbone, env)  # a frozen backbone stays unwrapped: it has no gradients to all-reduce

    # ---- logging, verification and the device-side non-finite monitor
    writer, log_callback, verify = build_callbacks(cfg, env, logger, total_step, global_step)
    loss_meter = AverageMeter()
    monitor = NonFiniteMonitor(env.device, global_step, cfg.max_nonfinite_steps)
    stop_requested, status = False, "finished"  # stop_requested: host flag, latched

    def sync_point():
        """The one host read. -> the stop agreed by the ranks; sets status "nonfinite" when the limit was reached."""
        nonlocal status
        saver.check()  # a failed background save ends the run here
        state = monitor.read(stop_requested, env.distributed, saver.minutes_due())
        saver.minutes_agreed = state["save"]
        if state["finite_steps"] and env.rank == 0:
            loss_meter.update(state["mean_loss"], state["finite_steps"])
        log_window(state, logger, global_step, cfg.max_nonfinite_steps, cfg.output)
        if state["tripped"]:
            status = "nonfinite"
        return state["stop"]

    # ---- loop
    for epoch in range(start_epoch, cfg.num_epoch):
        loader.sampler.set_epoch(epoch)
        first = start_in_epoch if epoch == start_epoch else 0
        if first:
            loader.sampler.set_start_batch(first * cfg.gradient_acc)
        elif pending_rng is not None:
            ckpt.set_rng_state(pending_rng)
            pending_rng = None
        batches, read_at, stop_now = iter(loader), None, False
        for step_in_epoch in range(first + 1, steps_per_epoch + 1):
            micro_batches = [next(batches) for _ in range(cfg.gradient_acc)]
            if pending_rng is not None:
                # mid-epoch: the uninterrupted run drew the loader's base seed before this step, so restore after
                ckpt.set_rng_state(pending_rng)
                pending_rng = None
            step_loss, found_inf = train_step(model, head, optimizer, scheduler, scaler, cfg, micro_batches, autocast)
            global_step += 1
            monitor.record(step_loss, found_inf)
            if stop is not None and not stop_requested:
                stop_requested = bool(stop(global_step))  # host flag only

            if global_step % cfg.frequent == 0 or (stop_requested and not env.distributed):
                read_at, stop_now = global_step, sync_point()
            if status == "nonfinite":
                break
            if global_step % cfg.frequent == 0 and env.rank == 0:
                log_callback(global_step, loss_meter, epoch, scheduler.get_last_lr()[-1],
                             scaler.get_scale() if scaler is not None else None)
            if verify is not None and global_step % cfg.verbose == 0:
                verify(global_step, backbone)
            if stop_now:
                break
            if saver.due(global_step, synced=read_at == global_step):
                saver.save(epoch, step_in_epoch, global_step)
        mid_epoch = stop_now  # agreed at a step of the epoch (its last one too): save that position, no model.pt
        if read_at != global_step:  # epoch end: read the counters (and agree on a stop) before anything is saved
            stop_now = sync_point()
        if status == "nonfinite":
            break
        if mid_epoch or cfg.save_all_states or stop_now:
            saver.save(*((epoch, step_in_epoch) if mid_epoch else (epoch + 1, 0)), global_step)
        if env.rank == 0 and not mid_epoch:
            ckpt.atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        if stop_now:
            saver.close()  # on disk before anyone says so
            barrier()
            where = (f"epoch {epoch}, step {step_in_epoch} of {steps_per_epoch}" if mid_epoch
                     else f"end of epoch {epoch}")
            logger.warning(f"stop requested: saved a resumable checkpoint at global step {global_step} ({where}) in "
                           f"{cfg.output}; continue with --opts resume=True")
            status = "preempted"
            break

    saver.close()
    if status == "finished" and env.rank == 0:
        save_final_model(cfg, backbone, logger)
    if writer is not None:
        writer.close()
    return {"status": status, "global_step": global_step}


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.config, args.opts)
    env = setup_distributed(args.local_rank, cfg.dist_timeout_minutes)
    stop = StopRequest().install()  # SIGTERM/SIGINT: save after the current step, on every rank together
    code = 0
    try:
        result = train(cfg, env, stop=stop)
        if result["status"] == "nonfinite":
            code = EXIT_NONFINITE
        elif result["status"] == "preempted":
            print(f"rank {env.rank}: {stop.reason()}; state saved at global step {result['global_step']}",
                  file=sys.stderr)
    except Exception as error:  # a dead or hung peer, OOM, ...: say which rank failed where (a user error says itself)
        if env.distributed and not isinstance(error, UserError):
            logging.getLogger("transface").error(failure_line(env.rank, stop.global_step, cfg.dist_timeout_minutes,
                                                              error))
        raise
    finally:
        cleanup_distributed()
    if env.distributed:
        # gloo processes sometimes abort in interpreter teardown after all work is done; everything is written and
        # the group is destroyed, so leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    from utils.cli import run_main  # a bad config, checkpoint or dataset: one line "error: ...", exit 2

    warnings.filterwarnings("ignore", message=".*torch.distributed.launch.*")
    run_main(main)
