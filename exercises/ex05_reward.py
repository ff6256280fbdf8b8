"""Exercises for chapter 05 (paper Sec. 3.2.2, reward modeling). Check with:
    python exercises/check.py ranking_loss      (or accuracy_by_rating)
"""
import importlib

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

import _setup  # noqa: F401

R = importlib.import_module("05_reward")   # R.RATINGS: the four ratings, best first


def ranking_loss(r_chosen, r_rejected, margin=0.0):
    """The binary ranking loss with a margin, Eq. 2 of Sec. 3.2.2:
        L = -log(sigmoid(r_chosen - r_rejected - m(r)))    averaged over the pairs
    The margin m grows with the rating (Table 27), so clearly different answers are pushed apart more.
    Shapes: r_chosen, r_rejected (pairs,) float; margin a float or (pairs,) -> a scalar.
    Hint: -F.logsigmoid(z), not -torch.log(torch.sigmoid(z)): the latter gives inf once
    r_chosen << r_rejected (sigmoid underflows to 0)."""
    raise NotImplementedError


def accuracy_by_rating(r_chosen, r_rejected, ratings) -> dict:
    """Table 8's accuracy: the share of pairs where chosen scores above rejected (a tie counts
    half), per rating and over all pairs.
    Shapes: r_chosen, r_rejected (pairs,) float; ratings: a list of pairs strings from R.RATINGS
    (or None / "" for no rating) -> a dict with
      out[r] for each r in R.RATINGS and "avg": a float, None where no pair has that rating;
      out["n"][r]: how many pairs each accuracy is over;
      out["right"]: per pair, 1.0, 0.0 or 0.5 (a tie), as a list in the pairs' order;
      out["rating"]: per pair, R.RATINGS.index(rating), or -1 for none.
    Hint: right = (r_c > r_r).float() + 0.5 * (r_c == r_r).float(); "avg" takes every pair."""
    raise NotImplementedError
