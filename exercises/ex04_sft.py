"""Exercises for chapter 04 (paper Sec. 3.1, supervised fine-tuning). Check with:
    python exercises/check.py encode_dialog      (or masked_lm_loss)
"""
import importlib

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

import _setup  # noqa: F401

S = importlib.import_module("04_sft")   # S.check_dialog, S.B_INST, S.E_INST, S.B_SYS, S.E_SYS, S.IGNORE


def encode_dialog(tokenizer, dialog):
    """Meta's chat template as token ids, and the SFT loss mask (Sec. 3.1: "we zero-out the loss
    on tokens from the user prompt, so as a result, we backpropagate only on answer tokens").
    dialog: [{"role", "content"}], an optional system message, then user/assistant alternating.
    A system message is folded into the first user message: B_SYS + system + E_SYS + user.
    Every completed turn is tokenizer.encode(f"[INST] {user} [/INST] {answer} ", bos=True,
    eos=True) (contents .strip()-ed), encoded as one string; a final user message with no answer
    is encode(f"[INST] {user} [/INST]", bos=True, eos=False), the open prompt.
    Returns (ids, is_answer): two lists of the same length; is_answer[i] is True on an answer's
    tokens: its text, the space before EOS, and EOS (so the model learns to stop).
    Call S.check_dialog(dialog, answers_too=False) first, as the chapter does.
    Hint: the prompt's own ids, encode(f"[INST] {user} [/INST]", bos=True, eos=False), are a
    prefix of the turn's ids: everything after that prefix is the answer."""
    raise NotImplementedError


def masked_lm_loss(logits, targets):
    """Mean next-token negative log-likelihood over the answer tokens only (Sec. 3.1): targets
    equal to S.IGNORE (-100) carry no loss and do not count in the mean.
    Shapes: logits (batch, seq, vocab), any float dtype (compute in float32); targets (batch, seq)
    long -> a scalar. If no target is learned, 0.0 (not NaN).
    Hint: log_softmax, gather at targets.clamp(min=0) (-100 is no index), multiply by the
    mask and divide by its sum clamped to at least 1. Equal to F.cross_entropy(...,
    ignore_index=-100) whenever something is learned."""
    raise NotImplementedError
