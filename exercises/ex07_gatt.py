"""Exercises for chapter 07 (paper Sec. 3.3, Ghost Attention). Check with:
    python exercises/check.py gatt_example
"""
import importlib

import _setup  # noqa: F401

S = importlib.import_module("04_sft")   # S.encode_dialog: the template and its answer mask


def gatt_example(tokenizer, instruction: str, users, answers, max_len: int = None):
    """One GAtt training sample (Sec. 3.3). The answers were sampled with the instruction
    concatenated to every user message; the sample keeps it only in turn 1, as a system message
    [system, user 1, answer 1, user 2, answer 2, ...], and sets the loss "to 0 for all the tokens
    from the previous turns, including assistant messages": learn is True only on the LAST
    answer's tokens (its text, the space before EOS, and EOS).
    If max_len is given and the encoded dialogue is longer, drop the oldest turns after the first
    (messages 3 and 4 of the list, again and again) while it is too long and more than 2 turns remain.
    Shapes: users, answers: lists of n strings -> (ids, learn), two lists of the same length.
    Hint: S.encode_dialog gives (ids, is_answer); every turn opens with tokenizer.bos_id, so the
    last turn starts at the last BOS."""
    raise NotImplementedError
