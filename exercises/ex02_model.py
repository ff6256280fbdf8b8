"""Exercises for chapter 02 (paper Sec. 2.2 and A.2.1: the architecture). Check with:
    python exercises/check.py rmsnorm      (or apply_rotary_emb, repeat_kv, feed_forward, causal_mask)
Once they pass, the micro model built from your pieces gives the chapter's logits, with and
without the KV cache.
"""
import math  # noqa: F401

import torch  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F  # noqa: F401

import _setup  # noqa: F401
import importlib

M = importlib.import_module("02_model")   # M.ModelArgs, M.ffn_hidden_dim, M.precompute_freqs_cis


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019; Sec. 2.2 "pre-normalization using RMSNorm"):
    y = x / sqrt(mean(x^2 over the last axis) + eps) * weight. No mean subtraction, no bias.
    Shapes: x (..., dim) -> (..., dim), in x's dtype; weight: a Parameter of ones, shape (dim,),
    named `weight` (so the chapter's checkpoints load into it).
    Hint: compute in float32 (x.float()), cast back with .type_as(x), then multiply by weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        raise NotImplementedError

    def forward(self, x):
        raise NotImplementedError


def apply_rotary_emb(x, freqs_cis):
    """RoPE (Su et al. 2021; Sec. 2.2): rotate each channel pair (2i, 2i+1) of a query or key at
    position m by the angle m * theta^(-2i/d):
        (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos)
    Shapes: x (batch, seq, heads, head_dim); freqs_cis (2, seq, 1, head_dim/2) holding
    cos and sin (M.precompute_freqs_cis) -> (batch, seq, heads, head_dim), in x's dtype.
    Hint: pairs are interleaved, as in Meta's weights (not the two halves, as Hugging Face's):
    x.float().unflatten(-1, (-1, 2)).unbind(-1) gives the even and odd channels."""
    raise NotImplementedError


def repeat_kv(x, n_rep: int):
    """Grouped-query attention (Ainslie et al. 2023; Sec. 2.2 and A.2.1): n_kv_heads key/value
    heads each serve n_rep query heads. Kv head j must come out as heads j*n_rep ... j*n_rep+n_rep-1.
    Shapes: (batch, seq, n_kv_heads, head_dim) -> (batch, seq, n_kv_heads * n_rep, head_dim).
    Hint: x[:, :, :, None, :].expand(...) then reshape; or repeat_interleave on dim 2 (a copy).
    n_rep == 1 may return x itself."""
    raise NotImplementedError


class FeedForward(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020; Sec. 2.2): w2(silu(w1 x) * w3 x).
    __init__ creates three bias-free nn.Linear named w1 (dim -> hidden, the gate), w2
    (hidden -> dim, down) and w3 (dim -> hidden, up), with hidden = M.ffn_hidden_dim(args)
    (2/3 of 4*dim, rounded up to args.multiple_of: three matrices cost what two did).
    Shapes: x (batch, seq, dim) -> (batch, seq, dim).
    Hint: F.silu(z) = z * sigmoid(z); the gate is w1, not w3."""

    def __init__(self, args: M.ModelArgs):
        super().__init__()
        raise NotImplementedError

    def forward(self, x):
        raise NotImplementedError


def causal_mask(seqlen: int, start_pos: int, device):
    """The causal mask when seqlen new tokens continue start_pos tokens already in the KV cache:
    query i sits at position start_pos + i and may attend to every key at a position <= its own.
    Shapes: -> bool (seqlen, start_pos + seqlen), True where attending is allowed.
    Hint: compare torch.arange(start_pos, start_pos + seqlen)[:, None] with
    torch.arange(start_pos + seqlen)[None, :]; a plain .tril() is right only when start_pos == 0."""
    raise NotImplementedError
