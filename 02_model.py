"""
Chapter 02: the Llama 2 transformer (paper Sec. 2.2, Table 1, Appendix A.2.1).

Llama 2 keeps Llama 1's architecture: a decoder-only transformer with
pre-normalisation by RMSNorm, the SwiGLU feed-forward, rotary position
embeddings (RoPE), no biases, and an output head not tied to the input
embedding. New in Llama 2: context 4096 and grouped-query attention (GQA) in
the 34B and 70B models. The names below are Meta's (llama/model.py), so a
reader can diff the two files and Meta's weights load with no key map.

The file reads in the paper's order: the sizes (Table 1), RMSNorm, RoPE, GQA
attention, SwiGLU, the pre-norm block, the transformer and its cost, then
generation with a KV cache (eager, or one compiled decoding step read against
the memory-bandwidth roofline); each opens with the sentence of the paper it
implements. The plumbing follows: checkpoints in our, Meta's and Hugging Face's
formats, the device, the command line.
Why it is over ~600 lines: it reads and writes Meta's and Hugging Face's formats, so real weights load.

Run it:
    python 02_model.py                        # presets: params and FLOPs, then a random toy model generates
    python 02_model.py --ckpt llama-2-7b --prompt "The capital of France is" --device cuda --dtype bf16
        # finds tokenizer.model in llama-2-7b/ or beside it, where Meta's download puts it
    python 02_model.py --ckpt runs/toy/pretrain.pt --export-hf out/hf   # opens with transformers,
        # model and tokenizer (AutoTokenizer, with Meta's chat template)
    python 02_model.py --compile-decode       # the same, decoding with the compiled step

What to look at: the preset table's params column, where 7B, 13B and 70B should
equal the released models' counts (README, chapter 02), which says the shapes
are Meta's; the kv column, 8 for 34B and 70B (GQA); and the FLOPs per token,
which chapter 03 turns into MFU. The random model's tokens are noise: they show
that the prefill and the KV-cache steps run, not what a model knows (chapter 03
trains one). The last line sets the tokens/s beside the bytes a decoding step reads:
decoding is bound by memory, and the gap to the bandwidth is launch overhead.

Meta's folders (params.json + consolidated.*.pth), Hugging Face folders
(config.json + *.safetensors or *.bin) and our own .pt checkpoints all load
through `Transformer.from_pretrained(path)`.
"""
import argparse
import importlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

tokenizer_chapter = importlib.import_module("01_tokenizer")
UserError, run_cli, number_flag = tokenizer_chapter.UserError, tokenizer_chapter.run_cli, tokenizer_chapter.number_flag


# ============================================================================
# The method, in the paper's order (Sec. 2.2, Table 1, Appendix A.2.1): each section opens
# with the sentence it implements.
# ============================================================================

# ----------------------------------------------------------------------------
# Sizes (Sec. 2.2, Table 1). "The primary architectural differences from Llama 1
# include increased context length and grouped-query attention (GQA)." (Sec. 2.2)
# Table 1 gives each size's context and GQA; dim, layers and heads come from Meta's
# params.json. Field names and defaults are those of Meta's ModelArgs and params.json,
# so `ModelArgs(**json.load(open("params.json")))` just works.

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None      # None = n_heads (plain multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256                # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096               # Llama 2 doubled Llama 1's 2048


PRESETS = {
    # toy sizes for a CPU (vocab_size is replaced by the tokenizer's at run time)
    "micro": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                       multiple_of=32, max_seq_len=256),
    "toy": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096,
                     multiple_of=64, max_seq_len=512),
    "small": ModelArgs(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, vocab_size=4096,
                       multiple_of=64, max_seq_len=1024),
    # ~1B for one GPU (TinyLlama's shape: 22 layers, GQA with 4 kv heads)
    "1B": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),
    # the released Llama 2 shapes (Table 1 and Meta's params.json)
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "34B": ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3),
}


# ----------------------------------------------------------------------------
# RMSNorm (Sec. 2.2). "apply pre-normalization using RMSNorm (Zhang and Sennrich,
# 2019)": LayerNorm without the mean subtraction and the bias. Cheaper, and it works
# as well. Computed in float32 for stability.

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ----------------------------------------------------------------------------
# RoPE (Sec. 2.2, after Llama 1's Sec. 2.2): "add rotary positional embeddings (RoPE),
# introduced by Su et al. (2021), at each layer of the network." Each pair of channels
# (2i, 2i+1) of a query or key at position m is rotated by the angle m * theta^(-2i/d).
# A dot product of two rotated vectors then depends only on the offset between their
# positions, which is all attention needs. Read as a complex number a + ib, a pair rotates
# by multiplying it with cos + i sin: (a cos - b sin) + i (a sin + b cos). Meta writes it so;
# gpt-fast writes the two real lines out, which torch.compile fuses into one kernel. We do both:
# written out under torch.compile, one complex multiply in eager mode, where the written-out
# form runs seven kernels on strided halves (on 2 CPU cores at 03's shape, 13x slower forward and
# 3x with the backward: README, chapter 02). The two compute the same products and sums, so their
# results are equal to the bit (a test).
# Pairs are interleaved (2i, 2i+1) as in Meta's weights; Hugging Face rotates halves
# instead, which is why its q/k rows are permuted (see load_hf below).

def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim))
    angles = torch.outer(torch.arange(end, device="cpu").float(), freqs)   # (end, head_dim/2)
    # (2, end, 1, head_dim/2): cos and sin, with an axis of 1 that broadcasts over the heads
    return torch.stack([angles.cos(), angles.sin()])[:, :, None, :]


def apply_rotary_emb(x, freqs_cis):
    """x: (batch, seq, heads, head_dim); freqs_cis: (2, seq, 1, head_dim/2)."""
    cos, sin = freqs_cis
    pairs = x.float().unflatten(-1, (-1, 2))   # (..., head_dim/2, 2): channels 2i and 2i+1
    if torch.compiler.is_compiling():
        even, odd = pairs.unbind(-1)
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.complex(cos, sin))
    return rotated.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------
# Attention with grouped-query attention (GQA, Ainslie et al. 2023; Sec. 2.2, A.2.1):
# "For larger models, where KV cache size becomes a bottleneck, key and value
# projections can be shared across multiple heads without much degradation of
# performance" (A.2.1). n_heads query heads share n_kv_heads key/value heads, so the
# KV cache is n_heads/n_kv_heads times smaller at inference.

def repeat_kv(x, n_rep: int):
    """(batch, seq, n_kv_heads, head_dim) -> (batch, seq, n_kv_heads * n_rep, head_dim)."""
    if n_rep == 1:
        return x
    b, s, n_kv, d = x.shape
    return x[:, :, :, None, :].expand(b, s, n_kv, n_rep, d).reshape(b, s, n_kv * n_rep, d)


def plain_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v, written out: the same maths as SDPA, for reading and tests.
    q, k, v: (batch, heads, seq, head_dim); mask: bool, True where attending is allowed."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores.float(), dim=-1).type_as(q) @ v


def decode_attention(q, k, v, mask, n_rep: int):
    """plain_attention for one new position a row (decode_step), with GQA and no copy of the cache:
    the n_rep query heads that share a kv head are the rows of one matmul against its keys.
    q: (batch, heads, 1, head_dim); k, v: (batch, kv_heads, cache, head_dim); mask: (batch, 1, 1,
    cache). Written out, torch.compile fuses it; SDPA's CPU kernel is slow for a single query."""
    bsz, n_heads, _, head_dim = q.shape
    q = q.view(bsz, n_heads // n_rep, n_rep, head_dim)           # head kv * n_rep + r, as repeat_kv
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)        # (batch, kv_heads, n_rep, cache)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = F.softmax(scores.float(), dim=-1).type_as(q) @ v        # (batch, kv_heads, n_rep, head_dim)
    return out.view(bsz, n_heads, 1, head_dim)


def additive_mask(mask, dtype):
    """A bool mask (True where attending is allowed) as SDPA applies it: 0 there, -inf elsewhere,
    added to the scores. SDPA converts a bool mask so at every call, in the forward and again in
    the backward; converted once, the mask serves every layer: the same numbers, so the same
    result to the bit (a test), and a toy SFT step 3-6% faster on a CPU (README, how long the
    recipe takes). Under autocast the scores are in autocast's dtype, which the mask takes."""
    if mask.dtype != torch.bool:
        return mask
    if torch.is_autocast_enabled(mask.device.type):
        dtype = torch.get_autocast_dtype(mask.device.type)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def causal_mask(seqlen: int, start_pos: int, device):
    """(seqlen, start_pos + seqlen) bool: query i (at position start_pos + i) sees keys <= its position."""
    q_pos = torch.arange(start_pos, start_pos + seqlen, device=device)[:, None]
    k_pos = torch.arange(start_pos + seqlen, device=device)[None, :]
    return k_pos <= q_pos


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.use_sdpa = True          # False: plain_attention (same result, slower)
        self.cache_k = self.cache_v = None   # set by Transformer.setup_cache for generation

    def forward(self, x, start_pos, freqs_cis, mask):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))       # (bsz, heads, seq, head_dim)
        if self.cache_k is not None:
            # KV cache: keys and values of earlier positions are kept, so each
            # new token costs one row of attention instead of a full forward.
            # Laid out (batch, heads, position, head_dim), as attention reads it: Meta's
            # (batch, position, heads, head_dim) hands attention a strided view, which on
            # a CPU made each decoding step markedly slower (README, chapter 02).
            if torch.is_tensor(start_pos):   # decode_step: one token a row, each at its own position
                column = start_pos.view(-1, 1, 1, 1).expand(bsz, self.n_kv_heads, 1, self.head_dim)
                self.cache_k[:bsz].scatter_(2, column, k)
                self.cache_v[:bsz].scatter_(2, column, v)
                width = mask.shape[-1]   # the columns the mask spans: the whole cache when compiled
                k, v = self.cache_k[:bsz, :, :width], self.cache_v[:bsz, :, :width]
            else:
                self.cache_k[:bsz, :, start_pos:start_pos + seqlen] = k
                self.cache_v[:bsz, :, start_pos:start_pos + seqlen] = v
                k = self.cache_k[:bsz, :, :start_pos + seqlen]
                v = self.cache_v[:bsz, :, :start_pos + seqlen]

        if torch.is_tensor(start_pos):   # decode_step
            return self.wo(decode_attention(q, k, v, mask, self.n_rep).transpose(1, 2).reshape(bsz, seqlen, -1))
        if not self.use_sdpa:   # GQA spelled out: each kv head serves n_rep query heads
            k, v = (repeat_kv(t.transpose(1, 2), self.n_rep).transpose(1, 2) for t in (k, v))
        # SDPA shares the kv heads itself (enable_gqa) and reads the cache in place, where
        # repeat_kv would copy the whole cache in every layer at every decoding step
        gqa = self.n_rep > 1
        if not self.use_sdpa:
            out = plain_attention(q, k, v, mask)
        elif mask is None:                                       # plain causal: fused kernels
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=gqa)
        else:   # (an additive mask in another dtype than the scores' is cast: SDPA needs theirs)
            mask = mask if mask.dtype in (torch.bool, q.dtype) else mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


# ----------------------------------------------------------------------------
# SwiGLU feed-forward (Sec. 2.2): "use the SwiGLU activation function (Shazeer,
# 2020)", at Llama 1's width (its Sec. 2.2): "We use a dimension of 2/3 4d instead of
# 4d as in PaLM."

def ffn_hidden_dim(args: ModelArgs) -> int:
    # SwiGLU has three matrices instead of two, so the width 4*dim shrinks by
    # 2/3 to keep the parameter count (Shazeer 2020); Meta then scales it and
    # rounds it up to a multiple that suits the hardware: 7B -> 11008.
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = ffn_hidden_dim(args)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)   # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)   # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)   # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------
# The block (Sec. 2.2, after Llama 1's Sec. 2.2): "To improve the training stability,
# we normalize the input of each transformer sub-layer, instead of normalizing the
# output."

class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        # pre-normalisation (Llama 1 took it from GPT-3): each sub-layer reads a normalised
        # copy of the residual stream, which itself is never normalised: training stays stable
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------
# The transformer (Sec. 2.2): "We adopt most of the pretraining setting and model
# architecture from Llama 1." Embedding, the blocks, a last RMSNorm, an output head
# not tied to the embedding; the KV cache that generation fills.

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)   # not tied to the embedding
        # Meta precomputes twice the context, so generation can run a little past it.
        # A plain attribute, not a buffer: it stays float32 when the weights go to
        # bf16 (bf16 angles lose precision at long positions), and out of checkpoints.
        self.freqs_cis = precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len * 2,
                                              args.rope_theta)
        if self.output.weight.device.type != "meta":   # a meta model has shapes only: nothing to draw
            self.apply(self._init_weights)   # (and on meta, each draw costs ~1 ms of tracing)

    def _init_weights(self, module):
        # The paper does not give its initialisation; this is GPT-2's: N(0, 0.02),
        # with the projections into the residual stream (wo, w2) scaled down by
        # sqrt(2 * n_layers) so the stream's variance does not grow with depth.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, TransformerBlock):
            for w in (module.attention.wo.weight, module.feed_forward.w2.weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * self.args.n_layers))

    def features(self, tokens, start_pos: int = 0, mask=None):
        """Final hidden states (after the last RMSNorm): what the LM head, and
        later the reward model's scalar head (chapter 05), read."""
        bsz, seqlen = tokens.shape
        if not torch.is_tensor(start_pos):   # (a tensor is decode_step's position, which generate checked)
            if start_pos > 0 and self.layers[0].attention.cache_k is None:   # Meta's model always has its cache
                raise UserError(f"forward(tokens, start_pos={start_pos}) continues from the KV cache, and there is "
                                "none: call setup_cache(batch, max_seq_len) first, as generate() does (without it, "
                                "attention would see only the new tokens)")
            if start_pos + seqlen > self.freqs_cis.shape[1]:
                raise UserError(f"sequence of {start_pos + seqlen} tokens exceeds the model's "
                                f"RoPE table ({self.freqs_cis.shape[1]}); raise max_seq_len")
        if self.freqs_cis.device != tokens.device:
            # moved on first use, and outside inference mode even inside generate(): a table
            # made under inference_mode could not be saved for a later training step's backward
            with torch.inference_mode(False):
                self.freqs_cis = self.freqs_cis.to(tokens.device)
        h = self.tok_embeddings(tokens)
        if torch.is_tensor(start_pos):   # each row's own position: (2, rows, 1, 1, head_dim/2)
            freqs_cis = self.freqs_cis.index_select(1, start_pos)[:, :, None]
        else:
            freqs_cis = self.freqs_cis[:, start_pos:start_pos + seqlen]
        if mask is None and (start_pos > 0 and seqlen > 1 or not self.layers[0].attention.use_sdpa):
            mask = causal_mask(seqlen, start_pos, tokens.device)
        if mask is not None and self.layers[0].attention.use_sdpa and not torch.is_tensor(start_pos):
            mask = additive_mask(mask, h.dtype)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return self.norm(h)

    def forward(self, tokens, start_pos: int = 0, mask=None, logits_at=None):
        """tokens (batch, seq) -> logits (batch, seq, vocab), float32.
        start_pos: position of tokens[:, 0] (with the KV cache, the tokens already seen); in
        decode_step a tensor of each row's position (one token a row), the cache read under `mask`.
        mask: optional bool (seq, start_pos + seq) or (batch, 1, seq, start_pos + seq),
        True where attending is allowed; default causal.
        logits_at: optional bool (batch, seq): logits only where True, as (n_true, vocab) in
        row-major order. The output layer and its softmax cost as much as a few blocks of a small
        model, and most positions' logits go unread: SFT's loss reads only the answer tokens, PPO
        only the answer's, generation's prefill only the last position. They skip the rest (README's
        chapter 02 gives the shares)."""
        h = self.features(tokens, start_pos, mask)
        return self.output(h if logits_at is None else h[logits_at]).float()

    # -- the KV cache, only while generating --------------------------------
    def setup_cache(self, max_batch_size: int, max_seq_len: int):
        weight = self.output.weight   # the cache takes the weights' device and dtype
        for layer in self.layers:
            a = layer.attention
            shape = (max_batch_size, a.n_kv_heads, max_seq_len, a.head_dim)
            a.cache_k = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
            a.cache_v = torch.zeros(shape, device=weight.device, dtype=weight.dtype)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def set_attention(self, impl: str):
        """'sdpa' (F.scaled_dot_product_attention, fast) or 'plain' (plain_attention, to read)."""
        for layer in self.layers:
            layer.attention.use_sdpa = impl == "sdpa"

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, lazy: bool = False):
        """Load Meta's folder, a Hugging Face folder, or our own .pt checkpoint.
        lazy: the model stays on the meta device, its weights in their files (`pending`), until
        fill_from_state reads them a block at a time: what 03's shard_model does under --fsdp, so
        no rank ever holds the whole model in CPU memory (Meta's 70B: 8 shard files, joined)."""
        args, state = load_weights(path, lazy=lazy)
        with torch.device("meta"):
            model = cls(args)
        check_state_dict(model, state, path)
        if lazy:
            model.pending = (state, dtype)
            return model.eval()
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------
# Size and cost: each size's parameter count (Table 1's 7B ... 70B) and its training
# FLOPs per token, which chapter 03 turns into MFU (Sec. 2.2.1, Table 2's GPU-hours).

def meta_model(args: ModelArgs) -> Transformer:
    """A model on the meta device: shapes only, no memory, so even 70B builds in a blink."""
    with torch.device("meta"):
        return Transformer(args)


def count_params(args: ModelArgs) -> int:
    """The weights Transformer(args) holds, counted from its shapes (a test checks it against
    the built model's): embedding and output layer, and per block four attention matrices (k
    and v at the kv heads' width), three SwiGLU matrices and two RMSNorm gains."""
    kv_dim = (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    block = 2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * ffn_hidden_dim(args) + 2 * args.dim
    return 2 * args.vocab_size * args.dim + args.n_layers * block + args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward (PaLM, Appendix B):
    6 per weight that multiplies (all but the embedding lookup) plus attention's
    12 * layers * dim * seq_len for the q.k and attention.v products."""
    n_matmul = count_params(args) - args.vocab_size * args.dim
    return 6 * n_matmul + 12 * args.n_layers * args.dim * seq_len


# ----------------------------------------------------------------------------
# Generation (after Meta's generation.py; A.2.1): "A standard practice for
# autoregressive decoding is to cache the key (K) and value (V) pairs for the previous
# tokens in the sequence, speeding up attention computation." The prompts are read in
# one forward (the prefill), then each step adds one token to every row, and the KV
# cache makes that step cheap: it reads the cached keys and values, not the prefix. A
# Session keeps the cache from one call to the next, for a dialogue that goes on.

def sample_categorical(probs, generator=None):
    """One draw per row from probs (rows need not sum to 1), by inverting the cumulative
    distribution: draw u uniform on [0, total) and take the first token whose cumulative
    probability exceeds it. One random number per row, where the Gumbel-max trick or
    torch.multinomial draw one per vocabulary entry: for a small model on a CPU, drawing a
    vocabulary's worth of random numbers at every step can cost more than the model itself."""
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    # u < total even after rounding, so the first cumulative value above u is a token with
    # probability > 0 (a zero-probability token repeats its predecessor's cumulative value)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1)


NUCLEUS_CANDIDATES = 64   # sample_top_p sorts only this many most likely tokens when their mass reaches p


def sample_top_p(probs, p: float, generator=None):
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches p.
    At p >= 1 nothing is cut, so the sort is skipped. A token is cut when the tokens more likely
    than it already hold more than p, so the nucleus lies inside the top n whenever their mass
    exceeds p: then only those n are sorted (torch.topk), else the whole vocabulary is. The same
    tokens, the same draw, without sorting the whole vocabulary at every step (README's chapter 02
    gives the time saved)."""
    if p >= 1.0:
        return sample_categorical(probs, generator)
    n_top = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    probs_sort, probs_idx = torch.topk(probs, n_top, dim=-1)      # sorted, most likely first
    if n_top < probs.shape[-1] and (probs_sort.sum(dim=-1) <= p).any():   # a nucleus may reach past them
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort[mass_before > p] = 0.0
    choice = sample_categorical(probs_sort, generator)
    return torch.gather(probs_idx, -1, choice.unsqueeze(-1)).squeeze(-1)


# The decoding step is memory-bound. Each new token reads every weight once (and the cached keys
# and values of every earlier position) but does only ~2 FLOPs per weight read per row: at
# batch 1, a GPU's compute units wait on memory ~100x over. So the speed limit of decoding, its
# roofline, is the memory bandwidth over the bytes a step reads (decode_bytes below): for the 1B
# preset in bf16 at batch 1, 2.1 GB a step, so at an H100's 3.35 TB/s (its data sheet) at most
# ~1,600 steps/s. Run op by op from Python, a small model never gets near it: each of the dozens
# of kernels a layer runs waits on Python to launch it. torch.compile turns the step into one
# graph of fused kernels (and on a GPU, with mode="reduce-overhead", one CUDA graph launched at once). A compiled graph has fixed
# shapes, so decode_step reads the whole static cache (masked) rather than the part filled so
# far, and takes the position as a tensor: as a Python int it would be baked into the graph, and
# every step would compile anew. (gpt-fast, PyTorch's own fast-decoding example, does the same.)

def decode_bytes(args: ModelArgs, batch: int, positions: int, bytes_per_value: int) -> int:
    """What one decoding step reads from memory: every weight but the embedding table (a lookup
    reads one row a token), and the cached keys and values of `positions` positions per row."""
    kv_dim = (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    weights = count_params(args) - args.vocab_size * args.dim + batch * args.dim
    cache = 2 * args.n_layers * kv_dim * positions * batch
    return (weights + cache) * bytes_per_value


def decode_step(model, token, pos, width: int = None):
    """One decoding step at fixed shapes, the part generate(compile=True) compiles: token (batch, 1),
    row i's at position pos[i] (a tensor), attending over the cache's first `width` columns (default
    all of it, as when compiled), masked to each row's positions up to its own (a row's tokens fill
    its positions from 0, so nothing below needs hiding). -> logits (batch, vocab)."""
    column = torch.arange(width or model.layers[0].attention.cache_k.shape[2], device=pos.device)
    allowed = column[None, :] <= pos[:, None]
    return model(token, pos, allowed[:, None, None, :])[:, -1]


_compiled_decode_steps = {}   # device type -> torch.compile(decode_step), compiled once a process


def compiled_decode_step(device):
    """decode_step through torch.compile: on a GPU as CUDA graphs (mode="reduce-overhead"), which
    launch a whole step at once. A new shape (batch, cache length) compiles again."""
    if device.type not in _compiled_decode_steps:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled_decode_steps[device.type] = torch.compile(decode_step, fullgraph=True, mode=mode)
    return _compiled_decode_steps[device.type]


COMPILED_CACHE_MULTIPLE = 64   # compile=True rounds the cache length up to this: fewer shapes, fewer compiles


class Session:
    """Generation that goes on over several calls with the same rows: a dialogue, turn by turn
    (07). Each call's prompt is the whole dialogue so far, whose start the KV cache already holds
    from the call before (its prompt and answer): generate(..., session=s) feeds each row only
    what its cache does not hold, compared token by token, so a prompt that changed (a turn
    dropped to fit the context, an answer that tokenises differently written back) is read again
    from where it differs. The session keeps the cache (max_seq_len long) between calls.
        with Session() as s:
            for turn ...: answers = generate(model, dialogues_so_far, ..., session=s)"""

    def __init__(self):
        self.fed = None     # per row, the tokens whose keys and values the cache holds
        self.cache = None   # per layer, (keys, values)

    def keep(self, rows):
        """Go on with these rows only (a dialogue that ended leaves the batch)."""
        if self.fed is not None:
            self.fed = [self.fed[i] for i in rows]
            index = torch.tensor(rows, device=self.cache[0][0].device)
            self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]

    def close(self):
        self.fed = self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def common_start(a, b) -> int:
    """How many tokens two lists share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def generate(model, prompt_tokens, max_gen_len: int, temperature: float = 0.6,
             top_p: float = 0.9, eos_id: Optional[int] = None, generator=None, compile: bool = False,
             session: Optional[Session] = None):
    """prompt_tokens: list of token-id lists. Returns the generated ids of each
    prompt (prompt excluded), at most max_gen_len of them and cut before the first
    eos_id. temperature 0 = greedy. Every answer has the same room: max_gen_len, or
    less where the longest prompt leaves less of the model's context.
    compile: the steps after the prefill run decode_step compiled (the first call of a shape
    compiles it: seconds to a minute); the same tokens, up to floating-point rounding.
    session: a Session: the cache is kept for the next call on the same rows (see Session)."""
    if max_gen_len < 1:   # else total_len falls to the prompt's length and the error below blames the prompts
        raise UserError(f"max_gen_len {max_gen_len}: must be >= 1 (the number of tokens to generate)")
    bsz = len(prompt_tokens)
    device = model.output.weight.device
    lengths = [len(t) for t in prompt_tokens]
    max_len = max(lengths)
    total_len = min(model.args.max_seq_len, max_len + max_gen_len)
    if min(lengths) == 0 or max_len >= total_len:
        raise UserError(f"prompts must hold 1 to {model.args.max_seq_len - 1} tokens (got {min(lengths)}-{max_len})")
    # Each prompt is written from column 0 of its row, padded on the right, and each row then
    # decodes at its own position: a row's tokens sit at positions 0, 1, 2, ... as if it were alone
    # in the batch. One forward reads every prompt (the prefill): padding comes after a row's prompt,
    # so plain causal attention never lets a prompt token see it, and the logits are taken at each
    # row's last prompt token. Each later step adds one token a row, at the row's own position;
    # a row's padding is overwritten by its answer before any query of the row can see it.
    # (Meta's generate pads on the right too, but feeds the longer prompts one token a step from the
    # shortest one's end; with 07's multi-turn histories, most steps did only that.)
    cache_len = total_len
    if compile:   # one compiled graph serves every call whose cache rounds to the same length
        cache_len = min(-(-total_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE,
                        model.freqs_cis.shape[1])
    held = [0] * bsz   # per row, the prompt's tokens the cache already holds (a session's earlier calls)
    if session is not None and session.fed is not None:
        if len(session.fed) != bsz:
            raise UserError(f"the session holds {len(session.fed)} rows, this call {bsz}: Session.keep(rows) first")
        held = [min(common_start(f, t), len(t) - 1) for f, t in zip(session.fed, prompt_tokens)]
        for layer, (k, v) in zip(model.layers, session.cache):
            layer.attention.cache_k, layer.attention.cache_v = k, v
    else:
        if session is not None:   # a session's prompts grow: its cache spans the whole context
            cache_len = max(cache_len, model.args.max_seq_len)
        model.setup_cache(bsz, cache_len)
    cache_len = model.layers[0].attention.cache_k.shape[2]
    if compile:   # the cache is written inside the graph: tell torch.compile it stays where it is, as
        for layer in model.layers:   # transformers' StaticCache does, so CUDA graphs can keep it
            torch._dynamo.mark_static_address(layer.attention.cache_k)
            torch._dynamo.mark_static_address(layer.attention.cache_v)
    step = compiled_decode_step(device) if compile else decode_step

    tokens = torch.zeros((bsz, cache_len), dtype=torch.long, device=device)
    for i, t in enumerate(prompt_tokens):
        tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)
    pos = torch.tensor(lengths, device=device)   # each row's next column
    start = min(held)   # the prefill reads columns start..max_len-1 (0 without a session)
    last = torch.zeros(bsz, max_len - start, dtype=torch.bool, device=device)
    last[rows, pos - 1 - start] = True   # only each row's last prompt token's logits are read
    eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
    n_new = total_len - max_len
    same = min(lengths) == max_len   # prompts of one length: the rows decode at one position
    try:
        logits = model(tokens[:, start:max_len], start, logits_at=last)
        for k in range(n_new):
            if temperature > 0:
                next_token = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
            else:
                next_token = logits.argmax(dim=-1)
            tokens[rows, pos] = next_token
            if eos_id is not None:
                eos_reached |= next_token == eos_id
                if eos_reached.all():
                    break
            if k == n_new - 1:   # the last token is not fed: no step after it reads it
                break
            # torch.compile checks its guards (shapes, dtypes, the model's weights...) before each call,
            # which took ~10% of a small model's step. They held at this call's first step, and every
            # later step passes the same model and tensors of the same shapes: so skip all but those
            # that tell its compiled graphs apart.
            if same and not compile:   # every row at one position: no mask, SDPA's fused kernel
                logits = model(next_token[:, None], max_len + k)[:, -1]
            else:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=compile and k > 0):
                    logits = step(model, next_token[:, None], pos, None if compile else max_len + k + 1)
            pos = pos + 1
        if session is not None:   # a row's cache holds its tokens before `pos`: the last one drawn was not fed
            session.fed = [row[:p] for row, p in zip(tokens.tolist(), pos.tolist())]
            session.cache = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
    except BaseException:
        if session is not None:   # half a step: start again from nothing
            session.close()
        raise
    finally:
        model.clear_cache()

    out = []
    for row, n, p in zip(tokens.tolist(), lengths, pos.tolist()):
        gen = row[n:p + 1]
        if eos_id is not None and eos_id in gen:
            gen = gen[:gen.index(eos_id)]
        out.append(gen)
    return out


# ============================================================================
# Plumbing, after the method: what lets real weights load here and our models open in
# Meta's and Hugging Face's code. Nothing below is in the paper.
# ============================================================================

# ----------------------------------------------------------------------------
# Checkpoints, any format (our .pt files and the files of the two below). Every load
# goes through torch.load(weights_only=True): a .pth file is a pickle, and a hostile
# pickle could run code.

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint, and a
    failed write (a full disk, a read-only folder) takes its .tmp away and says so in one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None


def write_error(e: BaseException, path: Path) -> BaseException:
    """A failed write as one line naming the folder and the cause; any other exception unchanged.
    torch.save reports a full disk as a RuntimeError from its zip writer (inline_container.cc)."""
    if isinstance(e, OSError):
        cause = e.strerror or str(e)
    elif isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ("inline_container", "write", "open")):
        cause = f"{str(e).splitlines()[0][:160]} (is the disk full?)"
    else:
        return e
    return UserError(f"cannot write {path.name} in {path.parent}: {cause}")


def load_checkpoint(path, mmap: bool = False):
    """Read a checkpoint file, turning the usual failures into one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:   # truncated file, not a checkpoint, or pickled code we refuse to run
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None


def read_config(path: Path) -> dict:
    """params.json or config.json as a dict; a damaged one is a one-line error."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = getattr(e, 'msg', None) or e.reason
        raise UserError(f"{path} is not valid JSON ({why}): a damaged download?") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def export_folder(folder) -> Path:
    """The folder an export writes into: a new or existing folder, never a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file: exports write a folder, so pick a new name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {folder}: {e.strerror}") from None
    return folder


def save_model(model: Transformer, path, **extra):
    """Our format: one .pt file with the args (a plain dict) and the weights."""
    save_atomic({"model_args": asdict(model.args), "model": model.state_dict(), **extra}, path)


def args_from_dict(d: dict) -> ModelArgs:
    known = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in d.items() if k in known})


def check_state_dict(model: nn.Module, state: dict, path):
    """A checkpoint for another shape gets a one-line error, not a page of size mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"{path}: {k} has shape {tuple(state[k].shape)}, the model expects "
                            f"{tuple(v.shape)} (a checkpoint of another size?)")


# ----------------------------------------------------------------------------
# Meta's format, as released for Table 1's models: params.json + consolidated.NN.pth
# (llama/model.py's key names, which are ours).

# Meta's model-parallel shards split each matrix along one dimension
# (fairscale's ColumnParallelLinear splits outputs, RowParallelLinear inputs);
# norms are copied into every shard. 13B comes in 2 shards, 70B in 8.
META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
                  "w1": 0, "w3": 0, "w2": 1}


def meta_shard_dim(key: str):
    return META_SHARD_DIM.get(key.split(".")[-2])   # None: a norm, the same in every shard


class Concat:
    """A weight that Meta's model-parallel shards split, joined only when read (tensor()): its shape
    is known before, for check_state_dict."""

    def __init__(self, parts, dim: int):
        self.parts, self.dim = parts, dim

    @property
    def shape(self):
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return torch.Size(shape)

    def tensor(self):
        return torch.cat(self.parts, dim=self.dim)


def load_meta(folder: Path, lazy: bool = False):
    """lazy: split weights as Concat, joined when read; else joined now (the whole model in memory)."""
    params = read_config(folder / "params.json")
    shard_paths = sorted(folder.glob("consolidated.*.pth"))
    if not shard_paths:
        raise UserError(f"{folder} has params.json but no consolidated.*.pth")
    shards = [load_checkpoint(p, mmap=True) for p in shard_paths]
    state = {}
    if "dim" not in params or "tok_embeddings.weight" not in shards[0]:
        raise UserError(f"{folder}: params.json has no 'dim' or its shards no tok_embeddings.weight "
                        "(not Llama's format?)")
    for key in shards[0]:
        if key == "rope.freqs":                 # Meta stores its RoPE table; we recompute ours
            continue
        shard_dim = meta_shard_dim(key)
        if shard_dim is None or len(shards) == 1:
            state[key] = shards[0][key]
        else:
            parts = Concat([s[key] for s in shards], shard_dim)
            state[key] = parts if lazy else parts.tensor()
    if params.get("vocab_size", -1) == -1:       # Meta's params.json says -1; the embedding knows
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    return args_from_dict(params), state


# What Meta's params.json holds: the fields of its ModelArgs except max_seq_len and
# max_batch_size, which Llama.build passes itself (ModelArgs(max_seq_len=..., max_batch_size=...,
# **params): a params.json holding them fails with "multiple values for keyword argument").
META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps")


def meta_params(model: Transformer) -> dict:
    """params.json as Meta's loader reads it: its keys only, no None fields, the vocabulary the
    embedding has. Llama 2's RoPE base is fixed at 10,000 in Meta's code; another base is written as
    rope_theta, as Code Llama's params.json does (Llama 2's own ModelArgs then refuses it, rightly)."""
    params = {k: getattr(model.args, k) for k in META_PARAMS if getattr(model.args, k) is not None}
    params["vocab_size"] = model.tok_embeddings.weight.shape[0]
    if model.args.rope_theta != 10000.0:
        params["rope_theta"] = model.args.rope_theta
    return params


def save_meta(model: Transformer, folder, num_shards: int = 1, tokenizer=None):
    """Write Meta's format (params.json + consolidated.NN.pth), split into model-parallel shards, and the
    tokenizer's tokenizer.model if given. Meta's download.sh puts tokenizer.model beside the model folders
    (./tokenizer.model, ./llama-2-7b/), and Llama.build takes its path on its own (--tokenizer_path) and
    reads only *.pth and params.json from --ckpt_dir: in the folder, it travels with the model, Meta's
    code passes over it, and our loader finds it."""
    folder = export_folder(folder)
    state = model.state_dict()
    for i in range(num_shards):
        shard = {k: v.chunk(num_shards, dim=meta_shard_dim(k))[i].clone()
                 if meta_shard_dim(k) is not None else v for k, v in state.items()}
        save_atomic(shard, folder / f"consolidated.{i:02d}.pth")
    tokenizer_chapter.write_json(folder / "params.json", meta_params(model))
    if tokenizer is not None:
        tokenizer_chapter.atomic_write_text(folder / "tokenizer.model", tokenizer.sp_model.serialized_model_proto())


# ----------------------------------------------------------------------------
# Hugging Face's format: config.json + *.safetensors, with transformers' key names
# and RoPE's q/k rows permuted (LlamaForCausalLM).

# Hugging Face's names for Meta's weights (the layer index is the same).
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
            "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight",
            "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}


def meta_key_to_hf(key: str) -> str:
    if key in HF_NAMES:
        return HF_NAMES[key]
    _, i, rest = key.split(".", 2)            # layers.N.attention.wq.weight
    return f"model.layers.{i}.{HF_NAMES[rest]}"


def permute_for_hf(w, n_heads: int):
    """Meta rotates interleaved channel pairs (0,1), (2,3)...; HF rotates the two
    halves of each head (i, i + d/2). Reordering q/k rows per head makes the two agree."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w, n_heads: int):
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_theta_from_hf_config(cfg: dict) -> float:
    """RoPE's base from config.json, in either layout: transformers 4 writes rope_theta at the top and
    rope_scaling beside it (null for Llama 2); transformers 5 writes rope_parameters = {"rope_type":
    "default", "rope_theta": ...} (modeling_rope_utils.py). Any other rope_type (linear, dynamic, yarn,
    llama3, ...) rescales the positions, which this file does not implement: refused by name, rather
    than loaded with plain RoPE and wrong logits."""
    theta = cfg.get("rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise UserError(f"config.json: {key} is {rope!r:.60}, not a JSON object")
        kind = rope.get("rope_type", rope.get("type", "default"))   # "type" is the older spelling
        if kind != "default":
            raise UserError(f"config.json: {key} asks for RoPE scaling {kind!r}, which this model does not "
                            "implement (only plain RoPE, rope_type 'default', as in Llama 2)")
        theta = rope.get("rope_theta", theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        raise UserError(f"config.json: rope_theta {theta!r:.40} is not a positive number")
    return float(theta)


def args_from_hf_config(cfg: dict) -> ModelArgs:
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)} (as integers): not a Llama model's config?")
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                     n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                     vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
                     rope_theta=rope_theta_from_hf_config(cfg),
                     max_seq_len=cfg.get("max_position_embeddings", 4096))
    # HF stores the FFN width itself; Meta derives it from multiple_of and
    # ffn_dim_multiplier. Find the Table 1 rule that gives it (the 70B's for
    # the 70B), else let multiple_of round 8/3*dim up to exactly that width.
    width = cfg["intermediate_size"]
    for multiple_of, mult in [(256, None), (4096, 1.3), (256, 1.0), (width, None)]:
        candidate = replace(args, multiple_of=multiple_of, ffn_dim_multiplier=mult)
        if ffn_hidden_dim(candidate) == width:
            return candidate
    raise UserError(f"intermediate_size {width} is narrower than Llama's rule allows for dim {args.dim}")


def hf_config(args: ModelArgs, dtype_name: str = "float32") -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": args.dim, "intermediate_size": ffn_hidden_dim(args),
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads or args.n_heads, "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps,
            # RoPE's base in both layouts: transformers 4 reads rope_theta, transformers 5 rope_parameters
            "rope_theta": args.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": dtype_name}


def load_hf(folder: Path):
    args = args_from_hf_config(read_config(folder / "config.json"))
    hf_state = {}
    safetensor_files = sorted(folder.glob("*.safetensors"))
    if safetensor_files:
        try:
            from safetensors.torch import load_file   # optional: only Hugging Face folders need it
        except ImportError:
            raise UserError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        for f in safetensor_files:
            try:
                hf_state.update(load_file(str(f)))
            except Exception as e:   # SafetensorError: a truncated or damaged file
                raise UserError(f"cannot read {f}: {str(e).splitlines()[0][:200]} (a damaged download?)") from None
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise UserError(f"{folder} has config.json but no *.safetensors or pytorch_model*.bin")
        for f in bins:
            hf_state.update(load_checkpoint(f))
    hf_to_meta = {meta_key_to_hf(k): k for k in meta_model(args).state_dict()}
    state = {}
    for hf_key, meta_key in hf_to_meta.items():
        if hf_key not in hf_state:
            raise UserError(f"{folder} lacks {hf_key}")
        w = hf_state[hf_key]
        if meta_key.endswith("wq.weight"):
            w = unpermute_from_hf(w, args.n_heads)
        elif meta_key.endswith("wk.weight"):
            w = unpermute_from_hf(w, args.n_kv_heads or args.n_heads)
        state[meta_key] = w
    return args, state


def save_hf(model: Transformer, folder, tokenizer=None):
    """Export to Hugging Face's layout: opens with transformers' LlamaForCausalLM.from_pretrained, and,
    given the tokenizer, with AutoTokenizer.from_pretrained (the same ids, Meta's chat template)."""
    folder = export_folder(folder)
    args, hf_state = model.args, {}
    for k, w in model.state_dict().items():
        if k.endswith("wq.weight"):
            w = permute_for_hf(w, args.n_heads)
        elif k.endswith("wk.weight"):
            w = permute_for_hf(w, args.n_kv_heads or args.n_heads)
        hf_state[meta_key_to_hf(k)] = w.contiguous()
    dtype_name = str(model.output.weight.dtype).removeprefix("torch.")
    try:
        from safetensors.torch import save_file
        tmp = folder / "model.safetensors.tmp"
        try:
            save_file(hf_state, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, folder / "model.safetensors")
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise write_error(e, folder / "model.safetensors") from None
    except ImportError:                       # transformers reads the older .bin form too
        save_atomic(hf_state, folder / "pytorch_model.bin")
    tokenizer_chapter.write_json(folder / "config.json", hf_config(args, dtype_name))
    for name, content in (hf_tokenizer_files(tokenizer, args.max_seq_len) if tokenizer else {}).items():
        if name == "tokenizer.json":   # a few MB at 32000 pieces: on one line, as machine data
            content = json.dumps(content, ensure_ascii=False)
        if isinstance(content, dict):
            tokenizer_chapter.write_json(folder / name, content)
        else:
            tokenizer_chapter.atomic_write_text(folder / name, content)


# ----------------------------------------------------------------------------
# The tokenizer beside a Hugging Face export, so that the folder opens as a whole (AutoTokenizer too).
#
# Meta's chat format (generation.py's chat_completion, written out in 04_sft.py's encode_dialog) as the
# Jinja template of transformers' apply_chat_template: each user turn is BOS "[INST] {user} [/INST]",
# each answer " {answer} " EOS, and a system prompt goes inside the first user message between <<SYS>>
# markers. It is the template of Meta's Llama-2-chat-hf, with roles checked as encode_dialog does.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] != ['user', 'assistant'][loop.index0 % 2] %}"
    "{{ raise_exception('after an optional system message, roles must alternate user, assistant, ...') }}"
    "{% endif %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


def hf_tokenizer_json(tokenizer) -> dict:
    """tokenizer.json, the file of the `tokenizers` library behind transformers' fast tokenizers: our
    SentencePiece BPE, in the form of the tokenizer.json in Meta's Llama-2-hf folders. (transformers
    can convert tokenizer.model itself, but only with protobuf installed; this file needs nothing.)
    SentencePiece merges the adjacent pair whose joined piece has the best score; `tokenizers` merges
    the pair listed first in `merges`. So every split of a piece into two pieces is listed, the
    best-scoring piece first, as transformers' own converter does (convert_slow_tokenizer.py)."""
    sp = tokenizer.sp_model
    n = sp.get_piece_size()
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]   # <unk>, <s>, </s>
    mergeable = {sp.id_to_piece(i) for i in range(n) if not (i in special or sp.is_byte(i))}
    merges = []
    for i in sorted(range(n), key=lambda i: -sp.get_score(i)):   # sorted() is stable: ties stay in id order
        piece = sp.id_to_piece(i)
        if piece in mergeable:
            merges += [[piece[:cut], piece[cut:]] for cut in range(1, len(piece))
                       if piece[:cut] in mergeable and piece[cut:] in mergeable]
    bos = sp.id_to_piece(tokenizer.bos_id)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        # the specials are matched in the text before anything else, and never split
        "added_tokens": [dict(id=i, content=sp.id_to_piece(i), single_word=False, lstrip=False, rstrip=False,
                              normalized=False, special=True) for i in special],
        # SentencePiece's normalisation with Llama's settings (no Unicode rules): a dummy-prefix space,
        # then every space as '▁'. As a normalizer (Llama's "legacy" form) it runs on each stretch of
        # text between special tokens, so "</s><s>[INST]" encodes "[INST]" as Meta's per-turn encode does.
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {   # BOS before every text, no EOS: Meta's encode(s, bos=True, eos=False)
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [   # '▁' back to spaces, <0xNN> pieces back to bytes
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {sp.id_to_piece(i): i for i in range(n)}, "merges": merges},
    }


def hf_tokenizer_files(tokenizer, max_seq_len: int) -> dict:
    """File name -> content (bytes or a JSON-ready dict): what AutoTokenizer.from_pretrained reads."""
    sp = tokenizer.sp_model
    specials = dict(bos_token=sp.id_to_piece(tokenizer.bos_id), eos_token=sp.id_to_piece(tokenizer.eos_id),
                    unk_token=sp.id_to_piece(sp.unk_id()))
    config = dict(
        # the class that uses tokenizer.json as written. LlamaTokenizer in transformers 5 rebuilds its
        # pipeline from flags instead, and then differs from SentencePiece on text that starts with a
        # space (Metaspace adds no dummy prefix before a space that is already there)
        tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False, **specials,
        pad_token=None, clean_up_tokenization_spaces=False, model_max_length=max_seq_len,
        chat_template=LLAMA2_CHAT_TEMPLATE)
    return {"tokenizer.model": sp.serialized_model_proto(), "tokenizer.json": hf_tokenizer_json(tokenizer),
            "tokenizer_config.json": config, "special_tokens_map.json": specials}


# ----------------------------------------------------------------------------
# Any of the three formats in (load_weights, read_model_args): what Transformer.from_pretrained and
# the later chapters read.

def load_weights(path, lazy: bool = False):
    """(ModelArgs, state dict with Meta's key names) from any of the three formats. lazy: Meta's
    split weights are joined only when read (load_meta)."""
    path = Path(path)
    if path.is_dir():
        if (path / "params.json").is_file():
            return load_meta(path, lazy)
        if (path / "config.json").is_file():
            return load_hf(path)
        raise UserError(f"{path} holds neither params.json (Meta) nor config.json (Hugging Face)")
    # memory-mapped: a weight is read from the file's pages when used, and processes that load the
    # same file share one copy of them (under FSDP, every rank of a node: each rank had read a whole
    # fp32 copy of its own first, 276 GB a rank at 70B, before fully_shard moved its shards away)
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a model checkpoint of this project (no model_args/model)")
    return args_from_dict(ckpt["model_args"]), ckpt["model"]


# Building under FSDP without a whole model in host memory: a model is made on the meta
# device (shapes only) and its parts are filled, read from a checkpoint or drawn, one block at a
# time as 03's shard_model shards it (from_pretrained(lazy=True), on_meta).

def on_meta(cls, args):
    """A new model on the meta device, its weights drawn later, a part at a time, exactly as
    __init__ would draw them now (draw_weights: 03's shard_model under --fsdp), so that no process
    holds the whole model in CPU memory."""
    with torch.device("meta"):
        model = cls(args)
    model.pending = ("draw", torch.get_rng_state())
    return model


def replay_default_draws(model):
    """What building the model on a real device draws before __init__'s own initialisation: each
    nn.Linear and nn.Embedding draws its PyTorch default as it is made, in the order they are made
    (the order of modules()). Made anew one at a time, on the CPU, and dropped, they move the RNG
    as building the model whole did, so draw_weights then draws __init__'s very weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, nn.Embedding):
            nn.Embedding(module.num_embeddings, module.embedding_dim)


def draw_weights(model, part):
    """Make the part of an on_meta model on the CPU (fp32) and draw its weights as __init__ does.
    After replay_default_draws, parts drawn in __init__'s order (embedding, each block, final norm,
    head) are __init__'s weights."""
    part.to_empty(device="cpu")
    with torch.no_grad():
        for module in part.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    part.apply(model._init_weights)


def fill_from_state(module, state, dtype, prefix: str = ""):
    """The module's parameters still on the meta device, read from `state` (a checkpoint's, keys
    under `prefix`) in `dtype`: a lazily loaded model (from_pretrained(lazy=True)), a part at a time."""
    for name, p in list(module.named_parameters()):
        if p.is_meta:
            value = state[prefix + name]
            value = value.tensor() if isinstance(value, Concat) else value
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, nn.Parameter(value.to(dtype), requires_grad=p.requires_grad))


def read_model_args(path) -> ModelArgs:
    """A checkpoint's shape without reading its weights (a .pt file is memory-mapped, a folder's
    JSON read): what a chapter checks its flags against before any work."""
    path = Path(path)
    if path.is_dir() and (path / "params.json").is_file():
        return args_from_dict(read_config(path / "params.json"))
    if path.is_dir() and (path / "config.json").is_file():
        return args_from_hf_config(read_config(path / "config.json"))
    if path.is_dir():
        return load_weights(path)[0]   # the one-line error for a folder of neither format
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict):
        raise UserError(f"{path} is not a model checkpoint of this project (no model_args/model)")
    return args_from_dict(ckpt["model_args"])


# ----------------------------------------------------------------------------
# Devices (pick_device, pick_dtype): CUDA, then Apple's MPS, then the CPU; bf16 where the GPU has it.

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU visible to torch")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: this machine has no Apple GPU (MPS) visible to torch")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[name]


# ----------------------------------------------------------------------------
# The command line (main): the size table of Table 1's presets, or a loaded model completing a prompt.

def preset_table():
    """Each preset's shape, parameter count and training FLOPs per token (Table 1's sizes)."""
    return {name: dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads or a.n_heads,
                       ffn_dim=ffn_hidden_dim(a), vocab_size=a.vocab_size, max_seq_len=a.max_seq_len,
                       params=count_params(a), train_flops_per_token=flops_per_token(a, a.max_seq_len))
            for name, a in PRESETS.items()}


def print_presets():
    print(f"{'preset':>6} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} "
          f"{'params':>15} {'train GFLOP/token':>18}")
    for name, row in preset_table().items():
        print(f"{name:>6} {row['dim']:>5} {row['n_layers']:>6} {row['n_heads']:>5} {row['n_kv_heads']:>3} "
              f"{row['ffn_dim']:>6} {row['params']:>15,} {row['train_flops_per_token'] / 1e9:>18.3f}")
    print("(toy presets take the tokenizer's vocabulary at run time; FLOPs are forward + backward "
          "at each preset's max_seq_len)")


def tokenizer_places(ckpt_path=None) -> list:
    """Where a checkpoint's tokenizer.model is looked for: in its folder (our runs, Hugging Face folders,
    our exports), then in the folder above, where Meta's download.sh puts it, beside llama-2-7b/ and the
    other model folders. Without a checkpoint, the random model takes the toy run's tokenizer."""
    if ckpt_path is None:
        return [tokenizer_chapter.DEFAULT_RUN_DIR / "tokenizer.model"]
    folder = Path(ckpt_path) if Path(ckpt_path).is_dir() else Path(ckpt_path).parent
    return list(dict.fromkeys([folder / "tokenizer.model", folder.parent / "tokenizer.model"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="The Llama 2 model (paper Sec. 2.2): sizes, loading, generation.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", help="Meta folder, Hugging Face folder or our .pt file "
                                       "(default: a randomly initialised --preset model)")
    parser.add_argument("--preset", default="toy", choices=PRESETS, help="size of the random model")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: tokenizer.model in CKPT's folder or "
                                            "the one above it; without --ckpt, the toy run's)")
    parser.add_argument("--prompt", action="append", help="text to complete (repeat the flag for a batch)")
    parser.add_argument("--max-new-tokens", type=number_flag("--max-new-tokens", at_least=1), default=32)
    parser.add_argument("--temperature", type=number_flag("--temperature", float, at_least=0), default=0.6,
                        help="0 = greedy; Meta's example uses 0.6")
    parser.add_argument("--top-p", type=number_flag("--top-p", float, above=0, at_most=1), default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "plain"])
    parser.add_argument("--compile-decode", action="store_true",
                        help="decode with the compiled step (generate(compile=True)); compiled first, untimed")
    parser.add_argument("--export-hf", metavar="DIR", help="write the model in Hugging Face's format and stop "
                                                           "(with the tokenizer, when there is one)")
    parser.add_argument("--export-meta", metavar="DIR", help="write the model in Meta's format and stop "
                                                             "(with the tokenizer, when there is one)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the preset table there (the pipeline's model.json)")
    args = parser.parse_args(argv)
    if args.json:
        tokenizer_chapter.write_json(args.json, preset_table())

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    places = tokenizer_places(args.ckpt)
    tok_path = args.tokenizer or next((path for path in places if path.is_file()), None)
    if tok_path is None and args.prompt:   # without one, every prompt would become BOS alone
        raise UserError(f"--prompt needs a tokenizer, and there is no {' nor '.join(map(str, places))}: "
                        "pass --tokenizer PATH")
    tokenizer = tokenizer_chapter.Tokenizer(tok_path) if tok_path else None
    if args.ckpt:
        t0 = time.time()
        model = Transformer.from_pretrained(args.ckpt, device=device, dtype=dtype)
        print(f"loaded {args.ckpt} ({count_params(model.args):,} parameters) in {time.time() - t0:.1f}s")
    else:
        print_presets()
        model_args = PRESETS[args.preset]
        if tokenizer is not None:
            model_args = replace(model_args, vocab_size=tokenizer.n_words)
        model = Transformer(model_args).to(device=device, dtype=dtype).eval()
        print(f"\nA random {args.preset} model ({count_params(model_args):,} parameters) on {device}, "
              "untrained, so expect noise:")
    if tokenizer is not None and tokenizer.n_words != model.args.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.n_words} pieces, the model "
                        f"{model.args.vocab_size}: they do not belong together (pass --tokenizer PATH)")
    model.set_attention(args.attention)
    exported = "model and tokenizer" if tokenizer else f"model only: no {' nor '.join(map(str, places))}"
    if args.export_hf:
        save_hf(model, args.export_hf, tokenizer)
        print(f"wrote Hugging Face format to {args.export_hf} ({exported})")
    if args.export_meta:
        save_meta(model, args.export_meta, tokenizer=tokenizer)
        print(f"wrote Meta format to {args.export_meta} ({exported})")
        if tokenizer:   # Meta's loader takes the tokenizer's path on its own
            print(f"  Meta's code: torchrun example_text_completion.py --ckpt_dir {args.export_meta} "
                  f"--tokenizer_path {Path(args.export_meta) / 'tokenizer.model'}")
    if args.export_hf or args.export_meta:
        return

    if tokenizer is None:   # no text in or out: generate after BOS alone, and show the ids
        prompts, prompt_tokens = ["<s> (no tokenizer: BOS alone, token ids shown)"], [[1]]
    else:                   # Meta's text completion: BOS, then the prompt; stop at EOS
        prompts = args.prompt or ["To be, or not to be"]
        prompt_tokens = [tokenizer.encode(s, bos=True, eos=False) for s in prompts]
    eos_id = tokenizer.eos_id if tokenizer else 2
    if args.compile_decode:   # compile on a first call of the same shapes, so the timing below is decoding's
        t0 = time.time()
        generate(model, prompt_tokens, args.max_new_tokens, args.temperature, args.top_p, eos_id, compile=True)
        print(f"compiled the decoding step in {time.time() - t0:.1f}s")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    outputs = generate(model, prompt_tokens, args.max_new_tokens, args.temperature, args.top_p,
                       eos_id=eos_id, generator=generator, compile=args.compile_decode)
    seconds = time.time() - t0
    for prompt, out in zip(prompts, outputs):
        print(f"\n> {prompt}\n{tokenizer.decode(out) if tokenizer else out}")
    n_new = sum(len(o) for o in outputs)
    steps = max(map(len, outputs))
    read = decode_bytes(model.args, len(prompts), max(map(len, prompt_tokens)) + steps // 2, dtype.itemsize)
    print(f"\n{n_new} new tokens in {seconds:.2f}s: {n_new / seconds:.1f} tokens/s "
          f"(batch {len(prompts)}, KV cache, {device}, {str(dtype).removeprefix('torch.')}"
          f"{', compiled step' if args.compile_decode else ''})")
    print(f"a decoding step reads {read / 1e6:,.1f} MB (weights and KV cache), so {steps} steps in {seconds:.2f}s "
          f"moved {read * steps / seconds / 1e9:,.2f} GB/s: the roofline is the memory's bandwidth "
          "(bench.py measures both)")


if __name__ == "__main__":
    run_cli(main)
