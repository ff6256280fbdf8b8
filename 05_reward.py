"""
Chapter 05: reward modelling (Llama 2 paper Sec. 3.2.1-3.2.2, Tables 6, 7, 8, 27, 28; Figure 6).

RLHF needs a judge it can query millions of times: a reward model (RM) that reads a prompt and
an answer and returns a scalar, higher for what people prefer. Meta trains it on binary
comparisons: an annotator sees two answers to one prompt, sampled from two model variants at
different temperatures, picks one and says by how much it is better (significantly, better,
slightly, negligibly / unsure). Helpfulness and safety are annotated separately, and two RMs
are trained, because the two goals pull apart (a refusal is safe and rarely helpful). This
chapter holds, in this order:
  1. the method: a comparison and its four ratings (rate), Table 6's statistics; RewardModel,
     02's Transformer initialised from the chat model, its next-token head replaced by a scalar
     head read at the last real token (left or right padding alike); ranking_loss, Eq. 1-2 with
     Table 27's margins; each RM's data mix; accuracy per rating (Tables 7 and 8),
  2. the toy world's part: a helpfulness set (half of its prompts adversarial, where a yes to a
     harmful request beats a refusal) and a safety set (red-team phrasings), the two annotators,
     who disagree exactly there, and collect(): two answers of the SFT model per prompt, at
     temperatures 0.7 and 1.3, judged,
  3. the loop (train_rm, on 03's train()), then evaluation, tables and figures,
  4. plumbing: the JSONL data (the toy sets are saved in the format that --helpful-data and
     --safety-data read, e.g. Anthropic's HH-RLHF), the command line, and main's steps.
About 800 lines, above the ~600 aimed at: two RMs, their toy data, five tables and a figure are
one section of the paper, and 06 and pipeline.py take the RM, the toy prompts and tables from here.

What to look at: Table 6 for the four sets; Table 8, the paper's row under each of ours: is each
RM more accurate on clear-cut pairs than on near ties, and each best on its own test set (Table
7: the two annotators disagree on harmful requests)? Then what the Helpfulness RM tells apart
(pairs with one careless answer, of two careful ones, of two careful sums): what chapter 06 can
gain follows from it. The margin ablation (Table 28) and accuracy against data size (Figure 6):
set their differences against the noise of a test set of this size. README.md holds the
measured ranges. Outputs in RUN_DIR: rm_helpful.pt, rm_safety.pt (chapter 06 scores its policy
with them, through RewardModel and score_texts), reward.json, reward_margins.png,
reward_scaling.png, prefs_helpful.jsonl, prefs_safety.jsonl.

Run:
  python 05_reward.py                                      # toy, from runs/toy/sft.pt: ~2 min on 2 CPU cores
  python 05_reward.py --margin large --no-ablations        # just the two RMs
  python 05_reward.py --init runs/1b/sft.pt --tokenizer runs/1b/tokenizer.model --preset 1B \\
      --device cuda --dtype bf16 --helpful-data helpful.jsonl --safety-data harmless.jsonl --no-ablations
  torchrun --nproc_per_node=8 05_reward.py --init llama-2-7b-chat --tokenizer tokenizer.model \\
      --preset 7B --fsdp --activation-checkpointing --dtype bf16 --helpful-data helpful.jsonl \\
      --safety-data harmless.jsonl --no-ablations
  (the paper's hyper-parameters are the defaults of the big presets: 512 pairs a step, LR 1e-5,
  5e-6 with --preset 70B)
A data line: {"prompt": "..." or [messages ending with the user's], "chosen": "...",
"rejected": "...", "rating": "better"} (rating optional, one of the four; without it the margin is 0).
"""
import argparse
import copy
import functools
import importlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
S = importlib.import_module("04_sft")
UserError = tok.UserError

# The paper's RM settings (Sec. 3.2.2): one epoch ("training longer can lead to over-fitting"),
# max LR 1e-5 (5e-6 for 70B), cosine to 10%, warm-up 3% of the steps (at least 5), 512 pairs
# (1,024 rows) per batch. A step holds batch_tokens / (2 * seq_len) pairs: 03's loop counts
# tokens, so a pair counts as two rows of seq_len (we pad each micro-batch only to its longest
# row, so the tokens/s in the log counts padding up to seq_len: an upper bound).
# micro_batch is in rows, chosen and rejected of a pair side by side: it must be even.
PAPER = dict(batch_tokens=512 * 2 * 4096, seq_len=4096, micro_batch=2,
             lr={"1B": 1e-5, "7B": 1e-5, "13B": 1e-5, "34B": 1e-5, "70B": 5e-6},
             log_every=10, eval_every=100, ckpt_every=100, sample_batch=S.PAPER["sample_batch"])
# Toy: 32 pairs per step; rows of the toy world are < 80 tokens. The toy's small trunk needs a
# far higher LR than 7B's to move in a few dozen steps (1e-3: the best of those tried, 3e-5 to
# 3e-3). On a CPU, sampling a comparison costs several times more than training on it: the toy's
# data, not its steps, is what its time budget limits.
TOY = dict(batch_tokens=32 * 2 * 96, seq_len=96, micro_batch=64, lr=1e-3,
           log_every=25, eval_every=1000, ckpt_every=50, sample_batch=S.TOY["sample_batch"])


# ========================================================================================
# Part 1: the method of Sec. 3.2.1-3.2.2, as small pure functions: the comparisons and their
# ratings, the reward model, its loss, each RM's data, the accuracy it is judged by.

# ----------------------------------------------------------------------------------------
# Human preference data (Sec. 3.2.1): binary comparisons. A comparison is a prompt (a dialogue
# ending with the user's turn), the chosen and the rejected answer, and the annotator's rating.

TEMPERATURES = (0.7, 1.3)   # two samples per prompt "at different temperatures" (Sec. 3.2.1)
RATINGS = ("significantly better", "better", "slightly better", "negligibly better / unsure")


def rate(task, a: str, b: str, score=S.gold_score):
    """Sec. 3.2.1: annotators "label the degree to which they prefer their chosen response over the
    alternative". Which answer is preferred (0 or 1) and by how much, one of the four RATINGS, from
    the gap between the two scores the annotator gives (04's gold score by default)."""
    sa, sb = score(task, a), score(task, b)
    gap = abs(sa - sb)
    rating = RATINGS[0] if gap >= 0.6 else RATINGS[1] if gap >= 0.3 else RATINGS[2] if gap >= 0.1 else RATINGS[3]
    return (0 if sa >= sb else 1), rating


@dataclass
class Comparison:
    prompt: list     # [{"role", "content"}, ...], the last one the user's
    chosen: str
    rejected: str
    rating: str      # one of RATINGS, or "" when the data has none (margin 0)
    kind: str = ""   # the toy task's kind (arithmetic, fact, list, harmful, benign)


def data_stats(tokenizer, comparisons) -> dict:
    """Table 6: "Statistics of human preference data for reward modeling". Its columns: comparisons,
    turns per dialogue, tokens per example, in the prompt and in the response; and each rating's share."""
    n_tokens = lambda text: len(tokenizer.encode(text, bos=False, eos=False))
    mean = lambda xs: sum(xs) / len(xs)
    example = [len(S.encode_dialog(tokenizer, c.prompt + [{"role": "assistant", "content": a}])[0])
               for c in comparisons for a in (c.chosen, c.rejected)]
    return {"comparisons": len(comparisons),
            "turns_per_dialogue": mean([sum(m["role"] == "user" for m in c.prompt) for c in comparisons]),
            "tokens_per_example": mean(example),
            "tokens_in_prompt": mean([n_tokens(c.prompt[-1]["content"]) for c in comparisons]),
            "tokens_in_response": mean([n_tokens(a) for c in comparisons for a in (c.chosen, c.rejected)]),
            "ratings": {r: sum(c.rating == r for c in comparisons) / len(comparisons) for r in RATINGS}}


# ----------------------------------------------------------------------------------------
# The reward model (Sec. 3.2.2): it "takes a model response and its corresponding prompt
# (including contexts from previous turns) as inputs and outputs a scalar score". Two of them, a
# Helpfulness RM and a Safety RM, since the two goals trade off. The architecture is "identical
# to those of the pretrained language models, except that the classification head for next-token
# prediction is replaced with a regression head for outputting a scalar reward". The scalar is
# read at the last real token (the EOS after the answer), the only position that has seen all of
# prompt and answer. Batches are padded; a pad mask says which tokens are real, so left padding
# (as PPO rollouts have) and right padding give the same score.

def pad_attention_mask(real):
    """(batch, seq) bool, True on real tokens -> (batch, 1, seq, seq): causal, pads hidden as keys.
    A pad query still sees itself, so no row of the softmax is empty (that would give NaN)."""
    seq = real.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=real.device).tril()
    own = torch.eye(seq, dtype=torch.bool, device=real.device)
    return (causal & (real[:, None, :] | own))[:, None]


class RewardModel(M.Transformer):
    def __init__(self, args: M.ModelArgs):
        super().__init__(args)
        self.output = None   # no next-token head...
        self.reward_head = nn.Linear(args.dim, 1, bias=False)   # ...a scalar one (no bias: the
        # ranking loss only sees differences of rewards, so a bias would get no gradient)
        nn.init.normal_(self.reward_head.weight, std=1 / math.sqrt(args.dim))   # small random rewards

    def forward(self, tokens, real=None, per_token: bool = False):
        """tokens (batch, seq); real: bool (batch, seq), True on real tokens (default: all).
        -> the reward at each row's last real token (batch,), float32; per_token=True gives the
        scalar head at every position (batch, seq): a value model's V(s_t), for chapter 06."""
        real = torch.ones_like(tokens, dtype=torch.bool) if real is None else real
        # only padding before a real token needs a mask: pads after the last one are unseen by
        # causal attention, and plain causal attention takes the fused kernel
        mask = pad_attention_mask(real) if (~real[:, :-1] & real[:, 1:]).any() else None
        h = self.features(tokens, mask=mask)
        if per_token:
            return self.reward_head(h).squeeze(-1).float()
        last = (real * torch.arange(real.shape[1], device=real.device)).argmax(-1)
        return self.reward_head(h[torch.arange(len(h), device=h.device), last]).squeeze(-1).float()

    @classmethod
    def from_lm(cls, path, device="cpu", seed: int = 0, lazy: bool = False):
        """Sec. 3.2.2: "We initialize our reward models from pretrained chat model checkpoints": the
        trunk's weights, a fresh head. Any of 02's formats (ours, Meta's, Hugging Face's), or an RM
        checkpoint (kept whole). lazy: as 02's from_pretrained (--fsdp: read as it is sharded)."""
        args, state = M.load_weights(path, lazy=lazy)
        state = {k: v for k, v in state.items() if k != "output.weight"}
        if "reward_head.weight" not in state:
            g = torch.Generator().manual_seed(seed)
            state["reward_head.weight"] = torch.randn(1, args.dim, generator=g) / math.sqrt(args.dim)
        return cls._build(args, state, path, device, torch.float32, lazy).train()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, lazy: bool = False):
        """Load an RM trained by this chapter (rm_helpful.pt, rm_safety.pt), in eval mode. lazy: as
        02's from_pretrained, left on the meta device until 03's shard_model reads it (--fsdp)."""
        ckpt = M.load_checkpoint(path, mmap=True)   # memory-mapped, as 02's load_weights says why
        state = ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict) or "model_args" not in ckpt:
            raise UserError(f"{path} is not a model checkpoint of this project")
        if "reward_head.weight" not in state:
            raise UserError(f"{path} is a language model, not a reward model (it has no reward head): "
                            "train one with 05_reward.py, or pass it as --init")
        return cls._build(M.args_from_dict(ckpt["model_args"]), state, path, device, dtype, lazy).eval()

    @classmethod
    def _build(cls, args, state, path, device, dtype, lazy=False):
        with torch.device("meta"):
            model = cls(args)
        M.check_state_dict(model, state, path)
        if lazy:
            model.pending = (state, dtype)
            return model
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype)


def encode_pair(tokenizer, prompt, answer: str, seq_len: int):
    """Prompt + answer in 04's chat template, ending with EOS. If too long, the oldest tokens go:
    the answer and its end, where the reward is read, are kept."""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return S.encode_dialog(tokenizer, prompt + [{"role": "assistant", "content": answer}])[0][-seq_len:]


def collate(rows, pad_id: int, device):
    """Token lists -> (tokens, real), right-padded to the longest row."""
    width = max(map(len, rows))
    tokens = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    return tokens, torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)


SCORE_BATCH = 64   # rows a scoring forward reads (score_rows)


@torch.no_grad()
def score_rows(model, rows, pad_id: int, batch_size: int = SCORE_BATCH, batches: int = 0):
    """The reward of each row, in the rows' order. Batches hold rows of similar length (sorted),
    so little of a batch is padding: a short answer and a refusal differ several-fold in length.
    batches: at least this many forwards, the extra ones on a row of padding (under FSDP each
    forward is a collective: every rank must run as many)."""
    device, out = next(model.parameters()).device, torch.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for i in range(0, len(rows), batch_size):
        idx = order[i:i + batch_size]
        out[idx] = model(*collate([rows[j] for j in idx], pad_id, device)).cpu()
    for _ in range(-(-len(rows) // batch_size), batches):
        model(*collate([[pad_id]], pad_id, device))
    return out


def score_texts(model, tokenizer, prompts, answers, batch_size: int = 64, seq_len=None):
    """Rewards for (prompt, answer) pairs, a prompt being a string or a dialogue: what chapter 06
    calls for every sampled answer."""
    seq_len = seq_len or model.args.max_seq_len
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    return score_rows(model, [encode_pair(tokenizer, p, a, seq_len) for p, a in zip(prompts, answers)],
                      pad_id, batch_size)


# ----------------------------------------------------------------------------------------
# The loss (Sec. 3.2.2, Eq. 1-2): the binary ranking loss of InstructGPT (Eq. 1), with a margin
# that grows with the rating (Eq. 2), so the RM separates clearly different answers by more.
# Table 27 gives two margin schemes, "small" and "large"; "none" is Eq. 1.

MARGINS = {"none": (0, 0, 0, 0), "small": (1, 2 / 3, 1 / 3, 0), "large": (3, 2, 1, 0)}   # Table 27


def ranking_loss(r_chosen, r_rejected, margin=0.0):
    """Eq. 2: L = -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r))), Eq. 1 with m = 0; the mean over the
    pairs. margin is m(r), a float or one per pair. logsigmoid avoids log(0) when r_c << r_r."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def margin_of(rating: str, scheme: str) -> float:
    """Sec. 3.2.2: "the margin m(r) is a discrete function of the preference rating": m(r) in
    Table 27's scheme ("none", "small" or "large"); 0 for a pair without a rating."""
    return MARGINS[scheme][RATINGS.index(rating)] if rating else 0.0


# ----------------------------------------------------------------------------------------
# The data of each RM (Sec. 3.2.2, Data Composition) and its schedule (Training Details).

SAFETY_SHARE_IN_SAFETY_RM = 0.9   # Sec. 3.2.2: the Safety RM's data is 90% safety, 10% helpfulness (mix())


def mix(helpful, safety, rm: str, how: str):
    """Sec. 3.2.2: the Helpfulness RM is "trained on all Meta Helpfulness data, combined with an
    equal parts of the remaining data uniformly sampled from Meta Safety and from the open-source
    datasets"; the Safety RM on Meta Safety and Anthropic Harmless data "mixed with Meta Helpfulness
    and open-source helpfulness data in a 90/10 proportion". The toy world has no open-source sets,
    and with the safety set alone in the Helpfulness RM's second half it would learn the safety
    annotator's choices on the very prompts where the two annotators disagree. So the Helpfulness
    RM gets all helpfulness data and safety data at a tenth of its data, the Safety RM's proportion
    mirrored. 'none': each RM on its own set. The sets arrive shuffled, so their heads are random
    samples."""
    if how == "none":
        return list(helpful if rm == "helpful" else safety)
    if rm == "helpful":
        return helpful + safety[:round(len(helpful) * (1 - SAFETY_SHARE_IN_SAFETY_RM) / SAFETY_SHARE_IN_SAFETY_RM)]
    return safety + helpful[:round(len(safety) * (1 - SAFETY_SHARE_IN_SAFETY_RM) / SAFETY_SHARE_IN_SAFETY_RM)]


def warmup_steps(flag, steps: int) -> int:
    """Sec. 3.2.2: "We use a warm-up of 3% of the total number of steps, with a minimum of 5."
    --warmup-steps (0 included) overrides it."""
    return max(5, math.ceil(0.03 * steps)) if flag is None else flag


# ----------------------------------------------------------------------------------------
# The accuracy an RM is judged by (Sec. 3.2.2, Reward Model Results): on held-out comparisons,
# the share the RM ranks as the annotator did, over all pairs (Table 7) and per rating (Table 8).

def accuracy_by_rating(r_chosen, r_rejected, ratings) -> dict:
    """Table 8: "Granular reward model accuracy per preference rating". The share of pairs where
    chosen scores above rejected (a tie counts half): per rating (None where the test set has none)
    and over all pairs ("avg", Table 7's figure and Table 8's last column). For intervals
    (04's bootstrap, in pipeline.py's report): "n", the pairs behind each accuracy, and per pair
    in the test set's order "right" (1, 0, or 0.5 for a tie) and "rating" (its index in RATINGS,
    -1 for none): two RMs on the same test pairs are compared pair by pair."""
    right = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    out, n = {}, {}
    for r in RATINGS + ("avg",):
        pick = [i for i, x in enumerate(ratings) if r in (x, "avg")]
        out[r] = right[pick].mean().item() if pick else None
        n[r] = len(pick)
    return {**out, "n": n, "right": right.tolist(),
            "rating": [RATINGS.index(x) if x in RATINGS else -1 for x in ratings]}


# ========================================================================================
# Part 2: the toy world's part: the prompts of a helpfulness set and a safety set (04's dialogue
# tasks), the two annotators, and the comparisons collected as Sec. 3.2.1 collects them.

HELPFUL_KINDS = ("arithmetic", "fact", "list")
# Red-teaming (Sec. 4.3): phrasings the SFT data never used. The SFT model refuses harmful
# requests in 04's three phrasings every time, so comparing two of its answers would never show
# a compliance; in these it sometimes complies, which is the failure a Safety RM must learn to
# score low. The benign look-alikes get the same phrasings, so the wording gives nothing away.
RED_TEAM = ["Explain, step by step, how to {act}.", "Is it fine to {act}?", "Can you {act} for me?",
            "{act}: how?"]
# Sec. 3.2.2: "a complete answer to an unsafe request is helpful and unsafe", which makes it hard
# for one RM to do well on both. The helpfulness annotators see such prompts too, and judge them
# for helpfulness alone: half of the toy helpfulness set is the safety set's kind of prompt. (With a
# quarter, the Helpfulness RM's preference on harmful requests hung on the seed: its tenth of safety
# pairs, which prefer the refusal, nearly outweighed the helpfulness pairs that prefer the yes.)
ADVERSARIAL_SHARE = 0.5


def act_of(task) -> str:
    """The act a harmful or benign request asks about (a harmful task's target is empty: what
    the gold annotator looks for there is a refusal)."""
    return task.target or task.answer.split(": to ", 1)[1].split(" is harmful")[0]


def safety_task(world, rng, evaluation: bool = False):
    """A harmful request or its benign look-alike, three in four in red-team phrasings."""
    task = S.make_task(world, rng.choice(("harmful", "benign")), rng, evaluation)
    if rng.random() < 0.75:
        task = S.Task(task.kind, rng.choice(RED_TEAM).format(act=act_of(task)), task.answer, task.target, task.subject)
    return task


def helpful_task(world, rng, evaluation: bool = False):
    """A prompt of the helpfulness set: a task that deserves help (04's mix of sums, facts and
    lists), or with probability ADVERSARIAL_SHARE a prompt of the safety set's kind."""
    if rng.random() < ADVERSARIAL_SHARE:
        return safety_task(world, rng, evaluation)
    return S.make_task(world, rng.choices(HELPFUL_KINDS, [S.KINDS[k] for k in HELPFUL_KINDS])[0], rng, evaluation)


# ----------------------------------------------------------------------------------------
# The two annotators: each scores an answer in [0, 1], and rate() turns two scores into a rating.

def helpfulness_score(task, answer: str) -> float:
    """The helpfulness annotator: how fully the answer does what was asked, safe or not. A harmful
    request is judged as its benign look-alike is (help with the act asked about 1, a vague yes
    0.5, a refusal 0); everything else as 04's gold score. Where the request is harmful it ranks
    the two answers the other way round from the safety annotator: the tension of Sec. 3.2.2."""
    if task.kind == "harmful":
        task = S.Task("benign", task.prompt, task.answer, act_of(task), task.subject)
    return S.gold_score(task, answer)


def safety_score(task, answer: str) -> float:
    """The safety annotator. Harmful request: complying scores 0; a refusal 0.6, plus up to 0.4
    for explaining the risk as the reference does (Sec. 4.2.1: a safe answer explains "the
    potential risks"), by the share of the reference refusal's words it uses. Benign look-alike:
    04's gold score, so a false refusal scores 0. Without that half, "always refuse" would be
    a perfect safety policy, and the Safety RM could rank by spotting "I cannot" alone; with
    it, the RM must read which act is asked about."""
    if task.kind != "harmful":
        return S.gold_score(task, answer)
    if not S.is_refusal(answer):
        return 0.0
    words, reference = set(answer.lower().split()), task.answer.lower().split()
    return 0.6 + 0.4 * sum(w in words for w in reference) / len(reference)


def collect(models, tokenizer, make_task, score, n: int, seed: int, max_new_tokens: int = 32, log=print,
            compile=False, batch_size: int = 64):
    """n comparisons: per prompt, one answer from each of models[0] and models[1] (two model
    variants, or one twice) at TEMPERATURES, shown to the annotator (score) in random order;
    identical answers are dropped. compile: 02's compiled decoding step (--compile-decode)."""
    rng, device, t0 = random.Random(seed), next(models[0].parameters()).device, time.time()
    generator = torch.Generator(device=device).manual_seed(seed)
    out, n_identical, n_prompts = [], 0, 0
    while len(out) < n:   # n prompts, then what is missing at the share of non-identical pairs so far
        share = len(out) / n_prompts if n_prompts else 1.0
        tasks = [make_task(rng) for _ in range(max(64, math.ceil(1.05 * (n - len(out)) / max(share, 0.02))))]
        dialogs = [[{"role": "user", "content": t.prompt}] for t in tasks]
        answers = [S.answer_all(m, tokenizer, dialogs, max_new_tokens, batch_size, temperature, 1.0, generator,
                                compile) for m, temperature in zip(models, TEMPERATURES)]
        n_prompts += len(tasks)
        for task, dialog, a, b in zip(tasks, dialogs, *answers):
            if a == b:
                n_identical += 1
                continue
            if rng.random() < 0.5:   # the order shown: on a tie in score the annotator picks either
                a, b = b, a
            first, rating = rate(task, a, b, score)
            out.append(Comparison(dialog, *((a, b) if first == 0 else (b, a)), rating, task.kind))
        if n_prompts > 50 * n:
            raise UserError(f"after {n_prompts} prompts only {len(out)} comparisons: the two answers "
                            "are almost always identical (temperature 0?)")
    log(f"  {n:,} comparisons from {n_prompts:,} prompts ({n_identical:,} pairs of identical answers dropped) "
        f"in {time.time() - t0:.0f}s")
    return out[:n]


# ========================================================================================
# Part 3: the loop that trains an RM (03's), then evaluation, tables and figures.

# ----------------------------------------------------------------------------------------
# Training: 03's loop. A batch is a pure function of (step, micro-step), so resume is exact.

def encode_set(tokenizer, comparisons, seq_len: int):
    """-> [(chosen ids, rejected ids, rating)]."""
    return [(*(encode_pair(tokenizer, c.prompt, a, seq_len) for a in (c.chosen, c.rejected)), c.rating)
            for c in comparisons]


VAL_PAIRS = 512   # the progress lines' accuracy: on this many of the RM's test pairs


@dataclass
class Run:
    """What main's steps and each RM's training share, made once by main (part 4)."""
    args: argparse.Namespace
    init: str             # the chat model the RMs start from (a path); it samples the toy answers too
    tokenizer: tok.Tokenizer
    pad_id: int
    rank: int
    device: torch.device
    log: object


def train_rm(run: Run, title: str, pairs, scheme: str, tests, own: str, ckpt_path):
    """One epoch of pairs, with Table 27's margin scheme -> (RM, {test set: accuracies}, 03's
    result). tests[own] is the test set whose accuracy the progress lines show; ckpt_path None: an
    ablation run."""
    args, rank, device, pad_id = run.args, run.rank, run.device, run.pad_id
    cfg = copy.copy(args)
    per_step = args.batch_tokens // (2 * args.seq_len)
    cfg.steps = max(1, math.ceil(args.epochs * len(pairs) / per_step))
    cfg.warmup_steps = warmup_steps(args.warmup_steps, cfg.steps)
    if ckpt_path is None:   # an ablation run: no checkpoint, so no resume or stop either
        cfg.resume, cfg.stop_at = False, None
    cfg.resume = cfg.resume and P.checkpoint_exists(ckpt_path, cfg)   # cut off before this RM began: start it
    margins = torch.tensor([margin_of(p[2], scheme) for p in pairs])
    run.log(f"\n== {title}: {len(pairs):,} comparisons, margin {scheme} | {cfg.steps} steps of {per_step} pairs | "
            f"peak LR {cfg.lr:g}, warm-up {cfg.warmup_steps} steps ==")
    torch.manual_seed(args.seed)
    model = RewardModel.from_lm(run.init, P.build_device(args, device), args.seed,
                                lazy=args.fsdp)   # under --fsdp, train() shards it, reading a block at a time
    orders = {}   # a fresh shuffle per epoch, a pure function of (seed, epoch)
    order = lambda epoch: torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))

    def get_batch(step, micro):   # rank r, micro-step k: pairs (k * world + r) * micro/2 + [0, micro/2)
        first = step * per_step + (micro * args.world_size + rank) * (args.micro_batch // 2)
        idx = []
        for i in range(first, first + args.micro_batch // 2):
            epoch = i // len(pairs)
            orders.setdefault(epoch, order(epoch))
            idx.append(int(orders[epoch][i % len(pairs)]))
        tokens, real = collate([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], pad_id, device)
        return tokens, real, margins[idx].to(device)

    def compute_loss(model, batch):   # chosen and rejected in one forward: the rows share weights
        tokens, real, m = batch
        rewards = model(tokens, real)
        return ranking_loss(rewards[:len(m)], rewards[len(m):], m)

    val, last = tests[own][:VAL_PAIRS], {}

    part = (rank, args.world_size)   # each rank scores a share of the pairs

    def evaluate(model):   # train() calls it after the last step too: a whole test set is not scored twice
        last[own] = evaluate_rm(model, val, pad_id, part=part)
        return {"val_acc": last[own]["avg"]}

    out = P.train(cfg, model, get_batch, compute_loss, evaluate, ckpt_path,
                  extra={"kind": "reward_model", "margin": scheme, "init": str(run.init)})
    whole = {own: last[own]} if own in last and len(val) == len(tests[own]) else {}
    return model, {k: whole.get(k) or evaluate_rm(model, t, pad_id, part=part) for k, t in tests.items()}, out


# ----------------------------------------------------------------------------------------
# Evaluation: an RM's accuracy on a test set, and what it tells apart.

def evaluate_rm(model, test, pad_id: int, batch_size: int = 128, part=(0, 1)) -> dict:
    """An RM on encoded test pairs (Table 7's cell, Table 8's row): accuracy_by_rating, and the
    rewards' mean and spread. part=(rank, ranks), under torchrun: each rank scores its share of the
    pairs (pair i on rank i % ranks) in as many batches as the others, and all get every score
    back (03's gather_shares) and the same figures."""
    if not test:
        return {}
    was_training = model.training
    model.eval()
    rank, ranks = part
    batches = -(-(-(-len(test) // ranks)) // batch_size)   # the largest share's
    r_chosen, r_rejected = (score_rows(model, [t[k] for t in test[rank::ranks]], pad_id, batch_size, batches)
                            for k in (0, 1))
    if ranks > 1:
        scores = P.gather_shares(list(zip(r_chosen.tolist(), r_rejected.tolist())), len(test))
        r_chosen, r_rejected = (torch.tensor(s) for s in zip(*scores))
    model.train(was_training)
    rewards = torch.cat([r_chosen, r_rejected])   # the scale is arbitrary (only differences are
    # trained): chapter 06 whitens rewards with statistics like these
    return {**accuracy_by_rating(r_chosen, r_rejected, [t[2] for t in test]),
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item()}


def careless_split(model, comparisons, encoded, pad_id: int) -> dict:
    """What an RM can tell apart: its accuracy on the pairs where one answer is the careless
    annotator's (04's tail of poorly executed SFT data, Sec. 5.1), on pairs of two careful
    answers, and on two careful answers to a sum. Pairs rated "negligibly better / unsure" are
    left out: on a near tie the annotator's pick is a coin toss. -> {name: (accuracy, pairs)}."""
    careless = {i: (S.is_careless(c.chosen), S.is_careless(c.rejected))
                for i, c in enumerate(comparisons) if c.rating != RATINGS[-1]}
    groups = {"one careless answer": [i for i, (a, b) in careless.items() if a != b],
              "two careful answers": [i for i, (a, b) in careless.items() if not (a or b)]}
    groups["two careful answers to a sum"] = [i for i in groups["two careful answers"]
                                              if comparisons[i].kind == "arithmetic"]
    out = {}
    for name, idx in groups.items():
        rows = [encoded[i] for i in idx]
        acc = evaluate_rm(model, rows, pad_id)["avg"] if rows else None
        out[name] = (acc, len(idx))
    return out


# ----------------------------------------------------------------------------------------
# Tables and figures.

RM_NAMES = {"helpful": "Helpfulness RM", "safety": "Safety RM"}
PAPER_TABLE8 = {"Safety RM, safety test": (94.3, 76.3, 65.7, 55.3, 64.5),   # Meta Safety test set
                "Helpfulness RM, safety test": (89.9, 73.2, 63.8, 54.5, 62.8),
                "Safety RM, helpful test": (64.6, 57.5, 53.8, 52.2, 56.2),   # Meta Helpful test set
                "Helpfulness RM, helpful test": (80.7, 67.5, 60.9, 54.7, 63.2)}
PAPER_TABLE28 = {"none": (79.1, 66.9, 59.8, 54.5, 62.5), "small": (80.4, 67.3, 60.4, 55.0, 63.0),
                 "large": (80.7, 67.5, 60.5, 54.3, 62.9)}
SHORT = ("sig. better", "better", "slightly", "negligibly", "avg")
pct = lambda x: f"{100 * x:.1f}" if x is not None else "-"


def print_table6(stats: dict):
    print(f"\n{'data (cf. Table 6)':<20}{'comparisons':>12}{'turns':>7}{'tokens/ex.':>11}{'prompt':>8}{'response':>9}"
          + "".join(f"{s:>13}" for s in SHORT[:4]))
    for name, s in stats.items():
        print(f"{name:<20}{s['comparisons']:>12,}{s['turns_per_dialogue']:>7.1f}{s['tokens_per_example']:>11.1f}"
              f"{s['tokens_in_prompt']:>8.1f}{s['tokens_in_response']:>9.1f}"
              + "".join(f"{s['ratings'][r]:>13.0%}" for r in RATINGS))


def print_table(title: str, rows: dict, paper: dict = None):
    print(f"\n{title:<36}" + "".join(f"{s:>13}" for s in SHORT))
    for name, acc in rows.items():
        print(f"{name:<36}" + "".join(f"{pct(acc[r]):>13}" for r in RATINGS + ("avg",)))
        if paper and name in paper:
            print(f"{'  (paper)':<36}" + "".join(f"{x:>13.1f}" for x in paper[name]))


def plot_margins(path, ablation: dict, test):
    plt = P.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (scheme, acc) in enumerate(ablation.items()):
        values = [100 * (acc[r] or 0) for r in RATINGS + ("avg",)]
        bars = ax.bar([c + 0.27 * (i - 1) for c in range(5)], values, 0.27, label=f"margin {scheme}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(50, color="grey", ls="--", lw=1)
    n = [sum(t[2] == r for t in test) for r in RATINGS] + [len(test)]   # few pairs: noisy bars
    ax.set_xticks(range(5), [f"{label}\n({k} pairs)" for label, k in zip(SHORT, n)])
    ax.set(ylim=(0, 105), ylabel="held-out accuracy (%)",
           title="Helpfulness RM: margin ablation by rating (cf. Table 28)")
    ax.legend(fontsize=8)
    P.save_figure(plt, fig, path)


def plot_scaling(path, scaling: list):
    plt = P.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    n = [s["comparisons"] for s in scaling]
    for test_name, key, label in (("helpful", "avg", "helpful test, all pairs"),
                                  ("helpful", RATINGS[0], "helpful test, significantly better"),
                                  ("safety", "avg", "safety test, all pairs")):   # a tiny test set may lack a rating
        if all(s["accuracy"].get(test_name, {}).get(key) is not None for s in scaling):
            ax.plot(n, [100 * s["accuracy"][test_name][key] for s in scaling], marker="o", label=label)
    ax.axhline(50, color="grey", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(n, [f"{x:,}" for x in n])
    ax.minorticks_off()
    ax.set(xlabel="training comparisons (Helpfulness RM's mix)", ylabel="held-out accuracy (%)", ylim=(40, 100),
           title="Helpfulness RM: accuracy against training data (cf. Figure 6)")
    ax.legend(fontsize=8)
    P.save_figure(plt, fig, path)


# ========================================================================================
# Part 4: plumbing: the JSONL data, the command line, and main's steps.

def write_jsonl(path, comparisons):
    lines = [json.dumps({"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "rating": c.rating,
                         "kind": c.kind}, ensure_ascii=False) for c in comparisons]
    tok.atomic_write_text(path, "\n".join(lines) + "\n")


def read_prompt(prompt, where: str):
    """A data line's prompt, a string or a list of messages ending with the user's, as a dialogue
    (06's prompt files use the same form)."""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    S.check_dialog(prompt, where)
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with the user's message")
    return prompt


def read_pairs_jsonl(path):
    """Pairwise data, one JSON object a line: prompt (a string or a list of messages ending with
    the user's), chosen, rejected, optional rating. Pairs with identical answers are skipped."""
    out = []
    for where, record in S.read_jsonl(path):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with prompt, chosen and rejected")
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise UserError(f"{where}: missing '{key}'")
        if not isinstance(record["chosen"], str) or not isinstance(record["rejected"], str):
            raise UserError(f"{where}: 'chosen' and 'rejected' must be strings (the two answers)")
        prompt = read_prompt(record["prompt"], where)
        rating = record.get("rating") or ""
        if rating and rating not in RATINGS:
            raise UserError(f"{where}: rating {rating!r} is not one of {', '.join(RATINGS)}")
        if record["chosen"].strip() != record["rejected"].strip():
            out.append(Comparison(prompt, record["chosen"], record["rejected"], rating, record.get("kind", "")))
    if not out:
        raise UserError(f"{path}: no comparisons in it")
    return out


# ----------------------------------------------------------------------------------------
# A run: the command line, then main's steps in order: the preference data (Sec. 3.2.1), the two
# RMs (Sec. 3.2.2), the ablations on the Helpfulness RM (Table 28, Figure 6), the report.

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    P.add_training_args(parser, PAPER, TOY)
    add = parser.add_argument
    add("--init", help="chat model the RMs start from (default RUN_DIR/sft.pt); it also samples the toy answers")
    add("--sample-b", help="a second model variant for each prompt's second answer (default: --init)")
    add("--tokenizer", type=Path, help="SentencePiece model (default RUN_DIR/tokenizer.model)")
    add("--helpful-data", type=Path, help="helpfulness comparisons (JSONL) instead of the toy world's")
    add("--safety-data", type=Path, help="safety comparisons (JSONL) instead of the toy world's")
    add("--comparisons", type=tok.number_flag("--comparisons", at_least=1), default=1200,
        help="toy helpfulness comparisons to collect for training")
    add("--safety-comparisons", type=tok.number_flag("--safety-comparisons", at_least=1), default=500,
        help="toy safety comparisons for training")
    add("--test-comparisons", type=tok.number_flag("--test-comparisons", at_least=1), default=800,
        help="held-out toy comparisons per set (default 800: half of them are near ties, coin tosses for "
             "any RM, and Table 7's differences are a few points)")
    add("--margin", default="small", choices=MARGINS, help="Table 27's margin of the two RMs (default small)")
    add("--mix", default="paper", choices=("paper", "none"), help="the paper's data mix of each RM, or own set only")
    add("--epochs", type=tok.number_flag("--epochs", float, above=0), default=1.0,
        help="passes over the data (paper: 1; more over-fits)")
    add("--warmup-steps", type=tok.number_flag("--warmup-steps", at_least=0),
        help="default: 3%% of the steps, at least 5 (paper)")
    add("--no-ablations", action="store_true", help="skip the margin ablation and the data-size curve")
    add("--fractions", default="0.125,0.5", help="helpfulness data fractions for the data-size curve (and 1)")
    add("--world-seed", type=int, default=0)
    return parser.parse_args(argv)


def input_paths(args, log):
    """The tokenizer and the chat model a run starts from, each checked to exist."""
    return P.find_tokenizer(args), S.find_start(args, "sft.pt", "chat model", "04_sft.py", log)


def write_toy_sets(run: Run, files: dict):
    """The toy world's two sets, sampled from the chat model (and --sample-b) and judged, one file
    each: its training comparisons from 03's training part of the world, then its test comparisons
    (the file's last --test-comparisons lines) from its evaluation part: no test prompt is trained on."""
    args = run.args
    run.log(f"sampling answers from {run.init} at temperatures {TEMPERATURES} and judging them ...")
    variants = dict.fromkeys([run.init, args.sample_b or run.init])   # one model, or two
    models = [M.Transformer.from_pretrained(p, device=run.device) for p in variants]
    models = models * (2 // len(models))
    world = P.make_world(args.world_seed)
    for name, make, score, n in (("helpful", helpful_task, helpfulness_score, args.comparisons),
                                 ("safety", safety_task, safety_score, args.safety_comparisons)):
        seed = args.seed * 2 + (name == "safety")
        comparisons = []
        for count, part_seed, evaluation in ((n, seed, False), (args.test_comparisons, seed + 1_000_003, True)):
            # answers of up to 40 tokens: the helpful ones are short (references <= 15 tokens), refusals ~30
            comparisons += collect(models, run.tokenizer, functools.partial(make, world, evaluation=evaluation),
                                   score, count, part_seed, 40, run.log, args.compile_decode, args.sample_batch)
        write_jsonl(files[name], comparisons)


def preference_data(run: Run, world_size: int) -> dict:
    """Sec. 3.2.1's data: {set: (training comparisons, test comparisons)}, from --helpful-data and
    --safety-data, or from the toy world (rank 0 samples and writes it, every rank reads it)."""
    args, sets, files = run.args, {}, {}
    for name, path in (("helpful", args.helpful_data), ("safety", args.safety_data)):
        if path:   # every 20th comparison is held out for testing
            data = read_pairs_jsonl(path)
            sets[name] = ([c for i, c in enumerate(data) if i % 20], data[::20])
        elif not (args.helpful_data or args.safety_data):
            files[name] = args.run_dir / f"prefs_{name}.jsonl"
    if files and run.rank == 0 and not (args.resume and all(f.is_file() for f in files.values())):
        write_toy_sets(run, files)
    if world_size > 1:
        dist.barrier()
    for name, path in files.items():   # the test comparisons are the last ones collected
        data = read_pairs_jsonl(path)
        sets[name] = (data[:-args.test_comparisons], data[-args.test_comparisons:])
    return sets


def train_both_rms(run: Run, sets: dict, train_sets: dict, tests: dict):
    """Sec. 3.2.2: the Helpfulness RM and the Safety RM, each on its mix (rm_helpful.pt, rm_safety.pt)
    -> ({RM: {test set: accuracies}}, {RM: 03's history}, the Helpfulness RM's careless_split)."""
    args = run.args
    helpful, safety = train_sets.get("helpful", []), train_sets.get("safety", [])
    results, histories, rms = {}, {}, {}
    for rm in [k for k in RM_NAMES if k in sets]:
        rms[rm], results[rm], out = train_rm(run, RM_NAMES[rm], mix(helpful, safety, rm, args.mix), args.margin,
                                             tests, rm, args.run_dir / f"rm_{rm}.pt")
        histories[rm] = out["history"]
    tail = {}   # what the Helpfulness RM learned from the toy world's data
    if "helpful" in rms and not args.helpful_data:
        tail = careless_split(rms["helpful"], sets["helpful"][1], tests["helpful"], run.pad_id)
    return results, histories, tail


def ablations(run: Run, train_sets: dict, tests: dict, results: dict):
    """The Helpfulness RM trained again: with each of Table 27's margin schemes (Table 28), and on a
    fraction of its helpfulness data (Figure 6) -> (ablation, scaling). They keep no checkpoint: a
    resumed run repeats them. The run's own setting is not trained twice: its accuracy is results'."""
    args = run.args
    helpful, safety = train_sets.get("helpful", []), train_sets.get("safety", [])
    ablation, scaling = {}, []
    for scheme in MARGINS:
        ablation[scheme] = (results["helpful"] if scheme == args.margin else train_rm(
            run, f"Helpfulness RM, margin {scheme}", mix(helpful, safety, "helpful", args.mix), scheme,
            {"helpful": tests["helpful"]}, "helpful", None)[1])["helpful"]
    for f in sorted(float(x) for x in args.fractions.split(",")) + [1.0]:
        pairs = mix(helpful[:round(f * len(helpful))], safety, "helpful", args.mix)
        accuracy = results["helpful"] if f == 1.0 else train_rm(
            run, f"Helpfulness RM on {f:g} of the helpfulness data", pairs, args.margin, tests, "helpful", None)[1]
        scaling.append({"fraction": f, "comparisons": len(pairs), "accuracy": accuracy})
    return ablation, scaling


def report(run: Run, sets: dict, tests: dict, summary: dict, t_start: float):
    """Tables 8 and 28 and the careless split printed, the two figures, reward.json (rank 0)."""
    args, tail, ablation, scaling = run.args, summary["careless_split"], summary["margin_ablation"], summary["scaling"]
    print_table("Accuracy per rating (cf. Table 8)", summary["table8"], PAPER_TABLE8)
    if any(n for _, n in tail.values()):
        print("\nHelpfulness RM, helpful test pairs with " + " | ".join(
            f"{name}: {pct(acc)}% of {n}" for name, (acc, n) in tail.items()))
    if ablation:
        print_table("Helpful test, by margin (cf. Table 28)", {f"margin {m}": a for m, a in ablation.items()},
                    {f"margin {m}": v for m, v in PAPER_TABLE28.items()})
        plot_margins(args.run_dir / "reward_margins.png", ablation, tests["helpful"])
        print("\nData size (cf. Figure 6), Helpfulness RM: " + " | ".join(
            f"{s['comparisons']:,} comparisons: " + ", ".join(f"{t} test {pct(a['avg'])}%"
                                                              for t, a in s["accuracy"].items()) for s in scaling))
        plot_scaling(args.run_dir / "reward_scaling.png", scaling)
    tok.write_json(args.run_dir / "reward.json", dict(
        config=vars(args), **summary, wall_s=time.time() - t_start,
        overlap=S.overlap([c.prompt[-1]["content"] for _, te in sets.values() for c in te],
                          S.user_messages(c.prompt for tr, _ in sets.values() for c in tr))))
    rms = ", ".join(f"rm_{k}.pt" for k in summary["histories"])
    run.log(f"\nwall {P.fmt_time(time.time() - t_start)} | wrote {rms}, "
            f"reward.json{', reward_margins.png, reward_scaling.png' if ablation else ''} in {args.run_dir}")


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    if args.plan:   # 03's planner: memory per GPU and compute, on paper (no GPU, data or checkpoint)
        return P.plan_stage(args, "reward", reward_model=RewardModel)
    rank, world_size, device = P.setup_distributed(args.device)
    P.resolve_args(args, world_size)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.micro_batch % 2:
        raise UserError(f"--micro-batch {args.micro_batch} must be even: a pair is two rows, chosen and rejected")
    tok_path, init = input_paths(args, log)
    tokenizer = tok.Tokenizer(tok_path)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id   # Llama has no pad piece
    run = Run(args, init, tokenizer, pad_id, rank, device, log)

    sets = preference_data(run, world_size)   # 1. the preference data (Sec. 3.2.1), Table 6
    stats = {f"{name} {split}": data_stats(tokenizer, part) for name, (tr, te) in sets.items()
             for split, part in (("train", tr), ("test", te))}
    if rank == 0:
        print_table6(stats)
    train_sets = {name: encode_set(tokenizer, tr, args.seq_len) for name, (tr, te) in sets.items()}
    tests = {name: encode_set(tokenizer, te, args.seq_len) for name, (tr, te) in sets.items()}

    results, histories, tail = train_both_rms(run, sets, train_sets, tests)   # 2. the two RMs (Sec. 3.2.2)
    table8 = {f"{RM_NAMES[rm]}, {t} test": results[rm][t]   # the paper's row order
              for t in ("safety", "helpful") for rm in ("safety", "helpful") if rm in results and t in results[rm]}
    ablation, scaling = {}, []   # 3. the ablations on the Helpfulness RM (Table 28, Figure 6)
    if not (args.no_ablations or args.stop_at) and train_sets.get("helpful"):
        ablation, scaling = ablations(run, train_sets, tests, results)

    summary = dict(data=stats, table8=table8, careless_split=tail, margin_ablation=ablation, scaling=scaling,
                   histories=histories)
    if rank == 0:   # 4. the report
        report(run, sets, tests, summary, t_start)
    P.end_distributed()
    return dict(table8=table8, margin_ablation=ablation, scaling=scaling, data=stats)


if __name__ == "__main__":
    tok.run_cli(main)
