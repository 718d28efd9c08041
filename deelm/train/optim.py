"""AdamW, its learning-rate schedule, gradient clipping and accumulation on one flat buffer.

All LoRA parameters live in one contiguous float32 array (see
:class:`deelm.adapters.lora.LoraLayout`), and so do their gradients; the optimiser
updates that array in place. Keeping one buffer means one vectorised update
per step instead of a Python loop over tensors.

Semantics are PyTorch's, so a run can be compared step by step with a torch +
PEFT run: ``torch.optim.AdamW`` (decoupled weight decay, bias correction, eps
added after the square root), ``torch.nn.utils.clip_grad_norm_`` (scale by
``max_norm / (norm + 1e-6)`` when that is below 1) and transformers'
``get_linear_schedule_with_warmup`` (linear warm-up from 0, then linear decay
to 0; the multiplier for an optimiser step is the schedule at the number of
steps already taken, so with warm-up the very first step has learning rate 0,
exactly as with ``LambdaLR``). Arithmetic is float32 in the same order as
torch's single-tensor AdamW, so the two agree to float32 rounding.
"""
import math

import numpy as np


class LinearWarmupDecay:
    """Learning-rate multiplier: ``step / warmup`` while warming up, then linear to 0 at ``total``.

    Same formula as transformers' ``get_linear_schedule_with_warmup``; ``step``
    is the number of optimiser steps already taken.
    """

    def __init__(self, warmup_steps, total_steps):
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got "
                             f"{warmup_steps} and {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        return max(0.0, float(self.total_steps - step)
                   / float(max(1, self.total_steps - self.warmup_steps)))

    def state_dict(self):
        return {"warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def __repr__(self):
        return f"LinearWarmupDecay(warmup_steps={self.warmup_steps}, total_steps={self.total_steps})"


def grad_norm(grad):
    """Global L2 norm of a gradient buffer, accumulated in float64, returned as float32.

    torch accumulates a float32 norm with wider internal sums; float64 then
    rounding matches it to the last bit or two.
    """
    g = np.asarray(grad).reshape(-1)
    return np.float32(math.sqrt(float(np.dot(g.astype(np.float64, copy=False),
                                             g.astype(np.float64, copy=False)))))


def clip_grad_norm(grad, max_norm, error_if_nonfinite=False):
    """Scales `grad` in place so its global L2 norm is at most `max_norm`; returns the norm before.

    torch.nn.utils.clip_grad_norm_ semantics: the factor is
    ``min(1, max_norm / (norm + 1e-6))``. A NaN or infinite norm raises with
    ``error_if_nonfinite``, otherwise (as in torch) it propagates into `grad`:
    check the returned norm before stepping.
    """
    if not isinstance(grad, np.ndarray) or grad.dtype != np.float32:
        raise TypeError("grad must be a float32 NumPy array (it is scaled in place)")
    total = grad_norm(grad)
    if error_if_nonfinite and not np.isfinite(total):
        raise FloatingPointError(f"the total gradient norm is {float(total)}: cannot clip")
    coef = np.float32(max_norm) / (total + np.float32(1e-6))
    grad *= min(coef, np.float32(1.0))
    return float(total)


class AdamW:
    """torch.optim.AdamW on one flat float32 parameter buffer, updated in place.

    ``params`` is the buffer (1-D, contiguous, float32, writeable); ``lr`` the
    base learning rate, multiplied by ``schedule(step)`` when a schedule (any
    callable of the number of steps taken, e.g. :class:`LinearWarmupDecay`) is
    given. Defaults are torch's (weight decay 0.01).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 schedule=None):
        if not isinstance(params, np.ndarray) or params.dtype != np.float32 or params.ndim != 1 \
                or not params.flags.c_contiguous or not params.flags.writeable:
            raise TypeError("params must be a writeable, contiguous 1-D float32 NumPy array")
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0):
            raise ValueError(f"need lr, eps and weight_decay >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        self.params = params
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.schedule = schedule
        self.step_count = 0
        self.exp_avg = np.zeros_like(params)
        self.exp_avg_sq = np.zeros_like(params)
        self._tmp = np.empty_like(params)

    def current_lr(self):
        """The learning rate the next step will use."""
        return self.lr * (self.schedule(self.step_count) if self.schedule is not None else 1.0)

    def step(self, grad):
        """One AdamW update of ``params`` with `grad` (same size); returns the learning rate used."""
        g = np.asarray(grad).reshape(-1)
        if g.shape != self.params.shape:
            raise ValueError(f"gradient has {g.size} values, parameters {self.params.size}")
        g = g.astype(np.float32, copy=False)
        lr = self.current_lr()
        self.step_count += 1
        b1, b2 = self.betas
        p, m, v, tmp = self.params, self.exp_avg, self.exp_avg_sq, self._tmp
        if self.weight_decay != 0:
            p *= np.float32(1 - lr * self.weight_decay)
        np.subtract(g, m, out=tmp)                      # m.lerp_(g, 1 - b1)
        tmp *= np.float32(1 - b1)
        m += tmp
        v *= np.float32(b2)                             # v.mul_(b2).addcmul_(g, g, 1 - b2)
        np.multiply(g, g, out=tmp)
        tmp *= np.float32(1 - b2)
        v += tmp
        bias1 = 1 - b1 ** self.step_count
        bias2_sqrt = (1 - b2 ** self.step_count) ** 0.5
        np.sqrt(v, out=tmp)                             # denom = sqrt(v) / sqrt(bc2) + eps
        tmp /= np.float32(bias2_sqrt)
        tmp += np.float32(self.eps)
        np.divide(m, tmp, out=tmp)                      # p.addcdiv_(m, denom, -lr / bc1)
        tmp *= np.float32(-lr / bias1)
        p += tmp
        return lr

    def state_dict(self):
        """Everything needed to resume: hyper-parameters, step count and both moments (copies)."""
        return {
            "step": self.step_count, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
            "exp_avg": self.exp_avg.copy(), "exp_avg_sq": self.exp_avg_sq.copy(),
        }

    def load_state_dict(self, state):
        """Restores a :meth:`state_dict`; the moments must match the parameter count.

        A saved LinearWarmupDecay schedule replaces the current one, so a
        resumed run continues on the schedule it started with.
        """
        for key in ("exp_avg", "exp_avg_sq"):
            arr = np.asarray(state[key])
            if arr.shape != self.params.shape:
                raise ValueError(f"optimizer state {key!r} has shape {arr.shape}, "
                                 f"parameters {self.params.shape}")
        self.exp_avg[...] = state["exp_avg"]
        self.exp_avg_sq[...] = state["exp_avg_sq"]
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.eps = float(state["eps"])
        self.weight_decay = float(state["weight_decay"])
        if state.get("schedule"):
            self.schedule = LinearWarmupDecay(**state["schedule"])


class GradientAccumulator:
    """Sums micro-batch gradients into one float32 buffer and hands out their mean.

    ``add`` returns True once ``steps`` micro-batches are in (time to step);
    ``take`` returns the mean over the micro-batches added (so a short last
    window at the end of an epoch is not under-weighted) and clears the buffer.
    The mean of micro-batch gradients equals the gradient of the mean loss, as
    a trainer dividing each loss by ``steps`` gets.
    """

    def __init__(self, size, steps=1):
        if steps < 1:
            raise ValueError(f"accumulation steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.grad = np.zeros(int(size), dtype=np.float32)
        self.count = 0

    def add(self, grad):
        g = np.asarray(grad).reshape(-1)
        if g.shape != self.grad.shape:
            raise ValueError(f"gradient has {g.size} values, accumulator {self.grad.size}")
        self.grad += g
        self.count += 1
        return self.count >= self.steps

    def take(self):
        if self.count == 0:
            raise ValueError("no gradient accumulated")
        out = self.grad / np.float32(self.count)
        self.grad[...] = 0
        self.count = 0
        return out
