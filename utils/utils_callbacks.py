"""Rank-0 callbacks of the training loop: periodic logging and verification on .bin pairs (docs/training.md)."""
import os
import time

from eval import verification


class CallBackLogging:
    """Every `frequent` global steps: samples/s (all ranks), mean loss, LR, epoch, global step, grad scale, ETA."""

    def __init__(self, frequent, total_step, batch_size, world_size, start_step=0, writer=None, logger=None):
        self.frequent, self.total_step = frequent, total_step
        self.batch_size, self.world_size = batch_size, world_size
        self.start_step, self.writer, self.logger = start_step, writer, logger
        self.tic = None
        self.init_time = time.time()

    def __call__(self, global_step, loss_meter, epoch, lr, grad_scale=None):
        if global_step % self.frequent != 0:
            return
        now = time.time()
        if self.tic is None:  # first call: nothing measured yet
            self.tic = now
            return
        speed = self.frequent * self.batch_size * self.world_size / max(now - self.tic, 1e-9)
        done = global_step - self.start_step
        elapsed_h = (now - self.init_time) / 3600
        eta_h = elapsed_h / max(done, 1) * (self.total_step - global_step)
        scale = f"Fp16 Grad Scale: {grad_scale:.0f}   " if grad_scale is not None else ""
        self.logger.info(f"Speed {speed:.2f} samples/sec   Loss {loss_meter.avg:.4f}   LearningRate {lr:.6f}   "
                         f"Epoch: {epoch}   Global Step: {global_step}   {scale}Required: {eta_h:.1f} hours")
        if self.writer is not None:
            self.writer.add_scalar("loss", loss_meter.avg, global_step)
            self.writer.add_scalar("learning_rate", lr, global_step)
            self.writer.add_scalar("time_for_end", eta_h, global_step)
            self.writer.add_scalar("samples_per_sec", speed, global_step)
        loss_meter.reset()
        self.tic = now


class CallBackVerification:
    """Every `verbose` global steps, evaluate `<rec>/<name>.bin` for each name of val_targets that exists."""

    def __init__(self, val_targets, rec_prefix, image_size=(112, 112), writer=None, logger=None, batch_size=10):
        self.writer, self.logger, self.batch_size = writer, logger, batch_size
        self.names, self.sets, self.best = [], [], []
        for name in val_targets:
            path = os.path.join(rec_prefix, name + ".bin")
            if not os.path.exists(path):
                logger.warning(f"verification set {path} not found; skipped")
                continue
            self.names.append(name)
            self.sets.append(verification.load_bin(path, image_size))
            self.best.append(0.0)

    def __call__(self, global_step, backbone):
        if not self.sets:
            return []
        was_training = backbone.training
        backbone.eval()
        results = []
        for i, (name, data_set) in enumerate(zip(self.names, self.sets)):
            _, _, acc, std, xnorm, _ = verification.test(data_set, backbone, self.batch_size, nfolds=10)
            self.best[i] = max(self.best[i], acc)
            self.logger.info(f"[{name}][{global_step}]XNorm: {xnorm:.6f}")
            self.logger.info(f"[{name}][{global_step}]Accuracy-Flip: {acc:.5f}+-{std:.5f}")
            self.logger.info(f"[{name}][{global_step}]Accuracy-Highest: {self.best[i]:.5f}")
            if self.writer is not None:
                self.writer.add_scalar(f"{name}/accuracy", acc, global_step)
                self.writer.add_scalar(f"{name}/xnorm", xnorm, global_step)
            results.append((name, acc, std, xnorm))
        backbone.train(was_training)
        return results
