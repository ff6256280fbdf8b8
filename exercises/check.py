"""The exercises' checker. Each exercise is a function (or class) of a chapter; the check calls
yours on small random inputs and compares it with the chapter's own, element by element, then,
where it is cheap, runs a piece of the pipeline with yours swapped into the chapter (for the model's
pieces: the micro model, full forward and KV-cache decoding; for PPO's: one micro PPO iteration).
Expected values always come from the chapters' functions: nothing is hard-coded here.

    python exercises/check.py                    # every exercise and bug hunt, with its status
    python exercises/check.py gae                # one: its check, then the chapter's own tests
                                                 # for it (pytest -k) with your function swapped in
    python exercises/check.py gae --no-tests     # the check only
    python exercises/check.py --solutions        # every check against the chapters' functions
                                                 # (must pass: tests/test_exercises.py asserts it)

The last line is always "N passed, M failed"; the exit code is 0 only if nothing failed.
"""
import argparse
import copy
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from argparse import Namespace
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for folder in (str(HERE), str(REPO)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

import torch  # noqa: E402

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
S = importlib.import_module("04_sft")
R = importlib.import_module("05_reward")
RL = importlib.import_module("06_rs_ppo")
G = importlib.import_module("07_gatt")
CHAPTERS = {m.__name__: m for m in (tok, M, P, S, R, RL, G)}


class Mismatch(Exception):
    """The learner's output differs from the chapter's: the message says where and how."""


# ----------------------------------------------------------------------------------------------
# Comparing outputs: the first element that differs, with the expected and the obtained value.

def fmt(x):
    return f"{x:.6g}" if isinstance(x, float) else repr(x)


def expect(what, got, expected, atol=1e-5, rtol=1e-5, dtype=True):
    """Raise Mismatch naming the first place where got differs from expected (nested tensors,
    lists, tuples, dicts, numbers)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"{what}: expected a tensor of shape {tuple(expected.shape)}, got {type(got).__name__}")
        if got.shape != expected.shape:
            raise Mismatch(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if dtype and got.dtype != expected.dtype:
            raise Mismatch(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
        got, expected = got.detach().cpu(), expected.detach().cpu()
        if expected.dtype in (torch.bool, torch.int64, torch.int32) and got.dtype == expected.dtype:
            wrong = got != expected
        else:
            wrong = ~torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)
        if wrong.any():
            i = tuple(wrong.nonzero()[0].tolist())
            where = f"[{', '.join(map(str, i))}]" if i else ""
            n = int(wrong.sum())
            raise Mismatch(f"{what}{where}: expected {fmt(expected[i].item())}, got {fmt(got[i].item())} "
                           f"({n} of {wrong.numel()} elements differ)")
    elif isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            raise Mismatch(f"{what}: expected a {type(expected).__name__} of {len(expected)}, got {type(got).__name__}")
        for k, (g, e) in enumerate(zip(got, expected)):
            expect(f"{what}[{k}]", g, e, atol, rtol, dtype)
        if len(got) != len(expected):
            raise Mismatch(f"{what}: expected length {len(expected)}, got {len(got)}")
    elif isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise Mismatch(f"{what}: expected a dict with keys {sorted(expected)}, got {keys}")
        for k in expected:
            expect(f"{what}[{k!r}]", got[k], expected[k], atol, rtol, dtype)
    elif isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if not (math.isclose(got, expected, rel_tol=rtol, abs_tol=atol) or math.isnan(got) and math.isnan(expected)):
            raise Mismatch(f"{what}: expected {fmt(expected)}, got {fmt(float(got))}")
    elif got != expected or type(got) is not type(expected) and not isinstance(expected, (int, float)):
        raise Mismatch(f"{what}: expected {fmt(expected)}, got {fmt(got)}")


def clone(x):
    """Fresh copies of the inputs for each call: an in-place edit by one side must not change the other's."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return copy.deepcopy(x)


def same_calls(f, ref, cases, name, **tol):
    """f(*case) against ref(*case) for each case (a tuple of arguments, or (args, kwargs))."""
    for case in cases:
        args, kwargs = case if isinstance(case, tuple) and len(case) == 2 and isinstance(case[1], dict) else (case, {})
        expect(name, f(*clone(args), **clone(kwargs)), ref(*clone(args), **clone(kwargs)), **tol)


@contextmanager
def swapped(module, patch):
    """Put the learner's functions in the chapter module's place (its code looks them up there at
    call time), and the chapter's back afterwards, whatever happens."""
    saved = {name: getattr(module, name) for name in patch}
    try:
        for name, value in patch.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Shared small fixtures: a tokenizer trained in a second, micro models.

@cache
def tokenizer():
    """A 700-piece tokenizer on a slice of Hamlet and toy-world dialogue text (as tests/test_rs_ppo.py)."""
    root = Path(tempfile.mkdtemp(prefix="llama2-exercises-"))
    text = (tok.DEFAULT_CORPUS_DIR / "hamlet_gut.txt").read_text(encoding="utf-8")[:60_000]
    lines = [f"[INST] {m['content']} [/INST]" for d in S.sft_dialogs(P.make_world(0), 300, seed=1) for m in d]
    (root / "a.txt").write_text(text + "\n".join(lines), encoding="utf-8")
    return tok.Tokenizer(tok.train_tokenizer([root / "a.txt"], root / "tok", vocab_size=700, log=lambda *a: None))


MICRO = M.PRESETS["micro"]


def micro(cls, vocab_size=MICRO.vocab_size, seed=0):
    torch.manual_seed(seed)
    return cls(replace(MICRO, vocab_size=vocab_size)).eval()


def model_matches(patch, what):
    """The micro model built and run with the learner's pieces gives the chapter's logits: a full
    forward, then the KV cache (prefill 10 tokens, 7 single steps, a chunk of 7 at start_pos 17,
    where causal_mask's offset matters). Plain attention, so repeat_kv and causal_mask are used."""
    reference = micro(M.Transformer)
    tokens = torch.randint(0, MICRO.vocab_size, (2, 24), generator=rng(1))
    reference.set_attention("plain")
    expected = reference(tokens)
    with swapped(M, patch):
        model = M.Transformer(MICRO).eval()
        try:
            model.load_state_dict(reference.state_dict())
        except RuntimeError as e:
            raise Mismatch(f"the micro model built with your {what} cannot load the chapter's weights: "
                           f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}")
        model.set_attention("plain")
        expect(f"micro model's logits with your {what} (full forward)", model(tokens), expected, atol=1e-4)
        model.setup_cache(2, 24)
        pieces = [model(tokens[:, :10], 0)] + [model(tokens[:, i:i + 1], i) for i in range(10, 17)]
        pieces.append(model(tokens[:, 17:], 17))
        model.clear_cache()
        expect(f"micro model's logits with your {what}, decoded with the KV cache", torch.cat(pieces, 1),
               expected, atol=1e-4)


PPO_ARGS = dict(ppo_micro_batch=4, ppo_mini_batch=4, world_size=1, ppo_epochs=1, max_new_tokens=6,
                ppo_temperature=0.7, kl_beta=0.1, gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2, grad_clip=1.0,
                compile_decode=False, sample_batch=64)


def ppo_entry(patch, reference_seed=None):
    """One micro PPO iteration (06's ppo_step: 8 rollouts of 6 tokens, 2 mini-batches), with patch
    swapped into 06: its log entry. The reference is a copy of the policy, or with reference_seed
    another micro model (so that the KL is not 0)."""
    tk = tokenizer()
    policy, value = micro(M.Transformer, tk.n_words), micro(R.RewardModel, tk.n_words, seed=3)
    ref = copy.deepcopy(policy) if reference_seed is None else micro(M.Transformer, tk.n_words, reference_seed)
    reward = RL.Reward(micro(R.RewardModel, tk.n_words, 1), micro(R.RewardModel, tk.n_words, 2), 0, tk.eos_id)
    opts = [P.configure_optimizer(m, 1e-2, 0.1, (0.9, 0.95), 1e-5, torch.device("cpu")) for m in (policy, value)]
    prompts = RL.draw_prompts(P.make_world(0), 8, seed=0)
    with swapped(RL, patch):
        return RL.ppo_step(Namespace(**PPO_ARGS), policy, value, ref, reward, policy, tk, prompts, 0, opts,
                           [policy, value], nullcontext)


@cache
def reference_ppo_entry():
    return ppo_entry({})


def ppo_matches(patch, what):
    entry = ppo_entry(patch)
    keys = ("reward", "kl", "policy_loss", "value_loss", "first_ratio", "first_approx_kl", "ratio", "approx_kl")
    for k in keys:
        if not math.isfinite(entry[k]):
            raise Mismatch(f"a micro PPO iteration with your {what}: {k} is {entry[k]}, not finite")
    expected = reference_ppo_entry()
    expect(f"a micro PPO iteration with your {what}", {k: entry[k] for k in keys}, {k: expected[k] for k in keys},
           atol=1e-4, rtol=1e-3)


def check_ppo_step(f, ref):
    """A whole micro PPO iteration with f in ppo_step's place, against the chapter's. The
    reference is another micro model than the policy: with a copy, the KL would be 0 whatever
    model the code took it against."""
    keys = ("reward", "kl", "policy_loss", "value_loss", "first_ratio", "first_approx_kl", "ratio", "approx_kl")
    got = ppo_entry({"ppo_step": f}, reference_seed=4)
    expected = ppo_entry({"ppo_step": ref}, reference_seed=4)
    expect("a micro PPO iteration with your ppo_step (the reference another micro model than the policy)",
           {k: got[k] for k in keys}, {k: expected[k] for k in keys}, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# The checks: check(f, ref), f the learner's, ref the chapter's. Each raises Mismatch, or lets the
# learner's NotImplementedError (or any other error) through.

def check_bpe_encode(f, ref):
    tk = tokenizer()
    learner = tok.PurePythonBPE(tk)   # the chapter's tables (score, piece_id, byte_id) with your encode
    text = (tok.DEFAULT_CORPUS_DIR / "macbeth_gut.txt").read_text(encoding="utf-8")
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(text) - 500, (40,), generator=g).tolist()
    texts = ["", "aaaa", "eeee e", "  the", "a   b", "\t\tindented\tby tabs", "🦙 llamas in 2025", "日本語",
             *(text[s:s + 1 + s % 400] for s in starts)]
    for t in texts:
        got, expected = f(learner, t), tk.encode(t, bos=False, eos=False)   # SentencePiece itself
        if list(got) != expected:
            k = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            piece = lambda ids: repr(tk.id_to_piece(ids[k])) if k < len(ids) else "(end)"
            raise Mismatch(f"encode({t[:40]!r}): ids differ from SentencePiece's at index {k}: expected "
                           f"{piece(expected)}, got {piece(list(got))} ({len(expected)} ids expected, {len(got)} got)")


def check_rmsnorm(f, ref):
    for eps in (1e-5, 1e-1):
        chapter = ref(16, eps)
        with torch.no_grad():
            chapter.weight.copy_(torch.randn(16, generator=rng(2)))
        learner = f(16, eps)
        learner.load_state_dict(chapter.state_dict())
        x = torch.randn(2, 5, 16, generator=rng(3)) * 0.3
        expect(f"RMSNorm(16, eps={eps})(x)", learner(x), chapter(x))
        expect(f"RMSNorm(16, eps={eps})(x in bfloat16)", learner(x.bfloat16()), chapter(x.bfloat16()), atol=1e-2, rtol=1e-2)
    model_matches({"RMSNorm": f}, "RMSNorm")


def check_apply_rotary_emb(f, ref):
    freqs = M.precompute_freqs_cis(8, 7)
    x = torch.randn(2, 7, 3, 8, generator=rng(4))
    same_calls(f, ref, [(x, freqs)], "apply_rotary_emb(x, freqs_cis)")
    same_calls(f, ref, [(x.bfloat16(), freqs)], "apply_rotary_emb(x in bfloat16, freqs_cis)", atol=1e-2, rtol=1e-2)
    model_matches({"apply_rotary_emb": f}, "apply_rotary_emb")


def check_repeat_kv(f, ref):
    x = torch.randn(2, 3, 2, 4, generator=rng(5))
    same_calls(f, ref, [(x, 3), (x, 2), (x, 1)], "repeat_kv(x, n_rep)")
    model_matches({"repeat_kv": f}, "repeat_kv")


def check_feed_forward(f, ref):
    args = replace(MICRO, dim=32, multiple_of=16)
    torch.manual_seed(0)
    chapter, learner = ref(args), f(args)
    try:
        learner.load_state_dict(chapter.state_dict())
    except RuntimeError as e:
        raise Mismatch(f"FeedForward's parameters differ from the chapter's (w1, w2, w3, no bias, hidden = "
                       f"M.ffn_hidden_dim(args) = {M.ffn_hidden_dim(args)}): {str(e).splitlines()[-1].strip()}")
    x = torch.randn(2, 5, 32, generator=rng(6))
    expect("FeedForward(args)(x)", learner(x), chapter(x))
    model_matches({"FeedForward": f}, "FeedForward")


def check_causal_mask(f, ref):
    same_calls(f, ref, [(5, 0, "cpu"), (1, 9, "cpu"), (4, 6, "cpu"), (1, 0, "cpu")], "causal_mask(seqlen, start_pos)")
    model_matches({"causal_mask": f}, "causal_mask")


def check_get_lr(f, ref):
    for peak, warmup, total, *rest in [(3e-4, 10, 100), (1e-3, 0, 50), (1.0, 5, 5), (2e-5, 3, 40, 0.0)]:
        got = [f(s, peak, warmup, total, *rest) for s in range(total + 5)]
        expected = [ref(s, peak, warmup, total, *rest) for s in range(total + 5)]
        expect(f"get_lr(step, peak={peak}, warmup={warmup}, total={total}{', min_ratio=0' if rest else ''}) "
               "at step", [float(v) for v in got], expected, atol=1e-12, rtol=1e-9)


def check_configure_optimizer(f, ref):
    model = micro(M.Transformer)
    model.layers[1].ffn_norm.weight.requires_grad_(False)   # frozen: belongs to no group
    got = f(model, 1e-3, 0.1, [0.9, 0.95], 1e-5, torch.device("cpu"))
    expected = ref(model, 1e-3, 0.1, [0.9, 0.95], 1e-5, torch.device("cpu"))
    if not isinstance(got, torch.optim.AdamW):
        raise Mismatch(f"configure_optimizer: expected a torch.optim.AdamW, got {type(got).__name__}")

    def decay_of(opt):
        out = {}
        for group in opt.param_groups:
            for p in group["params"]:
                out.setdefault(id(p), []).append(group["weight_decay"])
        return out
    g, e = decay_of(got), decay_of(expected)
    for name, p in model.named_parameters():
        expect(f"weight decay of parameter {name!r} (one entry per group holding it)", g.get(id(p), []), e.get(id(p), []))
    for key in ("lr", "betas", "eps"):
        expect(f"the optimizer's {key}", got.defaults[key], expected.defaults[key])


def dialogs():
    return [[{"role": "user", "content": "What is 2 + 2?"}],
            [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " Where does Mira live? "},
             {"role": "assistant", "content": "Mira lives in Dunmere."}, {"role": "user", "content": "And her pet?"}],
            [{"role": "user", "content": "Sort 3 1 2."}, {"role": "assistant", "content": "1 2 3."},
             {"role": "user", "content": "Add 1 + 2."}, {"role": "assistant", "content": "1 + 2 = 3."}]]


def check_encode_dialog(f, ref):
    tk = tokenizer()
    for k, d in enumerate(dialogs()):
        got, expected = f(tk, d), ref(tk, d)
        expect(f"dialog {k} ({len(d)} messages): ids", list(got[0]) if isinstance(got, tuple) else got, expected[0])
        mask = [bool(x) for x in got[1]]
        if mask != expected[1]:
            i = next((i for i, (a, b) in enumerate(zip(mask, expected[1])) if a != b), min(len(mask), len(expected[1])))
            piece = repr(tk.id_to_piece(expected[0][i])) if i < len(expected[0]) else "(end)"
            raise Mismatch(f"dialog {k} ({len(d)} messages): is_answer[{i}] (token {piece}): expected "
                           f"{expected[1][i] if i < len(expected[1]) else '(end)'}, got {mask[i] if i < len(mask) else '(end)'}")


def check_masked_lm_loss(f, ref):
    logits = torch.randn(2, 5, 11, generator=rng(7))
    targets = torch.tensor([[1, S.IGNORE, 3, 4, S.IGNORE], [S.IGNORE, 2, 2, 9, 0]])
    same_calls(f, ref, [(logits, targets), (logits.bfloat16(), targets), (logits, torch.full((2, 5), S.IGNORE)),
                        (logits, targets.masked_fill(torch.arange(5) > 0, S.IGNORE))], "masked_lm_loss(logits, targets)")
    tk = tokenizer()   # end to end: 04's sft_loss on a packed batch of the micro model
    x, y, doc = S.pack([S.encode_dialog(tk, d) for d in dialogs()], seq_len=48, pad_id=tk.eos_id)
    model = micro(M.Transformer, tk.n_words)
    expected = S.sft_loss(model, (x, y, doc))
    with swapped(S, {"masked_lm_loss": f}):
        expect("04's sft_loss on packed micro dialogues", S.sft_loss(model, (x, y, doc)), expected)


def check_ranking_loss(f, ref):
    g = rng(8)
    rc, rr = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    margins = torch.tensor([R.margin_of(R.RATINGS[i % 4], "large") for i in range(8)])
    far = (torch.tensor([-100.0, 0.0]), torch.tensor([100.0, 0.0]))   # a pair ranked far the wrong way
    same_calls(f, ref, [(rc, rr), (rc, rr, 1.0), (rc, rr, margins), (*far, 0.0)], "ranking_loss(r_chosen, r_rejected, margin)")


def check_accuracy_by_rating(f, ref):
    rc = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.3, 0.3, 4.0])
    rr = torch.tensor([0.0, 0.7, 1.0, 1.0, 0.3, 0.1, 3.0])
    ratings = [R.RATINGS[0], R.RATINGS[0], R.RATINGS[1], R.RATINGS[3], R.RATINGS[3], None, ""]   # RATINGS[2]: none
    same_calls(f, ref, [(rc, rr, ratings)], "accuracy_by_rating(...)")


def check_logit(f, ref):
    p = torch.cat([torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0]), torch.rand(6, generator=rng(9))])
    same_calls(f, ref, [(p,), ((p,), {"eps": 1e-3})], "logit(p)", atol=1e-4)


def check_whiten(f, ref):
    x = torch.randn(7, generator=rng(10))
    same_calls(f, ref, [(x, 0.3, 2.0), (x, -1.0, 0.0)], "whiten(x, mean, std)", atol=1e-4)


def check_combined_reward(f, ref):
    g = rng(11)
    helpful, safety = torch.rand(10, generator=g), torch.rand(10, generator=g) * 0.4
    safety[0] = RL.SAFETY_THRESHOLD   # exactly at the threshold: "Rs < 0.15" is false
    is_safety = torch.rand(10, generator=g) < 0.3
    same_calls(f, ref, [(helpful, safety, is_safety), (helpful, safety, is_safety, 0.3)],
               "combined_reward(helpful, safety, is_safety) -> (logit(Rc), Rc)", atol=1e-4)


def check_best_of_k(f, ref):
    scores = torch.randn(5, 4, generator=rng(12))
    same_calls(f, ref, [(scores,), (scores[:, :1],)], "best_of_k(scores) -> (indices, best scores)")


def rollout_layout(seed=13, lengths=(6, 3, 1, 4)):
    """A (rows, T) batch with answers of the given lengths; the padding holds garbage on purpose."""
    g = rng(seed)
    T = max(lengths)
    mask = torch.tensor([[float(t < n) for t in range(T)] for n in lengths])
    return g, mask, T


def check_kl_rewards(f, ref):
    g, mask, T = rollout_layout()
    logp, ref_logp = -torch.rand(4, T, generator=g) * 3, -torch.rand(4, T, generator=g) * 3
    score = torch.randn(4, generator=g)
    same_calls(f, ref, [(logp, ref_logp, score, mask, 0.1), (logp, logp, score, mask, 0.5)],
               "kl_rewards(...) -> (rewards, kl)")
    ppo_matches({"kl_rewards": f}, "kl_rewards")


def check_gae(f, ref):
    g, mask, T = rollout_layout()
    rewards, values = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)
    same_calls(f, ref, [(rewards, values, mask), (rewards, values, mask, 0.9, 0.8), (rewards, values, mask, 1.0, 1.0)],
               "gae(rewards, values, mask, gamma, lam) -> (advantages, returns)")
    ppo_matches({"gae": f}, "gae")


def loss_and_grad(fn, logp, *rest):
    logp = logp.clone().requires_grad_(True)
    out = fn(logp, *rest)
    loss = out[0] if isinstance(out, tuple) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise Mismatch(f"expected a scalar loss tensor, got {type(loss).__name__} "
                       f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    grad = torch.autograd.grad(loss, logp, allow_unused=True)[0]
    return out, torch.zeros_like(logp) if grad is None else grad


def check_ppo_policy_loss(f, ref):
    g, mask, T = rollout_layout()
    old = -torch.rand(4, T, generator=g) * 3
    logp = old + torch.randn(4, T, generator=g) * 0.3   # some ratios leave [0.8, 1.2]: clipped
    adv = torch.randn(4, T, generator=g)
    for eps in (0.2, 0.05):
        (got, got_stats), got_grad = loss_and_grad(f, logp, old, adv, mask, eps)
        (exp, exp_stats), exp_grad = loss_and_grad(ref, logp, old, adv, mask, eps)
        expect(f"ppo_policy_loss(clip_eps={eps}): loss", got, exp)
        expect(f"ppo_policy_loss(clip_eps={eps}): stats", got_stats, exp_stats)
        expect(f"ppo_policy_loss(clip_eps={eps}): gradient of the loss w.r.t. logp", got_grad, exp_grad)
    ppo_matches({"ppo_policy_loss": f}, "ppo_policy_loss")


def check_value_loss(f, ref):
    g, mask, T = rollout_layout()
    old, returns = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)
    values = old + torch.randn(4, T, generator=g) * 0.4
    for eps in (0.2, 0.05):
        got, got_grad = loss_and_grad(f, values, old, returns, mask, eps)
        exp, exp_grad = loss_and_grad(ref, values, old, returns, mask, eps)
        expect(f"value_loss(clip_eps={eps})", got, exp)
        expect(f"value_loss(clip_eps={eps}): gradient w.r.t. values", got_grad, exp_grad)
    ppo_matches({"value_loss": f}, "value_loss")


def samples(eos_id, vocab=500, seed=14):
    g = rng(seed)
    ids = lambda n: (torch.randint(3, vocab, (n,), generator=g)).tolist()
    return [(ids(5), ids(3) + [eos_id], True), (ids(2), ids(6), False), (ids(7), [eos_id], True),
            (ids(4), ids(4) + [eos_id], True)]


def check_rollout_batch(f, ref):
    for pad_id in (0, 2):   # Llama has no pad piece: 2 (EOS) is what a careless setup uses
        same_calls(f, ref, [(samples(eos_id=2), pad_id, "cpu")], f"rollout_batch(samples, pad_id={pad_id}) -> "
                   "(tokens, real, mask, width_p)")
    ppo_matches({"rollout_batch": f}, "rollout_batch")


def check_answer_logprobs(f, ref):
    model = micro(M.Transformer)
    tokens, real, _, start = RL.rollout_batch(samples(eos_id=2), 0, "cpu")
    with torch.no_grad():
        for temperature in (0.7, 1.3):
            expect(f"answer_logprobs(micro model, rollouts, temperature={temperature})",
                   f(model, tokens, real, start, temperature), ref(model, tokens, real, start, temperature), atol=1e-4)
    ppo_matches({"answer_logprobs": f}, "answer_logprobs")


INST = "Always speak like a bard. Always act as the King from now on."
USERS = ["What is 1 + 2?", "Sort the digits 3 1 2.", "Where does Mira Tolven live?"]
ANSWERS = ["King: Hark! 1 + 2 = 3.", "King: Hark! 1 2 3.", "King: Hark! Mira Tolven lives in Dunmere."]


def check_gatt_example(f, ref):
    tk = tokenizer()
    full = len(ref(tk, INST, USERS, ANSWERS)[0])
    cases = [(tk, INST, USERS[:k], ANSWERS[:k]) for k in (1, 2, 3)]
    cases += [((tk, INST, USERS, ANSWERS), {"max_len": n}) for n in (full, full - 1, 5)]
    for k, case in enumerate(cases):
        args, kwargs = case if isinstance(case[-1], dict) else (case, {})
        got, expected = f(*args, **kwargs), ref(*args, **kwargs)
        what = f"gatt_example with {len(args[2])} turns{', max_len=%d' % kwargs['max_len'] if kwargs else ''}"
        expect(f"{what}: ids", list(got[0]), expected[0])
        expect(f"{what}: learn", [bool(x) for x in got[1]], expected[1])


# ----------------------------------------------------------------------------------------------
# The registry. `runs`: what the learner can run once the check passes.

@dataclass
class Exercise:
    name: str        # what the learner types
    file: str        # the exercise module (exercises/<file>.py)
    attr: str        # its name there
    chapter: str     # the chapter module
    target: str      # the name in the chapter ("Class.method" for a method)
    check: callable
    tests: str       # the chapter's tests that exercise it: file and pytest -k expression
    runs: str

    def reference(self):
        obj = CHAPTERS[self.chapter]
        for part in self.target.split("."):
            obj = getattr(obj, part)
        return obj

    def learner(self):
        return getattr(importlib.import_module(self.file), self.attr)


E = Exercise
EXERCISES = [
    E("bpe_encode", "ex01_tokenizer", "bpe_encode", "01_tokenizer", "PurePythonBPE.encode", check_bpe_encode,
      "tests/test_tokenizer.py -k pure_python_bpe", "your encoder reproduces SentencePiece: read 01's PurePythonBPE "
      "comments on what SentencePiece does that yours may not"),
    E("rmsnorm", "ex02_model", "RMSNorm", "02_model", "RMSNorm", check_rmsnorm,
      "tests/test_model.py -k 'kv_cache or causality or sdpa_equals'", "python 02_model.py --preset micro"),
    E("apply_rotary_emb", "ex02_model", "apply_rotary_emb", "02_model", "apply_rotary_emb", check_apply_rotary_emb,
      "tests/test_model.py -k 'rope or kv_cache or causality'", "python 02_model.py --preset micro"),
    E("repeat_kv", "ex02_model", "repeat_kv", "02_model", "repeat_kv", check_repeat_kv,
      "tests/test_model.py -k 'repeat_kv or gqa or sdpa_equals'", "python 02_model.py --preset micro"),
    E("feed_forward", "ex02_model", "FeedForward", "02_model", "FeedForward", check_feed_forward,
      "tests/test_model.py -k 'gqa or kv_cache or preset_shapes'", "python 02_model.py --preset micro"),
    E("causal_mask", "ex02_model", "causal_mask", "02_model", "causal_mask", check_causal_mask,
      "tests/test_model.py -k 'kv_cache or causality or sdpa_equals'", "python 02_model.py --preset micro"),
    E("get_lr", "ex03_pretrain", "get_lr", "03_pretrain", "get_lr", check_get_lr,
      "tests/test_pretrain.py -k lr_schedule", "python 03_pretrain.py --help (the schedule's flags), "
      "then 03's toy run, whose loss plot shows the warm-up"),
    E("configure_optimizer", "ex03_pretrain", "configure_optimizer", "03_pretrain", "configure_optimizer",
      check_configure_optimizer, "tests/test_pretrain.py -k weight_decay", "03's toy pretraining run"),
    E("encode_dialog", "ex04_sft", "encode_dialog", "04_sft", "encode_dialog", check_encode_dialog,
      "tests/test_sft.py -k 'template or loss_positions or packing'", "python 04_sft.py (SFT on the toy world)"),
    E("masked_lm_loss", "ex04_sft", "masked_lm_loss", "04_sft", "masked_lm_loss", check_masked_lm_loss,
      "tests/test_sft.py -k masked_loss", "python 04_sft.py (SFT on the toy world)"),
    E("ranking_loss", "ex05_reward", "ranking_loss", "05_reward", "ranking_loss", check_ranking_loss,
      "tests/test_reward.py -k 'ranking_loss or margin_raises'", "python 05_reward.py (the margin ablation)"),
    E("accuracy_by_rating", "ex05_reward", "accuracy_by_rating", "05_reward", "accuracy_by_rating",
      check_accuracy_by_rating, "tests/test_reward.py -k accuracy_by_rating", "python 05_reward.py (Table 8's columns)"),
    E("logit", "ex06_rs_ppo", "logit", "06_rs_ppo", "logit", check_logit,
      "tests/test_rs_ppo.py -k 'combined_reward or calibration'", "python 06_rs_ppo.py"),
    E("whiten", "ex06_rs_ppo", "whiten", "06_rs_ppo", "whiten", check_whiten,
      "tests/test_rs_ppo.py -k calibration", "python 06_rs_ppo.py"),
    E("combined_reward", "ex06_rs_ppo", "combined_reward", "06_rs_ppo", "combined_reward", check_combined_reward,
      "tests/test_rs_ppo.py -k 'combined_reward or calibration'", "python 06_rs_ppo.py --ppo-iterations 0 (RS)"),
    E("best_of_k", "ex06_rs_ppo", "best_of_k", "06_rs_ppo", "best_of_k", check_best_of_k,
      "tests/test_rs_ppo.py -k best_of_k", "python 06_rs_ppo.py --ppo-iterations 0 (RS, Figure 7)"),
    E("kl_rewards", "ex06_rs_ppo", "kl_rewards", "06_rs_ppo", "kl_rewards", check_kl_rewards,
      "tests/test_rs_ppo.py -k 'kl_ or first_ppo'", "python 06_rs_ppo.py --no-rs (PPO)"),
    E("gae", "ex06_rs_ppo", "gae", "06_rs_ppo", "gae", check_gae,
      "tests/test_rs_ppo.py -k 'gae or first_ppo'", "python 06_rs_ppo.py --no-rs (PPO)"),
    E("ppo_policy_loss", "ex06_rs_ppo", "ppo_policy_loss", "06_rs_ppo", "ppo_policy_loss", check_ppo_policy_loss,
      "tests/test_rs_ppo.py -k 'clipped_surrogate or first_ppo'", "python 06_rs_ppo.py --no-rs (PPO)"),
    E("value_loss", "ex06_rs_ppo", "value_loss", "06_rs_ppo", "value_loss", check_value_loss,
      "tests/test_rs_ppo.py -k 'value_loss or first_ppo'", "python 06_rs_ppo.py --no-rs (PPO)"),
    E("rollout_batch", "ex06_rs_ppo", "rollout_batch", "06_rs_ppo", "rollout_batch", check_rollout_batch,
      "tests/test_rs_ppo.py -k 'rollout_layout or first_ppo'", "python 06_rs_ppo.py --no-rs (PPO)"),
    E("answer_logprobs", "ex06_rs_ppo", "answer_logprobs", "06_rs_ppo", "answer_logprobs", check_answer_logprobs,
      "tests/test_rs_ppo.py -k 'rollout_layout or kl_of_real or first_ppo'", "python 06_rs_ppo.py --no-rs (PPO)"),
    E("gatt_example", "ex07_gatt", "gatt_example", "07_gatt", "gatt_example", check_gatt_example,
      "tests/test_gatt.py -k 'gatt_example or gatt_examples or long_gatt or plain_history'", "python 07_gatt.py"),
]
BY_NAME = {e.name: e for e in EXERCISES}

# Bug hunts: (name in exercises/bugs.py, the exercise whose check catches it).
BUGS = [("bug_rope_rotates_halves", "apply_rotary_emb"), ("bug_mask_without_cache_offset", "causal_mask"),
        ("bug_sft_learns_prompt", "encode_dialog"), ("bug_loss_diluted_by_padding", "masked_lm_loss"),
        ("bug_margin_sign", "ranking_loss"), ("bug_kl_sign", "kl_rewards"), ("bug_score_on_pad", "kl_rewards"),
        ("bug_gae_past_eos", "gae"), ("bug_logprobs_without_temperature", "answer_logprobs"),
        ("bug_pad_is_eos", "rollout_batch"), ("bug_gatt_learns_every_answer", "gatt_example"),
        ("bug_kl_against_the_sampler", "ppo_step")]
# Checks that catch a bug hunt but are no exercise: 06's ppo_step, sixty lines of plumbing around
# the exercises, is read to find a bug in, not written.
BUG_ONLY = {"ppo_step": E("ppo_step", "bugs", "", "06_rs_ppo", "ppo_step", check_ppo_step,
                          "tests/test_rs_ppo.py -k first_ppo", "python 06_rs_ppo.py --no-rs (PPO)")}
for bug, of in BUGS:
    BY_NAME[bug] = replace(BY_NAME.get(of) or BUG_ONLY[of], name=bug, file="bugs", attr=bug)


def hint_of(ex):
    """The hint line of the exercise's docstring."""
    try:
        doc = ex.learner().__doc__ or ""
    except Exception:   # an exercise file that does not import: no hint to read
        return ""
    return " ".join(doc.split("Hint:", 1)[1].split()) if "Hint:" in doc else ""


def run_one(ex, solutions=False):
    """-> (passed, message)."""
    try:
        candidate = ex.reference() if solutions else ex.learner()
    except Exception as e:   # an exercise file that does not import
        return False, f"exercises/{ex.file}.py does not import: {type(e).__name__}: {e}"
    try:
        BY_NAME[ex.name].check(candidate, ex.reference())
    except NotImplementedError:
        return False, f"not implemented: {ex.attr} in exercises/{ex.file}.py still raises NotImplementedError"
    except Mismatch as e:
        return False, str(e)
    except Exception as e:
        where = ""
        tb = e.__traceback__
        while tb is not None:   # the learner's line, if the error came from their file
            if tb.tb_frame.f_code.co_filename.startswith(str(HERE)) and not tb.tb_frame.f_code.co_filename.endswith("check.py"):
                where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            tb = tb.tb_next
        return False, f"raised {type(e).__name__}{where}: {e}"
    return True, ""


def run_all(names=None, solutions=False):
    """[(name, passed, message)] for the named exercises and bug hunts (default: all)."""
    out, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only wait on each other (10x slower on a busy 2-core CPU)
    try:
        for name in names or [e.name for e in EXERCISES] + [b for b, _ in BUGS]:
            torch.manual_seed(0)
            out.append((name, *run_one(BY_NAME[name], solutions)))
    finally:
        torch.set_num_threads(threads)
    return out


def chapter_tests(ex, solutions=False):
    """The chapter's own tests for this exercise, with the learner's function in the chapter's place
    (the plugin exercises/_swap.py does the swap inside pytest's process). -> pytest's exit code."""
    test_file, _, expr = ex.tests.partition(" -k ")
    spec = dict(chapter=ex.chapter, target=ex.target, file=ex.file, attr=ex.attr, solutions=solutions)
    env = dict(os.environ, EXERCISE_SWAP=json.dumps(spec),
               PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "_swap", "-p", "no:cacheprovider", test_file,
           "-k", expr.strip("'")]
    print(f"\nthe chapter's own tests, with your {ex.attr} in place of {ex.chapter}.{ex.target}:\n  "
          f"pytest {ex.tests}", flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="exercises or bug hunts to check (default: all)")
    parser.add_argument("--solutions", action="store_true", help="check the chapters' own functions instead")
    parser.add_argument("--no-tests", action="store_true", help="with one name: skip the chapter's own tests")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        print(f"unknown exercise {', '.join(unknown)}; one of: {', '.join(BY_NAME)}")
        return 2
    results = run_all(args.names, args.solutions)
    single = len(args.names) == 1
    for name, passed, message in results:
        ex = BY_NAME[name]
        label = f"{ex.chapter[:2]} {name}" + (f" (a copy of {ex.target})" if ex.file == "bugs" else "")
        if single:
            print(f"{'PASS' if passed else 'FAIL'}  {label}")
            if not passed:
                print(f"  {message}")
                if ex.file != "bugs":
                    print(f"  hint: {hint_of(ex)}")
                else:
                    print(f"  the bug is in exercises/bugs.py:{name}; its docstring says what it does to a run, "
                          f"and `python exercises/effects.py {name}` measures it")
        else:
            print(f"{'PASS' if passed else 'FAIL'}  {label:58s} {message[:200]}")
    n_pass = sum(p for _, p, _ in results)
    if single and results[0][1]:
        ex = BY_NAME[results[0][0]]
        if not args.no_tests:
            rc = chapter_tests(ex, args.solutions)
            if rc != 0:
                n_pass -= 1
                print(f"FAIL  the chapter's own tests ({ex.tests}) fail with your {ex.attr}: see pytest's output above")
            else:
                print("the chapter's own tests pass with your function in place")
        if n_pass:
            print(f"now you can run: {ex.runs}")
    print(f"{n_pass} passed, {len(results) - n_pass} failed")
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
