"""AdamW, schedule, clipping and accumulation against torch.optim.AdamW + LambdaLR + clip_grad_norm_."""
import numpy as np
import pytest

from deelm.train.optim import AdamW, GradientAccumulator, LinearWarmupDecay, clip_grad_norm

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

SHAPES = [(8, 24), (40, 8), (8, 16), (16, 8), (3,)]


def torch_setup(flat, lr, wd, warmup, total, betas=(0.9, 0.999), eps=1e-8):
    from transformers import get_linear_schedule_with_warmup

    params, off = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        params.append(torch.nn.Parameter(torch.from_numpy(flat[off:off + n].reshape(s).copy())))
        off += n
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    return params, opt, get_linear_schedule_with_warmup(opt, warmup, total)


def torch_step(params, opt, sched, flat_grad, max_norm):
    off = 0
    for p in params:
        n = p.numel()
        p.grad = torch.from_numpy(flat_grad[off:off + n].reshape(p.shape).copy())
        off += n
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm else None
    opt.step()
    sched.step()
    return norm


def torch_flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


def random_grads(n_steps, size, seed):
    rng = np.random.default_rng(seed)
    # Magnitudes vary so that clipping acts on some steps and not on others.
    return [(rng.standard_normal(size) * rng.choice([0.01, 0.1, 1.0])).astype(np.float32)
            for _ in range(n_steps)]


@pytest.mark.parametrize("wd, warmup, max_norm", [(0.01, 5, 1.0), (0.0, 0, None), (0.1, 3, 0.3)])
def test_matches_torch_over_20_steps(wd, warmup, max_norm):
    size = sum(int(np.prod(s)) for s in SHAPES)
    flat = np.random.default_rng(1).standard_normal(size).astype(np.float32)
    steps, lr = 20, 1e-2
    params, opt, sched = torch_setup(flat, lr, wd, warmup, steps)
    mine = AdamW(flat.copy(), lr=lr, weight_decay=wd, schedule=LinearWarmupDecay(warmup, steps))
    clipped = 0
    for g in random_grads(steps, size, seed=2):
        ref_norm = torch_step(params, opt, sched, g, max_norm)
        lr_used = opt.param_groups[0]["lr"]
        g = g.copy()
        if max_norm:
            norm = clip_grad_norm(g, max_norm)
            np.testing.assert_allclose(norm, ref_norm.item(), rtol=1e-6)
            clipped += norm > max_norm
        mine.step(g)
        np.testing.assert_allclose(mine.params, torch_flat(params), rtol=1e-6, atol=1e-7)
        # The schedule is stepped after the optimiser: both now show the next step's lr.
        assert mine.current_lr() == pytest.approx(lr_used, rel=1e-12, abs=1e-15)
    if max_norm:
        assert 0 < clipped < steps
    assert mine.step_count == steps and mine.current_lr() == 0.0


def test_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, 7, 30)
    mine = LinearWarmupDecay(7, 30)
    for step in range(35):
        assert mine(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
        opt.step()
        sched.step()
    with pytest.raises(ValueError):
        LinearWarmupDecay(-1, 10)
    with pytest.raises(ValueError):
        LinearWarmupDecay(0, 0)


def test_clip_semantics():
    g = np.array([3.0, 4.0], dtype=np.float32)
    assert clip_grad_norm(g, 10.0) == pytest.approx(5.0)
    # torch multiplies by max_norm / (norm + 1e-6) even when barely below 1.
    np.testing.assert_allclose(g, [3.0, 4.0], rtol=1e-6)
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.linalg.norm(g), 1.0, rtol=1e-6)
    bad = np.array([np.nan, 1.0], dtype=np.float32)
    with pytest.raises(FloatingPointError):
        clip_grad_norm(bad, 1.0, error_if_nonfinite=True)
    assert np.isnan(clip_grad_norm(bad, 1.0))
    with pytest.raises(TypeError):
        clip_grad_norm(np.zeros(2), 1.0)


def test_state_dict_resume_is_exact():
    size = 50
    rng = np.random.default_rng(3)
    start = rng.standard_normal(size).astype(np.float32)
    grads = random_grads(12, size, seed=4)
    full = AdamW(start.copy(), lr=1e-2, schedule=LinearWarmupDecay(2, 12))
    for g in grads:
        full.step(g)
    half = AdamW(start.copy(), lr=1e-2, schedule=LinearWarmupDecay(2, 12))
    for g in grads[:6]:
        half.step(g)
    state = half.state_dict()
    resumed = AdamW(half.params.copy(), lr=123.0)
    resumed.load_state_dict(state)
    for g in grads[6:]:
        resumed.step(g)
    assert np.array_equal(resumed.params, full.params)
    state["exp_avg"] = np.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        resumed.load_state_dict(state)


def test_params_are_updated_in_place_and_validated():
    buf = np.ones(4, dtype=np.float32)
    opt = AdamW(buf, lr=0.1)
    opt.step(np.ones(4, dtype=np.float32))
    assert opt.params is buf and (buf < 1).all()
    with pytest.raises(ValueError, match="gradient has 3"):
        opt.step(np.ones(3, dtype=np.float32))
    for bad in (np.ones(4), np.ones((2, 2), dtype=np.float32), np.ones(8, dtype=np.float32)[::2]):
        with pytest.raises(TypeError):
            AdamW(bad)
    with pytest.raises(ValueError):
        AdamW(np.ones(2, dtype=np.float32), betas=(0.9, 1.0))


def test_accumulation_equals_the_mean_loss_gradient():
    size = 30
    grads = random_grads(5, size, seed=6)
    acc = GradientAccumulator(size, steps=2)
    assert acc.add(grads[0]) is False and acc.add(grads[1]) is True
    np.testing.assert_allclose(acc.take(), (grads[0] + grads[1]) / 2, rtol=1e-6)
    assert acc.count == 0 and not acc.grad.any()
    acc.add(grads[2])                       # a short last window: its mean, not half of it
    np.testing.assert_allclose(acc.take(), grads[2], rtol=1e-6)
    with pytest.raises(ValueError, match="no gradient"):
        acc.take()
    with pytest.raises(ValueError):
        GradientAccumulator(size, steps=0)

    # The same with torch: two backward passes of loss / 2 sum into .grad.
    w = torch.nn.Parameter(torch.zeros(size))
    for g in grads[3:5]:
        ((w * torch.from_numpy(g)).sum() / 2).backward()
    acc.add(grads[3])
    acc.add(grads[4])
    np.testing.assert_allclose(acc.take(), w.grad.numpy(), rtol=1e-6)
