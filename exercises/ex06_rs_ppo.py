"""Exercises for chapter 06 (paper Sec. 3.2.3: rejection sampling and PPO). Check with:
    python exercises/check.py gae      (or any name below; `python exercises/check.py` lists them)
Shapes in PPO: a rollout batch holds `rows` answers laid out in `T` answer columns; mask (rows, T)
is 1.0 on an answer's tokens up to and including its EOS, 0.0 on the padding after it.
"""
import importlib

import torch  # noqa: F401

import _setup  # noqa: F401

R = importlib.import_module("05_reward")   # R.pad_attention_mask
RL = importlib.import_module("06_rs_ppo")  # RL.masked_mean, RL.SAFETY_THRESHOLD


def logit(p, eps: float = 1e-6):
    """The inverse of the sigmoid, log(p / (1 - p)) (Sec. 3.2.3: the reward is WHITEN(LOGIT(Rc))).
    p is clamped to [eps, 1 - eps] first, so a score of exactly 0 or 1 gives a finite value.
    Shapes: p any shape -> the same shape.
    Hint: torch.log(p) - torch.log1p(-p) is more accurate than log(p / (1 - p)) near 1."""
    raise NotImplementedError


def whiten(x, mean, std):
    """WHITEN of Sec. 3.2.3 with fixed statistics: (x - mean) / (std + 1e-8).
    Shapes: x any shape; mean, std floats -> x's shape.
    Hint: the 1e-8 keeps a zero std from dividing by zero."""
    raise NotImplementedError


def combined_reward(helpful, safety, is_safety, threshold: float = RL.SAFETY_THRESHOLD):
    """Sec. 3.2.3's piecewise reward: Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh.
    helpful (Rh), safety (Rs): scores in (0, 1); is_safety: bool, IS_SAFETY(p).
    Shapes: all (n,) -> (logit(Rc), Rc), both (n,).
    Hint: torch.where(condition, safety, helpful), the condition being is_safety | (safety < threshold);
    use the chapter's RL.logit (your own logit is checked separately)."""
    raise NotImplementedError


def best_of_k(scores):
    """Rejection sampling (Sec. 3.2.3): of K samples per prompt, keep the one the reward scores best.
    Shapes: scores (prompts, K) -> (indices (prompts,) long, best scores (prompts,)).
    Hint: scores.max(dim=1) gives both."""
    raise NotImplementedError


def kl_rewards(logp, ref_logp, score, mask, beta: float):
    """PPO's per-token reward (Sec. 3.2.3, Eq. 4-ish: R(g|p) = R~c(g|p) - beta D_KL(pi_theta || pi_0)):
    -beta * (log pi - log pi_0) at every answer token (the KL penalty, paid where it is incurred),
    plus the whitened score added at the last real token of each row (its EOS).
    Shapes: logp, ref_logp, mask (rows, T); score (rows,) -> (rewards (rows, T), KL summed over each
    answer (rows,)). Both are zero on the padding.
    Hint: the last real token of row i is at column mask[i].sum() - 1, not at column T - 1
    (a shorter answer is padded on the right)."""
    raise NotImplementedError


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016), the advantages PPO uses:
        delta_t = r_t + gamma V_{t+1} - V_t,     A_t = delta_t + gamma lam A_{t+1}
    computed backwards over the answer's columns, with r, V and A zero past an answer's end
    (whatever rewards and values hold on the padding must not leak in).
    Shapes: rewards, values, mask (rows, T) -> (advantages (rows, T), returns = A + V (rows, T)),
    both zero on the padding.
    Hint: multiply rewards and values by mask first; carry next_value and next_advantage (rows,)
    from t = T-1 down to 0."""
    raise NotImplementedError


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2):
    """PPO's clipped surrogate (Schulman et al. 2017; Sec. 3.2.3): with ratio = exp(logp - old_logp),
    loss = masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
    Shapes: logp, old_logp, advantages, mask (rows, T) -> (loss scalar, stats dict) with the floats
      clip_frac:  masked mean of (clipped term > unclipped term)
      approx_kl:  masked mean of ratio - 1 - log_ratio (the k3 estimator of KL(old || new))
      ratio:      masked mean of ratio
      max_log_ratio: max of |log_ratio| * mask
    (compute the stats under torch.no_grad() and .item() them).
    Hint: RL.masked_mean(x, mask) = (x * mask).sum() / mask.sum().clamp(min=1); torch.max, not min,
    since the terms are negated: it is the pessimistic bound."""
    raise NotImplementedError


def value_loss(values, old_values, returns, mask, clip_eps: float = 0.2):
    """The clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2), where
    V_clip = old_values + clamp(values - old_values, -eps, eps) keeps the new values near the old.
    Shapes: values, old_values, returns, mask (rows, T) -> a scalar.
    Hint: RL.masked_mean; the max (not the min) of the two squared errors."""
    raise NotImplementedError


def rollout_batch(samples, pad_id: int, device):
    """A batch of rollouts laid out for PPO: prompts LEFT-padded and answers RIGHT-padded, so every
    answer starts at the same column width_p = the longest prompt's length.
    samples: [(prompt ids, answer ids, finished)]; an answer ends with its EOS when finished.
    Returns (tokens (rows, width_p + width_a) long filled with pad_id around the real tokens,
    real (rows, same) bool, True on every real token, mask (rows, width_a) float, 1.0 on each
    answer's tokens, width_p), tensors on `device`.
    Hint: mark real tokens by their positions, never by comparing with pad_id: Llama has no pad
    piece, and where pad_id == eos_id the EOS would vanish from the mask."""
    raise NotImplementedError


def answer_logprobs(model, tokens, real, start: int, temperature: float):
    """log pi(token | prefix) of each answer token (columns start, start+1, ...), as PPO needs for the
    ratio and the KL. The logits come from model(tokens, mask=R.pad_attention_mask(real)) and must
    be divided by the sampling temperature: the rollouts were sampled from softmax(logits / T).
    Shapes: tokens, real (rows, width); start = width_p -> (rows, width - start) float32.
    Hint: the logits at column j predict the token at j + 1: take columns start-1 ... width-2,
    log_softmax them and gather the tokens at columns start ... width-1."""
    raise NotImplementedError
