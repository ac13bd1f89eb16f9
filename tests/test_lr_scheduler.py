import warnings

import pytest
import torch

from lr_scheduler import PolyScheduler


def formula(e, base, t, w, power=2):
    if e < w:
        return base * e / w
    return base * (1 - (e - w) / (t - w)) ** power


def make(base=0.1, t=50, w=10, power=2, groups=2):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=base)
    return opt, PolyScheduler(opt, base_lr=base, max_steps=t, warmup_steps=w, power=power)


def lrs_over(opt, sched, n):
    """lr the optimizer holds at the start of each of the next n iterations (step() after each)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        assert all(g["lr"] == out[-1] for g in opt.param_groups)
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("power", [2, 1])
def test_values_follow_formula(power):
    base, t, w = 0.1, 50, 10
    opt, sched = make(base, t, w, power)
    got = lrs_over(opt, sched, t)
    # iteration i (0-based) uses lr(i): warm-up from 0, peak at e=W, last iteration lr(T-1) > 0
    assert got == [formula(e, base, t, w, power) for e in range(t)]
    assert got[0] == 0.0 and got[w] == base and got[w - 1] == base * (w - 1) / w
    assert got[-1] == pytest.approx(base * (1 / (t - w)) ** power, rel=1e-9) and got[-1] > 0
    assert sched.get_last_lr() == [0.0, 0.0]  # lr(T) after the final step()


def test_no_warmup_and_past_end():
    opt, sched = make(1.0, 10, 0)
    assert lrs_over(opt, sched, 12)[:10] == [(1 - e / 10) ** 2 for e in range(10)]
    assert opt.param_groups[0]["lr"] == 0.0  # clamped after T
    with pytest.raises(ValueError):
        make(1.0, 10, 10)


def test_ms1mv2_schedule_spot_values():
    base, t, w = 1e-3, 49735, 4263  # MS1MV2, bs 512x8, 35 epochs, 3 warm-up epochs
    _, sched = make(base, t, w)
    assert sched.lr_at(0) == 0.0
    assert sched.lr_at(19) == 1e-3 * 19 / 4263  # the release logs 0.000004 at step 20
    assert f"{sched.lr_at(19):.6f}" == "0.000004"
    assert sched.lr_at(w) == 1e-3
    assert sched.lr_at(w + 1) == 1e-3 * (1 - 1 / (t - w)) ** 2
    assert sched.lr_at(27000) == formula(27000, base, t, w)
    assert sched.lr_at(t - 1) == pytest.approx(1e-3 * (1 / 45472) ** 2, rel=1e-9)  # never 0


def test_state_dict_resume_is_exact():
    opt, sched = make()
    lrs_over(opt, sched, 17)
    state = sched.state_dict()
    expected = lrs_over(opt, sched, 20)

    opt2, sched2 = make()  # fresh optimizer (lr(0)) and scheduler, only the scheduler state restored
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 17
    assert lrs_over(opt2, sched2, 20) == expected


def test_no_warnings_on_construction_and_step():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt, sched = make()
        lrs_over(opt, sched, 3)
