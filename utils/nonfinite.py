"""Device-side bookkeeping of non-finite steps between two host reads (docs/training_loop.md)."""
import torch

from utils.distributed import all_reduce_max


class NonFiniteMonitor:
    """Keeps, on the device, the sum of the finite step losses of the window, the current run of non-finite steps,
    their count in the window, the global step of the last one and the step at which a run first reached
    `max_nonfinite` (0: never). record() launches a few tiny kernels and never syncs; read() is the one
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
    def read(self, stop_requested, distributed, save_due=False):
        """-> dict(stop, save, consecutive, window_bad, last_bad, tripped, window_steps, mean_loss, finite_steps). The
        stop and save flags and the counters are all-reduced MAX over ranks (counters are already equal: found_inf
        is all-reduced each step); the loss is this rank's own."""
        flags = [float(bool(stop_requested)), float(bool(save_due))]
        agreed = torch.stack([*(torch.full_like(self.consecutive, flag) for flag in flags), self.consecutive,
                              self.window_bad, self.last_bad, self.tripped])
        if distributed:
            all_reduce_max(agreed)
        stop, save, consecutive, window_bad, last_bad, tripped, loss_sum = torch.cat(
            [agreed, self.loss_sum.to(torch.float64).reshape(1)]).tolist()  # the one host read
        finite = self.window_steps - int(window_bad)
        out = {"stop": bool(stop), "save": bool(save), "consecutive": int(consecutive), "window_bad": int(window_bad),
               "last_bad": int(last_bad), "tripped": int(tripped), "window_steps": self.window_steps,
               "mean_loss": loss_sum / finite if finite else None, "finite_steps": finite}
        self.window_bad.zero_()
        self.loss_sum.zero_()
        self.window_steps = 0
        return out


def log_window(state, logger, global_step, max_nonfinite, output):
    """Log what read() found: the non-finite steps of the window, and the error when a run reached the limit."""
    if state["window_bad"]:
        logger.warning(f"non-finite loss in {state['window_bad']} of the last {state['window_steps']} step(s), "
                       f"the last at global step {state['last_bad']} ({state['consecutive']} in a row now); "
                       "their updates were skipped")
    if state["tripped"]:
        logger.error(f"stopping at global step {global_step}: the loss was non-finite for "
                     f"{max_nonfinite} consecutive steps (reached at global step {state['tripped']}, "
                     f"last non-finite at global step {state['last_bad']}); checkpoints in {output} were not "
                     "overwritten — lower lr, use amp=bf16/none or check the data, then resume")
