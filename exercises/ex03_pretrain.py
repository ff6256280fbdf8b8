"""Exercises for chapter 03 (paper Sec. 2.2, "Training Details"). Check with:
    python exercises/check.py get_lr        (or configure_optimizer)
"""
import math  # noqa: F401

import torch  # noqa: F401

import _setup  # noqa: F401


def get_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """The learning rate at `step` (0-based), Sec. 2.2: "a cosine learning rate schedule, with
    warmup of 2000 steps, and decay final learning rate down to 10% of the peak".
      step < warmup_steps: linear warm-up, peak_lr * (step + 1) / warmup_steps
      afterwards: progress = (step - warmup_steps) / (total_steps - warmup_steps), at most 1, and
        lr = peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress)))
    Shapes: plain Python floats.
    Hint: guard the division with max(1, total_steps - warmup_steps); past total_steps the rate
    stays at min_ratio * peak_lr."""
    raise NotImplementedError


def configure_optimizer(model, lr: float, weight_decay: float, betas, eps: float, device):
    """AdamW (Sec. 2.2: beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1) with two parameter
    groups: weight decay on the weight matrices of the linear layers (p.dim() >= 2), none on
    the RMSNorm gains (1-d) nor on the token embedding ("tok_embeddings" in the name). Only
    parameters with requires_grad. Returns torch.optim.AdamW(groups, lr=lr, betas=tuple(betas),
    eps=eps, fused=device.type == "cuda").
    Shapes: model -> an optimizer whose groups hold every trainable parameter exactly once.
    Hint: decay shrinks a parameter toward 0 every step; a norm's gain is a scale (shrinking it
    shrinks the activations), and an embedding row of a rare token would fade between uses."""
    raise NotImplementedError
