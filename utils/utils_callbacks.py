"""Rank-0 callbacks of the training loop: periodic logging and verification on .bin pairs (docs/training.md).

The line layouts are the release's, character for character (%-formatting as there), for the scripts that parse
training.log: "Speed ... samples/sec   Loss ...   LearningRate ...   Epoch: ...   Global Step: ...   " then
"Fp16 Grad Scale: ...   Required: ... hours" (with a GradScaler) or "Required: ... hours"; "[name][step]XNorm: ...",
"[name][step]Accuracy-Flip: ...+-...", "[name][step]Accuracy-Highest: ...".
"""
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
        # the release's ETA: whole seconds so far over the steps done (+1), times the steps left (-1)
        per_step = int(now - self.init_time) / (global_step - self.start_step + 1)
        eta_h = per_step * max(self.total_step - global_step - 1, 0) / 3600
        msg = "Speed %.2f samples/sec   Loss %.4f   LearningRate %.6f   Epoch: %d   Global Step: %d   " % (
            speed, loss_meter.avg, lr, epoch, global_step)
        if grad_scale is not None:
            msg += "Fp16 Grad Scale: %2.f   Required: %1.f hours" % (grad_scale, eta_h)
        else:
            msg += "Required: %1.f hours" % eta_h
        self.logger.info(msg)
        if self.writer is not None:
            self.writer.add_scalar("loss", loss_meter.avg, global_step)
            self.writer.add_scalar("learning_rate", lr, global_step)
            self.writer.add_scalar("time_for_end", eta_h, global_step)
            self.writer.add_scalar("samples_per_sec", speed, global_step)
            if grad_scale is not None:
                self.writer.add_scalar("grad_scale", grad_scale, global_step)
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
            self.logger.info("[%s][%d]XNorm: %f" % (name, global_step, xnorm))
            self.logger.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f" % (name, global_step, acc, std))
            self.logger.info("[%s][%d]Accuracy-Highest: %1.5f" % (name, global_step, self.best[i]))
            if self.writer is not None:
                self.writer.add_scalar(f"{name}/accuracy", acc, global_step)
                self.writer.add_scalar(f"{name}/xnorm", xnorm, global_step)
            results.append((name, acc, std, xnorm))
        backbone.train(was_training)
        return results
