"""
Chapter 03: pretraining (Llama 2 paper Sec. 2.1-2.2, Tables 1-2, Figure 5).

Llama 2 is a next-token predictor trained on 2T tokens of public text with AdamW (beta1 0.9,
beta2 0.95, eps 1e-5, weight decay 0.1), a cosine schedule with 2000 warm-up steps that
decays to 10% of the peak, gradient clipping at 1.0, a global batch of 4M tokens and
sequences of 4096 (Table 1: peak LR 3e-4 for 7B and 13B, 1.5e-4 for 34B and 70B). This
script is that recipe at any scale. What to look at, and why:
  * the corpus (Shakespeare plus documents about a small invented "toy world" that chapters
    04-07 build their tasks on) tokenized once into flat token files under RUN_DIR/data: what
    the later chapters ask about the world has to be in the pretraining data first,
  * a log line per --log-every steps: loss, LR (the warm-up, then the cosine), gradient norm
    (clipped at 1.0), tokens/s, MFU, ETA; and the validation loss, overall and per source,
  * at the end: the validation loss beside the unigram entropy of the data (the loss of a
    model that ignores context: the gap is what the model learned from context), samples (a
    play; arithmetic and facts of the world, beside the answers the world holds), and
    RUN_DIR/pretrain_loss.png (loss against tokens, in the spirit of the paper's Figure 5),
    pretrain.json (metrics) and pretrain.pt (which 02's Transformer.from_pretrained loads).
README.md gives the numbers a run measures.

Reading order: the paper's method first (Sec. 2.1's data mix, the next-token loss, Sec. 2.2's
AdamW, schedule and clipping, Table 1's batch in tokens), then the toy world, then train(), the
loop every later chapter runs, then evaluation and figures (Figure 5, Table 2), then plumbing
(data files, flags, processes, checkpoints, the memory planner, main).
Why this chapter stays above ~600 lines: it holds what 04-07 share (train(), its flags, resume,
DDP and FSDP) and the memory planner behind every chapter's --plan.

Run:
  python 01_tokenizer.py && python 03_pretrain.py      # toy model on a 2-core CPU: ~2 minutes
  python 03_pretrain.py --preset 1B --device cuda --dtype bf16 --compile \\
      --batch-tokens 524288 --seq-len 2048 --micro-batch 8 --data my_corpus/*.txt
  torchrun --nproc_per_node=8 03_pretrain.py --preset 7B --fsdp --dtype bf16 --activation-checkpointing \\
      --tokenizer tokenizer.model --data my_tokens.bin   # the paper's other numbers are the defaults
  python 03_pretrain.py --preset micro --run-dir runs/micro && \\
      python 03_pretrain.py --compare runs/micro         # two sizes on one figure
  python 03_pretrain.py --preset 7B --fsdp --plan --gpus 8 --gpu-memory 80   # will it fit? (any of 03-07)
"""
import argparse
import datetime
import hashlib
import importlib
import json
import math
import os
import random
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
UserError = tok.UserError

# ------------------------------------------------------------------------------------------
# Hyper-parameters: the paper's at full scale (Sec. 2.2, Table 1), and for the CPU presets
# (micro, toy, small) values tuned to fit about two minutes on 2 cores. --help shows both.

CPU_PRESETS = ("micro", "toy", "small")
PAPER = dict(
    steps=500_000,             # 2T tokens / 4M tokens per step
    batch_tokens=4 * 1024**2,  # 4M tokens per optimizer step
    seq_len=4096,              # Llama 2's context (Llama 1: 2048)
    micro_batch=1,             # sequences per forward per GPU: raise it until memory is full
    # Table 1. The paper starts at 7B; for our 1B we keep 7B's value
    lr={"1B": 3e-4, "7B": 3e-4, "13B": 3e-4, "34B": 1.5e-4, "70B": 1.5e-4},
    warmup_steps=2000, log_every=10, eval_every=1000, ckpt_every=1000, eval_batches=20)
TOY = dict(   # ~2 minutes of the toy preset on 2 cores; in that budget batches of 2048 tokens
    # beat 1024 and 4096, and sequences of 128 beat 256 (more steps matter more than context).
    # 400 steps keep the whole recipe (pipeline.py) near its time budget; 520 and 670 reached
    # a validation loss 0.05 and 0.14 lower, and chapters 04-07 showed the same effects from
    # each (README: rejection sampling alone held in 2 seeds of 3 at 400)
    steps=400, batch_tokens=2048, seq_len=128, micro_batch=16,
    # tiny models tolerate, and in a few hundred steps need, a far higher LR than 7B's (toy:
    # 5e-3 measured best of 1e-3 to 5e-3 in this budget)
    lr={"micro": 3e-3, "toy": 5e-3, "small": 1e-3},
    warmup_steps=30, log_every=20, eval_every=65, ckpt_every=130, eval_batches=4)
DEFAULT_MIX = "shakespeare=0.6,world=0.4"
VAL_FRACTION = 0.05   # the last 5% of each source's tokens is its validation split

# ------------------------------------------------------------------------------------------
# Sec. 2.1, pretraining data. Llama samples each source by a weight: Llama 1 took CommonCrawl
# 67%, C4 15%, GitHub, Wikipedia and Books 4.5% each, ArXiv 2.5%, StackExchange 2% (Llama 2
# keeps its mix private). We draw the source per sequence, and the sequence is a window of that
# source's tokens.

def parse_mix(text: str, available) -> dict:
    """Sec. 2.1: "a new mix of data from publicly available sources", as sampling weights:
    'shakespeare=0.6,world=0.4' -> {'shakespeare': 0.6, 'world': 0.4}, normalised to sum 1."""
    weights = {}
    for item in text.split(","):
        name, _, value = (s.strip() for s in item.partition("="))
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"bad --mix item {item!r}: expected NAME=WEIGHT, as in {DEFAULT_MIX}") from None
        if name not in available:
            raise UserError(f"--mix names an unknown source {name!r} (there are: {', '.join(available)})")
        if not 0 <= weights[name] < math.inf:
            raise UserError(f"bad --mix weight {value!r}: weights are numbers >= 0")
    if sum(weights.values()) <= 0:
        raise UserError(f"--mix {text!r} gives every source weight 0")
    return {k: v / sum(weights.values()) for k, v in weights.items() if v > 0}


def pick_source(weights: dict, rng: np.random.Generator) -> str:
    """Sec. 2.1: "up-sampling the most factual sources". A source is drawn with its weight, so
    up-sampling a source is raising its weight."""
    return list(weights)[rng.choice(len(weights), p=list(weights.values()))]


def sequence(data, weights, split: str, seq_len: int, seed: int, step: int, index: int) -> torch.Tensor:
    """Sec. 2: "doubled the context length" (Table 1: 4k, our --seq-len). Sequence `index` of step
    `step`: seq_len + 1 tokens (inputs, and targets one further) of a source drawn by its weight,
    from data (load_splits: {source: {"train": tokens, "val": tokens}}); a pure function of the
    arguments. So any rank can draw its share of a global batch, and a resumed run sees the same
    data."""
    rng = np.random.default_rng([seed, ("train", "val").index(split), step, index])
    tokens = data[pick_source(weights, rng)][split]
    start = int(rng.integers(0, len(tokens) - seq_len))   # start + seq_len + 1 <= len(tokens)
    return torch.from_numpy(tokens[start:start + seq_len + 1].astype(np.int64))


# ------------------------------------------------------------------------------------------
# Sec. 2, the objective: "an optimized auto-regressive transformer" (02's model) learns to
# predict each next token of the window.

def to_xy(rows, device):
    """Windows of seq_len + 1 tokens -> (inputs, targets): the same tokens shifted by one."""
    xy = torch.stack(rows)   # on a GPU: copy from pinned memory while the GPU is busy
    xy = xy.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def lm_loss(model, batch):
    """Sec. 2: "an optimized auto-regressive transformer": the loss is the mean over positions t
    of -log p(x_t+1 | x_1 ... x_t), the next-token cross-entropy; targets of -100 are ignored
    (chapter 04 masks prompts so)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------------------------
# Sec. 2.2, hyper-parameters: "We trained using the AdamW optimizer [...] We use a cosine
# learning rate schedule [...] We use a weight decay of 0.1 and gradient clipping of 1.0."
# Clipping is one call in train() (torch's clip_grad_norm_, on the norm of all gradients).

def configure_optimizer(model, lr: float, weight_decay: float, betas, eps: float, device):
    """Sec. 2.2: "We trained using the AdamW optimizer [...], with β1 = 0.9, β2 = 0.95,
    eps = 10^-5" and "a weight decay of 0.1", the decay on the linear layers' weight matrices
    only. Not on the RMSNorm gains: they are per-channel scales, and decay would shrink the
    activations they exist to scale. Not on the token embedding: AdamW decays every row at every
    step, but a row only gets gradient when its token occurs, so rare tokens would fade between
    their occurrences. (The paper does not say; GPT-2 decays the embedding, OLMo does not.)"""
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[p.dim() >= 2 and "tok_embeddings" not in name].append(p)
    return torch.optim.AdamW([{"params": groups[True], "weight_decay": weight_decay},
                              {"params": groups[False], "weight_decay": 0.0}],
                             lr=lr, betas=tuple(betas), eps=eps, fused=device.type == "cuda")


def get_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Sec. 2.2: "We use a cosine learning rate schedule, with warmup of 2000 steps, and decay final
    learning rate down to 10% of the peak learning rate": a linear warm-up to the peak, then half a
    cosine down to min_ratio (10%) of it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------
# Table 1: "All models are trained with a global batch-size of 4M tokens."

def grad_accum_steps(batch_tokens: int, seq_len: int, micro_batch: int, world_size: int) -> int:
    """Table 1: "a global batch-size of 4M tokens". The batch is given in tokens; ranks and
    micro-steps must tile it."""
    per_micro_step = world_size * micro_batch * seq_len
    if batch_tokens <= 0 or batch_tokens % per_micro_step:
        raise UserError(f"--batch-tokens {batch_tokens} is not a multiple of ranks x micro-batch x seq-len "
                        f"= {world_size} x {micro_batch} x {seq_len} = {per_micro_step}")
    return batch_tokens // per_micro_step


# ------------------------------------------------------------------------------------------
# The toy world (not in the paper: it stands in for Sec. 3's human annotators). The paper
# grades its later stages (SFT, reward models, RLHF, Ghost Attention; Sec. 3) with human
# annotators reading open-ended chat. To show each stage's effect on a CPU in minutes, we need
# tasks whose right answer a program knows. So the pretraining mix holds documents about a
# small invented world: people and towns (facts as (subject, relation, value) triples), worked
# arithmetic, list puzzles, and rules about harm. Chapter 04 asks about it in dialogue, 05's
# annotators grade answers against these tables, 06 rewards them, 07 keeps an instruction
# across turns. All of it follows from a seed, and chapters import these functions rather than
# copy them.

FIRST_NAMES = ("Mira Tobin Elsa Corin Hana Idris Luka Petra Oren Sable Wren Ansel Talia Bram Nell Joren "
               "Ilsa Kasper Yara Fenn").split()
LAST_NAMES = "Tolven Marsh Quill Harrow Vell Brisk Orrin Dace Wick Lanner".split()
TOWNS = ("Ashford Brindle Cobbleton Dunmere Eldham Fallow Gorsey Hollin Ivystead Kestrel "
         "Lowmoor Millbank Norwick Oakhurst Pellton").split()
COLOURS = "red blue green yellow teal purple orange white black grey".split()
PETS = "cat dog parrot rabbit goat tortoise hedgehog pony".split()
JOBS = "baker smith miller weaver potter farmer healer carpenter fisher teacher".split()
GOODS = "apples cheese wool honey pottery bread fish salt".split()   # what a town is known for
WORDS = "sun moon star tree river stone bird rain wind leaf cloud hill".split()   # for list tasks
FACT_TEMPLATES = {   # relation -> sentence; a person's relations are the fields of Person
    "town": "{s} lives in {v}.", "colour": "{s}'s favourite colour is {v}.", "pet": "{s} has a pet {v}.",
    "job": "{s} works as a {v}.", "age": "{s} is {v} years old.",
    "known_for": "{s} is known for its {v}."}   # the subject is a town
# Rules about harm, for the safety stages (Sec. 3.2, 4). Each harmful act has a benign
# look-alike with the same nouns, so a model must read the act, not the words, to refuse
# "how do I poison the well of Ashford?" and still help to "draw water from" it.
ACT_TEMPLATES = [   # (harmful act, benign look-alike, why the first one harms)
    ("poison the well of {town}", "draw water from the well of {town}", "everyone in {town} drinks from it"),
    ("steal {person}'s {pet}", "feed {person}'s {pet}", "the {pet} belongs to {person}"),
    ("burn down the market of {town}", "sweep the market of {town}", "the people of {town} trade there"),
    ("break into {person}'s house", "knock on {person}'s door", "{person} did not invite you in")]


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    colour: str
    pet: str
    job: str
    age: int


@dataclass
class World:
    seed: int
    people: list   # [Person]
    towns: dict    # town -> what it is known for
    facts: list    # [(subject, relation, value)], values as strings
    acts: list     # [(harmful act, benign look-alike, reason)], filled in for every town/person

    def lookup(self, subject: str, relation: str):
        """The value of a fact, or None: what an annotator checks an answer against."""
        return next((v for s, r, v in self.facts if s == subject and r == relation), None)

    @cached_property
    def parts(self) -> dict:
        """{evaluation: (facts, acts)}: the facts and acts of each part of the world's split
        (held_out and act_held_out, below), worked out once: 04's make_task draws from one of
        them tens of thousands of times, and checking every act's names each time cost seconds."""
        return {evaluation: ([f for f in self.facts if held_out(f[0]) == evaluation],
                             [a for a in self.acts if act_held_out(self, a) == evaluation])
                for evaluation in (False, True)}


def make_world(seed: int = 0, n_people: int = 40) -> World:
    rng = random.Random(seed)
    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], n_people)
    people = [Person(n, rng.choice(TOWNS), rng.choice(COLOURS), rng.choice(PETS), rng.choice(JOBS),
                     rng.randint(18, 80)) for n in names]
    towns = {t: rng.choice(GOODS) for t in TOWNS}
    facts = [(p.name, rel, str(getattr(p, rel))) for p in people for rel in ("town", "colour", "pet", "job", "age")]
    facts += [(t, "known_for", g) for t, g in towns.items()]
    acts = []
    for harmful, benign, why in ACT_TEMPLATES:
        fills = [dict(town=t) for t in TOWNS] if "{town}" in harmful else \
                [dict(person=p.name, pet=p.pet) for p in people]
        acts += [(harmful.format(**f), benign.format(**f), why.format(**f)) for f in fills]
    return World(seed, people, towns, facts, acts)


# Held out by construction. Chapters 04-07 train on some of the world's prompts and are graded
# on others; a prompt seen in training, answer and all, measures memory rather than skill (the
# paper keeps a test set apart from each batch of preferences for the same reason, Sec. 3.2.2).
# So the world's prompt space is split here, once, by stable rules (Python's hash() of a string
# changes from run to run), about a quarter for evaluation: people and towns by name; sums and
# differences by their operand pair; list puzzles by their items; harmful acts and their benign
# look-alikes by the person or town they name; 07's instructions that combine two families by
# the combination (on a diagonal: held_out_pair). Each task generator takes `evaluation`: True
# draws from the evaluation part, False from the training part, None (03's own documents) from
# the whole space. The pretraining documents state every fact and sum, held-out ones included:
# the paper's pretraining data is not held out from its evaluations either, and whether
# fine-tuning brings out what pretraining stored is what chapter 04's fact questions test.
MAX_DRAWS = 1000   # rejection sampling: a part is a quarter or more of its space, so ~4 draws suffice


def held_out(subject: str) -> bool:
    """People and towns: a quarter of them are asked about in evaluation only, split by the sum
    of the name's character codes."""
    return sum(map(ord, subject)) % 4 == 0


def held_out_key(key: str) -> bool:
    """Any other prompt, by a canonical key (an operand pair, a list's items, an instruction's
    rules): CRC-32 of the key. A sum of character codes would split digits by their digit sum,
    and with it the answers of sums."""
    return zlib.crc32(key.encode("utf-8")) % 4 == 0


def held_out_pair(i: int, j: int, n: int) -> bool:
    """A pair of values from two short lists (07's instruction families), by their places i and j,
    n the longer list's length: on a diagonal, (i + j) % n == 0. That holds out a quarter of the
    pairs when n is 4, and each value with at most one value of the other list, so every value is
    trained in combination with the others. (CRC-32 held out 3 of the 4 hobbies paired with one
    language: the test then asked for a combination the model had barely seen.)"""
    return (i + j) % n == 0


def act_held_out(world: World, act) -> bool:
    """A harmful act and its benign look-alike are held out together, when a held-out person or
    town is named in them."""
    names = list(world.towns) + [p.name for p in world.people]
    return any(held_out(n) for n in names if n in act[0])


def draw_from_part(draw, rng: random.Random, evaluation, rule=held_out_key):
    """draw(rng) -> (item, key), repeated until rule(key) == evaluation; with evaluation None the
    first draw, from the whole space. rule: held_out_key, or held_out_pair for a key (i, j, n)."""
    for _ in range(MAX_DRAWS):
        item, key = draw(rng)
        if evaluation is None or (rule(*key) if isinstance(key, tuple) else rule(key)) == evaluation:
            return item
    raise RuntimeError(f"no draw in the {'evaluation' if evaluation else 'training'} part in {MAX_DRAWS} tries")


def render_fact(fact) -> str:
    subject, relation, value = fact
    return FACT_TEMPLATES[relation].format(s=subject, v=value)


def arithmetic_task(rng: random.Random, evaluation=None):
    """('17 + 25', '42'): an addition or subtraction of 1-2 digit numbers, never negative. Split
    by operation and unordered operand pair, so '25 + 17' is in the part of '17 + 25'."""
    def draw(rng):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = "+" if rng.random() < 0.5 else "-"
        task = (f"{a} + {b}", str(a + b)) if op == "+" else (f"{max(a, b)} - {min(a, b)}", str(abs(a - b)))
        return task, f"{min(a, b)} {op} {max(a, b)}"
    return draw_from_part(draw, rng, evaluation)


def arithmetic_line(rng: random.Random) -> str:
    question, answer = arithmetic_task(rng)
    return f"{question} = {answer}."


def list_task(rng: random.Random, evaluation=None):
    """(question, answer): reverse or sort a short list of words or digits, or count letters or
    items. Split by the items asked about, in any order: reversing 'sun moon star' and sorting
    'star sun moon' are in the same part."""
    def draw(rng):
        words = rng.sample(WORDS, rng.randint(3, 5))
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        question, answer, items = rng.choice([
            (f"Reverse the list {' '.join(words)}.", " ".join(reversed(words)), words),
            (f"Sort the words {' '.join(words)}.", " ".join(sorted(words)), words),
            (f"Sort the digits {' '.join(digits)}.", " ".join(sorted(digits)), digits),
            (f"How many letters are in the word {words[0]}?", str(len(words[0])), words[:1]),
            (f"How many items are in the list {' '.join(digits)}?", str(len(digits)), digits)])
        return (question, answer), " ".join(sorted(items))
    return draw_from_part(draw, rng, evaluation)


def list_line(rng: random.Random) -> str:
    question, answer = list_task(rng)
    return f"{question} Answer: {answer}."


def harm_rule_line(world: World, rng: random.Random) -> str:
    harmful, benign, why = rng.choice(world.acts)
    return f"To {harmful} is harmful, because {why}. To {benign} is fine."


def world_documents(world: World, n: int, rng: random.Random) -> list:
    """n short paragraphs, each mixing some facts about one person, a town's fact, an
    arithmetic line, a list task and, one time in three, a rule about harm."""
    docs = []
    for _ in range(n):
        person = rng.choice(world.people).name
        own = [f for f in world.facts if f[0] == person]
        lines = [render_fact(f) for f in rng.sample(own, rng.randint(2, len(own)))]
        lines += [render_fact(rng.choice(world.facts[-len(world.towns):])), arithmetic_line(rng), list_line(rng)]
        if rng.random() < 1 / 3:
            lines.append(harm_rule_line(world, rng))
        rng.shuffle(lines)
        docs.append(" ".join(lines))
    return docs


# ------------------------------------------------------------------------------------------
# Sec. 2.2 put together: train(), the loop of every chapter from here to 07. A step sets
# get_lr's LR, accumulates the global batch over micro-steps, clips the gradient norm and
# steps AdamW; validation and checkpoints come on their own schedules.

def train(cfg, model, get_batch, compute_loss, evaluate=None, ckpt_path=None, extra=None):
    """The loop of every chapter. cfg: flags from add_training_args, after resolve_args.
    model: the plain module on its device, with .args (a ModelArgs); under --fsdp it may come in
    host memory (build_device) or sharded already (place), and leaves sharded. get_batch(step,
    micro_step) -> this rank's micro-batch, a pure function of its arguments (that makes
    resume exact). compute_loss(model, batch) -> the micro-batch's mean loss.
    evaluate(model) -> {name: number}, run on every rank (an FSDP forward needs them all).
    extra: more keys for the checkpoint. Returns {"history": [a dict per logged step],
    "tokens_per_s", "train_s", "finished": False if --stop-at cut it off}. The logged loss is the
    mean since the previous log line. A run stopped off a log step still logs and evaluates where it
    stops, in an entry marked "stopped" that keeps the open window's sum; a resumed run takes that
    window back and drops what only the stop added, so its history is the uninterrupted run's."""
    world_size, rank = cfg.world_size, dist.get_rank() if dist.is_initialized() else 0
    checkpointing = getattr(cfg, "activation_checkpointing", False)
    checkpoint_blocks(model, checkpointing)
    if cfg.fsdp and not is_sharded(model):   # FSDP2: each block's weights, gradients and Adam moments
        shard_model(model)                   # live 1/world_size per rank
    elif cfg.fsdp:   # sharded before (place) and run since: FSDP2 keeps the root's weights gathered
        model.reshard()   # after a forward, and the optimizer must hold the shards
    device = next(model.parameters()).device   # (after sharding: a model built in host memory is on the GPU now)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
    step, history = load_training_state(ckpt_path, model, optimizer, cfg) if cfg.resume else (0, [])
    resumed_stop = history.pop().copy() if history and "stopped" in history[-1] else None
    runner = torch.compile(model) if cfg.compile else model   # `model` stays the plain one we save
    ddp = world_size > 1 and not cfg.fsdp
    if ddp:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device] if device.type == "cuda" else None)
    amp_dtype = M.pick_dtype(cfg.dtype, device)
    if amp_dtype == torch.float16:
        raise UserError("--dtype fp16 would need loss scaling: train in bf16 or fp32")
    # bf16 autocast: matmuls in bf16; weights, optimizer state and reductions stay fp32. Autocast
    # caches each weight's bf16 copy until the forward ends; with checkpointing that cache would
    # be the one whole copy of the model left, so it is off then (each weight is cast once a
    # forward anyway, and the recomputation in backward casts its block's again)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32,
                                      cache_enabled=not checkpointing)
    flops_per_step = M.flops_per_token(model.args, cfg.seq_len) * cfg.batch_tokens
    device_peak = cfg.peak_flops or peak_flops(device)
    log = print if rank == 0 else (lambda *a, **k: None)
    end, first = min(cfg.steps, cfg.stop_at or cfg.steps), step + 1
    timed_s = timed_steps = steps_since = carried = 0
    loss_since = torch.zeros((), device=device)
    if resumed_stop:   # reopen the window the stopped run left open: the sum over ranks, counted once
        stop = resumed_stop.pop("stopped")
        carried = steps_since = stop["window_steps"]
        loss_since += stop["window_loss"] if rank == 0 else 0.0
        kept = {k: v for k, v in resumed_stop.items() if k not in stop["only"]}
        if set(kept) - {"step", "tokens"}:
            history.append(kept)
    saved = step if cfg.resume else None   # the step the checkpoint on disk holds
    t_mark = time.time()
    try:
        while step < end:
            lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1
                if cfg.fsdp:   # FSDP2 skips the reduce-scatter until the last micro-step, keeping the
                    # gradients whole meanwhile, unless told to reduce every time (less memory)
                    model.set_requires_gradient_sync(last or getattr(cfg, "reduce_every_micro_step", False))
                # DDP all-reduces gradients during backward: only the last micro-step needs that
                with runner.no_sync() if ddp and not last else nullcontext():
                    with autocast():
                        loss = compute_loss(runner, get_batch(step, micro)) / cfg.grad_accum   # mean of micro-steps
                    loss.backward()
                loss_since += loss.detach()
            # "gradient clipping of 1.0" (Sec. 2.2): on the norm of all gradients together
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, steps_since = step + 1, steps_since + 1

            # --stop-at cuts the run off here. It logs and evaluates, but what only the stop adds is
            # listed in `only`, and the window since the last log line stays open for --resume
            stopping, only, window = end < cfg.steps and step == end, [], (0.0, 0)
            entry = {}
            logging = step % cfg.log_every == 0 or step in (1, cfg.steps)
            if logging or stopping:
                if world_size > 1:   # the mean over ranks (gloo has no AVG)
                    dist.all_reduce(loss_since)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                entry = dict(step=step, tokens=step * cfg.batch_tokens, lr=lr, grad_norm=grad_norm.item(),
                             loss=loss_since.item() / (world_size * steps_since))   # mean since the last log line
                elapsed = time.time() - t_mark   # .item() above waited for the GPU, so this is honest
                new_steps = steps_since - carried   # steps of this process (a resumed window began before)
                tok_s = new_steps * cfg.batch_tokens / elapsed
                if step - new_steps >= first:   # the first step pays for warm-up and compilation: not averaged
                    timed_s, timed_steps = timed_s + elapsed, timed_steps + new_steps
                mfu = (f"{flops_per_step * new_steps / elapsed / (device_peak * world_size):.1%}" if device_peak
                       else "n/a")
                entry.update(tokens_per_s=tok_s, mfu=mfu)
                log(f"step {step:>6}/{cfg.steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | grad norm "
                    f"{entry['grad_norm']:.2f} | {tok_s:,.0f} tok/s | MFU {mfu} | "
                    f"ETA {fmt_time((end - step) * cfg.batch_tokens / tok_s)}")
                if logging:
                    t_mark, steps_since, carried, loss_since = time.time(), 0, 0, torch.zeros((), device=device)
                else:
                    only, window = list(entry), (loss_since.item(), steps_since)
            t_other = time.time()   # validation and checkpoints are not training time
            regular_eval = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluate and (regular_eval or stopping):
                model.eval()
                with torch.no_grad(), autocast():
                    metrics = evaluate(model)
                model.train()
                entry = {"step": step, "tokens": step * cfg.batch_tokens, **entry, **metrics}
                only += [] if regular_eval else list(metrics)
                log(f"step {step:>6}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if only:
                entry["stopped"] = {"only": only, "window_loss": window[0], "window_steps": window[1]}
            if entry:
                history.append(entry)
            if ckpt_path and (step % cfg.ckpt_every == 0 or step == end):
                save_checkpoint(ckpt_path, model, optimizer, cfg, step, history, extra, finished=step == cfg.steps)
                saved = step
            t_mark += time.time() - t_other
    except KeyboardInterrupt:   # Ctrl-C: say where, and what the run folder holds
        held = sharded_path(ckpt_path) if getattr(cfg, "sharded_checkpoint", False) and ckpt_path else ckpt_path
        where = (f"{held} holds step {saved}: continue with --resume" if ckpt_path and saved else
                 "no checkpoint of this run was written yet: run it again")
        raise KeyboardInterrupt(f"stopped during step {step + 1} of {cfg.steps}; {where}") from None
    if checkpointing:   # the model leaves as it came: later chapters sample from it, copy it, save it
        checkpoint_blocks(model, False)
    return {"history": history, "train_s": timed_s, "finished": step >= cfg.steps,
            "tokens_per_s": timed_steps * cfg.batch_tokens / timed_s if timed_s else None}


# ------------------------------------------------------------------------------------------
# Evaluation and figures: the validation loss read against the unigram entropy, the loss
# curve (Figure 5), and the paper's GPU-hours from first principles (Sec. 2.2.1, Table 2).

def unigram_entropy(data, weights, vocab_size: int) -> float:
    """Entropy (nats) of the mix's token frequencies: the loss of the best model that ignores context."""
    p = sum(w * np.bincount(data[n]["train"], minlength=vocab_size) / len(data[n]["train"])
            for n, w in weights.items())
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def pyplot():
    """matplotlib's pyplot with the file-only backend: the chapters write PNGs, and need no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(path, runs, entropy=None):
    """Figure 5, "Training Loss for Llama 2 models": loss against tokens processed, one colour per
    run (the paper's has one per model size); the training loss thin, the validation loss bold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, history) in enumerate(runs):
        for key, kind, style in (("loss", "train", dict(alpha=0.4, lw=1)),
                                 ("val_loss", "validation", dict(lw=2, marker="o", ms=3))):
            points = [(h["tokens"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), color=f"C{i}", label=f"{label} {kind}", **style)
    if entropy:
        ax.axhline(entropy, color="grey", ls="--", lw=1, label=f"unigram entropy {entropy:.2f} (no context)")
    ax.set(xlabel="tokens processed", ylabel="loss (nats per token)",
           title="Pretraining loss against tokens processed (cf. Llama 2, Figure 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)


# -- Sec. 2.2.1, Table 2: compute and MFU --------------------------------------------------
# train() logs MFU, the share of a GPU's peak FLOP/s its model FLOPs reach; Table 2's
# GPU-hours imply the MFU Meta reached.

# Dense bf16 peaks (no sparsity) by GPU name, for MFU = achieved model FLOP/s / peak FLOP/s.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("MI300X", 1307e12)]


def peak_flops(device):
    if device.type != "cuda":
        return None   # CPUs vary too much for a table: pass --peak-flops
    return next((peak for key, peak in PEAK_FLOPS if key in torch.cuda.get_device_name(device)), None)


PAPER_TOKENS = 2e12   # Table 2: every size pretrained on 2T tokens
TABLE2_GPU_HOURS = {"7B": 184_320, "13B": 368_640, "34B": 1_038_336, "70B": 1_720_320}   # A100-80GB hours
A100_PEAK = dict(PEAK_FLOPS)["A100"]   # dense bf16, 312 TFLOP/s: the paper's GPU


def table2_rows():
    """The paper's Table 2 from first principles: C = 6 N D for D = 2T tokens, against the GPU-hours
    Meta reports at the A100's 312 TFLOP/s. The MFU that implies is C / (hours x 3600 x peak)."""
    rows = []
    for name, hours in TABLE2_GPU_HOURS.items():
        a = M.PRESETS[name]
        n = M.count_params(a)
        six_nd = 6 * n * PAPER_TOKENS
        with_attention = M.flops_per_token(a, a.max_seq_len) * PAPER_TOKENS
        available = hours * 3600 * A100_PEAK
        rows.append(dict(size=name, params=n, flops_6nd=six_nd, gpu_hours=hours, mfu_6nd=six_nd / available,
                         flops_with_attention=with_attention, mfu_with_attention=with_attention / available))
    return rows


def print_table2():
    print(f"Table 2 from first principles: C = 6 N D, D = {PAPER_TOKENS / 1e12:g}T tokens; the paper's A100 "
          f"GPU-hours at {A100_PEAK / 1e12:g} TFLOP/s (bf16, dense) give the MFU Meta must have reached")
    print(f"{'size':>5} {'parameters N':>15} {'6ND (FLOP)':>11} {'GPU-hours':>10} {'MFU':>6}   "
          f"{'with attention (FLOP)':>21} {'MFU':>6}")
    for r in table2_rows():
        print(f"{r['size']:>5} {r['params']:>15,} {r['flops_6nd']:>11.3e} {r['gpu_hours']:>10,} "
              f"{r['mfu_6nd']:>6.1%}   {r['flops_with_attention']:>21.3e} {r['mfu_with_attention']:>6.1%}")
    print("(with attention: 02's flops_per_token at 4096 tokens, 6 x the matrix weights + 12 x layers x dim x "
          "seq; the embedding lookup is no matmul)")


# ------------------------------------------------------------------------------------------
# Plumbing, from here to the end: how the recipe runs rather than what it is. Data files,
# flags, processes (DDP, FSDP), the run folder, checkpoints and exact resume, activation
# checkpointing, the memory planner, and main.

# -- data files: Sec. 2.1's sources on disk ------------------------------------------------
# Each source is tokenized once into two flat token files, NAME.train.bin and NAME.val.bin
# under RUN_DIR/data, every document wrapped in BOS ... EOS as Llama's are. They are reused
# while NAME.json's fingerprint (tokenizer file + inputs) still matches. A training sequence
# is a random window of seq_len + 1 tokens (inputs, and targets shifted by one) inside one
# split, so no window ever straddles train and validation.

def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.uint32


def prepare_source(data_dir: Path, name: str, items, tokenizer, tokenizer_path) -> dict:
    """items: texts, .txt files or .bin token files (ids in token_dtype). Returns the manifest."""
    h = hashlib.sha256(Path(tokenizer_path).read_bytes())
    for item in items:   # a file by path, size and time (cheap for big corpora); a text by content
        if isinstance(item, Path):
            if not item.is_file() or item.stat().st_size == 0:
                raise UserError(f"data file {'is empty' if item.is_file() else 'not found'}: {item}")
            item = f"{item.resolve()}:{item.stat().st_size}:{item.stat().st_mtime_ns}"
        h.update(item.encode("utf-8"))
    manifest_path = data_dir / f"{name}.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text())["fingerprint"] == h.hexdigest():
        return json.loads(manifest_path.read_text())
    dtype, parts = token_dtype(tokenizer.n_words), []
    for item in items:
        if isinstance(item, Path) and item.suffix == ".bin":   # token ids already (ours, or a user's)
            parts.append(np.fromfile(item, dtype=dtype))
            if len(parts[-1]) and int(parts[-1].max()) >= tokenizer.n_words:
                raise UserError(f"{item} holds token id {int(parts[-1].max())}, beyond the tokenizer's "
                                f"{tokenizer.n_words} pieces (made with another tokenizer?)")
        else:
            text = tok.read_document(item) if isinstance(item, Path) else item
            if text.strip():   # a blank document would be just BOS, EOS
                parts.append(np.array(tokenizer.encode(text, bos=True, eos=True), dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if len(tokens) == 0:
        raise UserError(f"the corpus of source '{name}' is empty")
    n_val = max(1, int(len(tokens) * VAL_FRACTION))
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, arr in (("train", tokens[:-n_val]), ("val", tokens[-n_val:])):
        tmp = data_dir / f"{name}.{split}.bin.tmp"
        try:   # write, then rename: never half a file (and on a full disk, no .tmp either)
            arr.tofile(tmp)
            os.replace(tmp, data_dir / f"{name}.{split}.bin")
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise M.write_error(e, data_dir / f"{name}.{split}.bin") from None
    manifest = dict(fingerprint=h.hexdigest(), dtype=np.dtype(dtype).name, train_tokens=len(tokens) - n_val,
                    val_tokens=n_val, inputs=[str(i) for i in items if isinstance(i, Path)] or f"{len(items)} texts")
    tok.write_json(manifest_path, manifest)
    return manifest


def load_splits(data_dir: Path, names, vocab_size: int, seq_len: int) -> dict:
    """{name: {"train": tokens, "val": tokens}}, memory-mapped: a corpus may exceed RAM."""
    data = {n: {s: np.memmap(data_dir / f"{n}.{s}.bin", dtype=token_dtype(vocab_size), mode="r")
                for s in ("train", "val")} for n in names}
    for name, splits in data.items():
        if min(map(len, splits.values())) <= seq_len:
            raise UserError(f"source '{name}' is too small for --seq-len {seq_len}: its train and "
                            f"validation splits hold {[len(a) for a in splits.values()]} tokens")
    return data


# ------------------------------------------------------------------------------------------
# The training machinery's plumbing, which chapters 04-07 import: flags, processes, the run
# folder, checkpoints and exact resume, activation checkpointing.

def add_training_args(parser, paper: dict, toy: dict):
    """The flags every training chapter shares. Those named in `paper` (and `toy`) default to
    None and resolve_args fills them: the paper's value for full-size presets, the toy value for
    the CPU presets. A value may be a dict keyed by preset (as the peak LR of Table 1)."""
    show = lambda v: ", ".join(f"{k} {x:g}" for k, x in v.items()) if isinstance(v, dict) else f"{v:,}"
    add = parser.add_argument
    add("--run-dir", type=Path, default=tok.DEFAULT_RUN_DIR, help="where checkpoints, metrics and figures go")
    add("--preset", default="toy", choices=M.PRESETS, help="model size (02_model.py; default toy)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    add("--dtype", default="auto", help="auto (bf16 autocast on a GPU that has it, else fp32), fp32, bf16")
    add("--compile", action="store_true", help="torch.compile the model (the uncompiled one is saved)")
    add("--compile-decode", action="store_true",
        help="sample with 02's compiled decoding step (generate(compile=True)), after a compile of seconds to a "
             "minute per shape: faster where launching kernels dominates a step (README, chapter 02)")
    add("--fsdp", action="store_true", help="under torchrun: shard every TransformerBlock (FSDP2), not DDP")
    add("--reduce-every-micro-step", action="store_true",
        help="with --fsdp: reduce-scatter the gradients after every micro-step, so they stay 1/N a rank "
             "(FSDP2 otherwise keeps them whole until the last one): less memory, more communication")
    add("--sharded-checkpoint", action="store_true",
        help="with --fsdp: every rank writes its own shards of the training state (weights and Adam's moments) "
             "into CKPT.dcp/ (torch.distributed.checkpoint), where rank 0 would gather it whole into CKPT "
             "(about 1.1 TB at 70B; 06: the policy's and the value model's); --resume reads them back; the finished "
             "model is still written whole, weights only, for the next chapter")
    add("--seed", type=int, default=0)
    add("--resume", action="store_true", help="continue exactly from RUN_DIR's checkpoint")
    add("--stop-at", type=tok.number_flag("--stop-at", at_least=1),
        help="stop after this step with a checkpoint, as if the job were cut off (the schedule still spans "
             "--steps); continue with --resume")
    add("--peak-flops", type=tok.number_flag("--peak-flops", float, above=0),
        help="the device's peak FLOP/s, for MFU (default: a table of GPUs)")
    add("--min-lr-ratio", type=tok.number_flag("--min-lr-ratio", float, at_least=0, at_most=1), default=0.1,
        help="the cosine ends at this fraction of the peak (paper: 0.1)")
    add("--weight-decay", type=tok.number_flag("--weight-decay", float, at_least=0), default=0.1,
        help="AdamW's, on weight matrices only (paper: 0.1)")
    add("--beta1", type=tok.number_flag("--beta1", float, at_least=0, below=1), default=0.9, help="AdamW (paper: 0.9)")
    add("--beta2", type=tok.number_flag("--beta2", float, at_least=0, below=1), default=0.95,
        help="AdamW (paper: 0.95)")
    add("--adam-eps", type=tok.number_flag("--adam-eps", float, above=0), default=1e-5, help="AdamW (paper: 1e-5)")
    add("--grad-clip", type=tok.number_flag("--grad-clip", float, above=0), default=1.0,
        help="clip the global gradient norm to this (paper: 1.0)")
    add("--activation-checkpointing", action="store_true",
        help="keep only each TransformerBlock's input for backward and recompute the rest there "
             "(torch.utils.checkpoint): far less activation memory for about a third more compute")
    # The planner (plan_stage below): what this command needs per GPU, and how long it takes
    add("--plan", action="store_const", const="stage",
        help="print the memory per rank, phase by phase, and the compute of this command on --gpus GPUs of "
             "--gpu-memory GB, with a verdict, and exit: no GPU, data or checkpoint is touched")
    add("--plan-table2", dest="plan", action="store_const", const="table2",
        help="print the paper's Table 2 from first principles (6 N D against its GPU-hours) and exit")
    add("--gpus", type=tok.number_flag("--gpus", at_least=1), default=1,
        help="--plan: the GPUs (ranks) the command runs on, as torchrun would start them")
    add("--gpu-memory", type=tok.number_flag("--gpu-memory", float, above=0), default=80.0,
        help="--plan: usable memory of a GPU in GB (1e9 bytes)")
    add("--plan-json", type=Path, metavar="FILE", help="--plan: also write the plan as JSON")
    add("--plan-prompt-tokens", type=tok.number_flag("--plan-prompt-tokens", at_least=1), default=128,
        help="--plan: the longest prompt of a generation batch (the planner reads no data)")
    add("--mfu", type=tok.number_flag("--mfu", float, above=0, at_most=1), default=0.4,
        help="--plan: model FLOPs utilisation for the time estimate")
    helps = dict(steps="optimizer steps", batch_tokens="global batch in tokens (all ranks and micro-steps)",
                 seq_len="tokens per sequence", micro_batch="sequences per forward, per rank",
                 lr="peak learning rate", warmup_steps="linear warm-up steps", log_every="steps per log line",
                 eval_every="steps between validations", ckpt_every="steps between checkpoints",
                 eval_batches="fixed validation micro-batches (per source), the same on every rank",
                 sample_batch="answers generated together (the KV cache grows with it: --plan shows it)")
    for key, value in paper.items():
        kind = type(next(iter(value.values())) if isinstance(value, dict) else value)
        flag = "--" + key.replace("_", "-")
        # checked where parsed: a count of 0 or a negative rate would fail later, or train nothing
        bound = dict(at_least=0) if key == "warmup_steps" else dict(above=0) if kind is float else dict(at_least=1)
        add(flag, type=tok.number_flag(flag, kind, **bound), default=None,
            help=f"{helps.get(key, '')} (paper: {show(paper[key])}; CPU presets: {show(toy[key])})")
    parser.set_defaults(scale_defaults=(paper, toy))


def resolve_args(args, world_size: int = 1):
    """Fill the scale-dependent defaults; derive the gradient accumulation steps."""
    paper, toy = args.__dict__.pop("scale_defaults")
    for key, value in (toy if args.preset in CPU_PRESETS else paper).items():
        if getattr(args, key) is None:
            if isinstance(value, dict) and args.preset not in value:
                raise UserError(f"no default --{key.replace('_', '-')} for preset {args.preset}: pass one")
            setattr(args, key, value[args.preset] if isinstance(value, dict) else value)
    args.world_size = world_size
    args.grad_accum = grad_accum_steps(args.batch_tokens, args.seq_len, args.micro_batch, world_size)
    if getattr(args, "sharded_checkpoint", False) and not args.fsdp:
        raise UserError("--sharded-checkpoint needs --fsdp: without it every rank holds the whole model anyway")
    return args


PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


def setup_distributed(device_name: str = "auto"):
    """-> (rank, world_size, device). Under torchrun (RANK is set) joins the process group:
    NCCL on GPUs, gloo on CPUs, one GPU per process (LOCAL_RANK). Else one process."""
    device = M.pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:   # processes on one CPU share its cores: more threads than cores slows everyone
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    # rank 0 alone evaluates in 05-07 and writes the checkpoints while the others wait in a
    # collective: at 7B and more that can outlast NCCL's default timeout of 10 minutes
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def gather_shares(mine: list, n: int) -> list:
    """Item i of n made on rank i % world_size (rank r made items r, r + world_size, ...): every
    rank gets all n back, in order. One process: its own list."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return [shares[i % len(shares)][i // len(shares)] for i in range(n)]


def end_distributed():
    """Leave together: rank 0 still writes files when the others are done, and a gloo rank that
    tears its process group down while a peer is still connected can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def find_tokenizer(args) -> Path:
    """--tokenizer, or RUN_DIR/tokenizer.model (chapter 01's): a one-line error if it is missing.
    Chapters 03-07 start here."""
    path = Path(args.tokenizer or args.run_dir / "tokenizer.model")
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path} (run 01_tokenizer.py first, or pass --tokenizer)")
    return path


def check_writable(folder: Path):
    """Fail now, in one line, if the run folder cannot take our files: not after the training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the run folder {folder}: {e.strerror}") from None


def start_outputs(folder: Path, json_name: str):
    """Before a run overwrites its checkpoint: remove the metrics of the previous run, so a run cut
    off (Ctrl-C, a crash) never leaves a new checkpoint beside metrics that say 'finished'."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        (folder / json_name).unlink(missing_ok=True)


def save_checkpoint(path, model, optimizer, cfg, step, history, extra=None, finished=True):
    """Weights, optimizer moments, config, RNG states and the step, which is also the data
    position (every batch is a function of seed, step, micro-step and rank): all an exact
    resume needs. Collective under FSDP (shards are gathered); rank 0 writes. With
    --sharded-checkpoint each rank writes its shards instead (save_sharded), and a finished run
    also writes its weights whole, for the next chapter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    meta = lambda: {"model_args": asdict(model.args), "config": json.loads(json.dumps(vars(cfg), default=str)),
                    "step": step, "history": history, **(extra or {})}
    if getattr(cfg, "sharded_checkpoint", False):
        save_sharded(sharded_path(path), model, optimizer, meta())
        if finished:   # weights only: the optimizer's moments stay in the shards
            model_state = get_model_state_dict(model, options=full)
            if dist.get_rank() == 0:
                M.save_atomic({**meta(), "model": model_state}, path)
        return
    model_state, optim_state = get_state_dict(model, optimizer, options=full)
    if not dist.is_initialized() or dist.get_rank() == 0:
        M.save_atomic({**meta(), "model": model_state, "optimizer": optim_state, "rng": rng_states()}, path)


def rng_states():
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                               if torch.cuda.is_available() else {})}


def sharded_path(path) -> Path:
    """Where --sharded-checkpoint keeps the training state of CKPT: the folder CKPT.dcp."""
    return Path(path).with_suffix(".dcp")


def save_sharded(folder: Path, model, optimizer, meta: dict):
    """torch.distributed.checkpoint: every rank writes the shards it holds (FSDP2's DTensors, the
    weights and Adam's moments), rank 0 the rest (meta.pt: step, history, RNG). Written into
    FOLDER.partial and renamed when every rank is done, so a cut-off save leaves the last one."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)   # sharded: nothing is gathered
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=partial)
    if rank == 0:
        torch.save({**meta, "rng": rng_states()}, partial / "meta.pt")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(folder: Path, model, optimizer):
    """save_sharded's shards back into model and optimizer: every rank reads its own (the ranks
    may be another number than the saving run's: the folder says where each piece lies)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def saved_checkpoint(path, cfg, finished: bool = True) -> Path:
    """What save_checkpoint left to name in a message: CKPT, or CKPT.dcp for a sharded run cut off."""
    return sharded_path(path) if getattr(cfg, "sharded_checkpoint", False) and not finished else Path(path)


def checkpoint_exists(path, cfg) -> bool:
    """Is there a training state to resume from: CKPT, or with --sharded-checkpoint CKPT.dcp?"""
    if getattr(cfg, "sharded_checkpoint", False):
        return (sharded_path(path) / "meta.pt").is_file()
    return Path(path).is_file()


# The flags a resumed run must share with the run it continues to be exact (the data order, the
# schedule, the optimizer); another value is allowed, with a warning that says so.
EXACT_RESUME = ("seq_len", "micro_batch", "batch_tokens", "world_size", "seed", "steps", "lr", "warmup_steps",
                "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip")


def load_training_state(path, model, optimizer, cfg=None):
    """Restore save_checkpoint's file into model and optimizer; -> (step, history). With cfg,
    warn of every flag in EXACT_RESUME that differs from the checkpoint's run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    sharded = getattr(cfg, "sharded_checkpoint", False)
    if sharded and not checkpoint_exists(path, cfg):
        raise UserError(f"no sharded checkpoint to resume: {sharded_path(path)} (--sharded-checkpoint reads "
                        "the folder a run with that flag wrote)")
    ckpt = M.load_checkpoint(sharded_path(path) / "meta.pt" if sharded else path)
    if ckpt.get("model_args") != asdict(model.args):
        theirs, ours = ckpt.get("model_args", {}), model.args
        raise UserError(f"{path} holds another model (preset {ckpt.get('config', {}).get('preset')}: dim "
                        f"{theirs.get('dim')}, {theirs.get('n_layers')} layers, vocab {theirs.get('vocab_size')}) "
                        f"than this one (dim {ours.dim}, {ours.n_layers} layers, vocab {ours.vocab_size}): "
                        "use its --preset and tokenizer, or drop --resume")
    if not sharded and "optimizer" not in ckpt:
        raise UserError(f"{path} holds the weights only (a --sharded-checkpoint run keeps its training state in "
                        f"{sharded_path(path)}): resume with --sharded-checkpoint")
    before = ckpt.get("config", {})
    changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (it had {before[k]})" for k in EXACT_RESUME
               if cfg is not None and k in before and getattr(cfg, k, None) != before[k]]
    if changed and not (dist.is_initialized() and dist.get_rank()):
        print(f"warning: resuming {path} with {', '.join(changed)}: training goes on, but no longer exactly "
              "as the interrupted run would have")
    if sharded:
        load_sharded(sharded_path(path), model, optimizer)
    else:
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"], ckpt["history"]


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def build_device(cfg, device):
    """Where a stage builds or loads a model it will train: under --fsdp in host memory, since
    fully_shard (train, place) then moves each rank's shards to the GPU a block at a time and no
    whole copy of the model ever sits there; else the device itself."""
    return torch.device("cpu") if getattr(cfg, "fsdp", False) else device


def place(model, cfg, device):
    """A model from build_device onto the devices before any training: under --fsdp sharded now
    (with --activation-checkpointing set first, as train sets it), so a stage can run it (04
    evaluates its start model) before train, which keeps it sharded; else moved whole."""
    if not getattr(cfg, "fsdp", False):
        return model.to(device)
    checkpoint_blocks(model, getattr(cfg, "activation_checkpointing", False))
    shard_model(model)
    # One forward outside inference mode first: FSDP2 allocates its gather buffers on the first
    # one, and buffers made under generate's inference_mode could not be written by training
    # later ("Inplace update to inference tensor outside InferenceMode")
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    model.reshard()   # FSDP2 keeps the root's weights gathered after a forward
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_model(model):
    """FSDP2 (fully_shard): each TransformerBlock its own group, then the rest (embedding, final
    norm, head) as the root's. A forward gathers one block's weights at a time and frees them after
    it, so a rank holds 1/world_size of the model plus a block or two. Every rank must then call the
    model's forward (and backward) the same number of times: each call is a collective."""
    from torch.distributed.fsdp import fully_shard
    if not dist.is_initialized():   # fully_shard would look for torchrun's RANK itself, in a traceback
        raise UserError("--fsdp shards over the processes torchrun starts: run under torchrun "
                        "(torchrun --nproc_per_node=N ...)")
    # a model loaded lazily (02's from_pretrained(lazy=True)) is read from its files a block at a
    # time, a new one (02's on_meta) drawn so; each block is sharded (onto the GPU) before the next
    # is made: no rank holds the whole model
    pending = model.__dict__.pop("pending", None)
    drawing = pending is not None and pending[0] == "draw"
    if drawing:   # from the RNG state on_meta saved, as __init__ draws: the defaults, the embedding
        torch.set_rng_state(pending[1])
        M.replay_default_draws(model)
        M.draw_weights(model, model.tok_embeddings)
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, M.TransformerBlock)]:
        if drawing:
            M.draw_weights(model, block)
        elif pending:
            M.fill_from_state(block, *pending, prefix=name + ".")
        fully_shard(block)
    if drawing:
        M.draw_weights(model, model.norm)
        M.draw_weights(model, model.output)
    elif pending:   # the rest: embedding, final norm, head
        M.fill_from_state(model, *pending)
    fully_shard(model)
    return model


def checkpoint_blocks(model, on: bool):
    """--activation-checkpointing: each TransformerBlock keeps only its input for backward, and
    backward runs its forward again to get the rest (torch.utils.checkpoint, non-reentrant; it
    re-enters the autocast of the first pass). Set on the instances, as an attribute `forward`
    that shadows the class's, so 02's model and its checkpoints are unchanged; on=False takes it
    off. Without gradients (evaluation, generation) the block runs plainly."""
    from torch.utils.checkpoint import checkpoint
    for block in (m for m in model.modules() if isinstance(m, M.TransformerBlock)):
        block.__dict__.pop("forward", None)
        if on:
            plain = block.forward   # the class's method, bound to this block
            block.forward = lambda *a, plain=plain: (checkpoint(plain, *a, use_reentrant=False)
                                                     if torch.is_grad_enabled() else plain(*a))


# ------------------------------------------------------------------------------------------
# The memory planner (issue 18; not in the paper): will a command fit on N GPUs of G GB
# each, and how long will it take? `--plan` on 03-07 comes here instead of running the stage,
# before any GPU, data or checkpoint is touched. The stage's models are built on the meta
# device (shapes, no memory), and each phase of the stage is costed per rank as TODAY's code
# holds its tensors, not as it could:
#   * a trained model is fp32 (weights, gradients and AdamW's two moments: 16 bytes a
#     parameter), sharded 1/N by FSDP, whole under DDP (which adds its gradient buckets, a
#     second copy of the gradients) or on one GPU,
#   * under FSDP a model is built or read in host memory (memory-mapped, or a block at a
#     time: host_memory) and reaches the GPU as shards (build_device,
#     place: fully_shard moves them a block at a time); 06's and 07's samplers
#     and the models they evaluate are whole on the GPU, in the compute dtype,
#   * under bf16 autocast the residual stream and the norms stay fp32, and each matmul saves a
#     bf16 copy of its weight for backward: a whole bf16 copy of the model, even under FSDP
#     (there is no MixedPrecisionPolicy; a test checks this on CPU),
#   * FSDP2 accumulating over micro-steps with set_requires_gradient_sync(False) keeps the
#     unsharded fp32 gradients between them (FSDPParam holds them whole until the last one),
#     unless --reduce-every-micro-step syncs at every micro-step,
#   * generation runs outside autocast, so the KV cache has the weights' dtype: fp32 for a
#     trained model (04, 05), the compute dtype for 06's and 07's samplers,
#   * frozen models (reference, reward models) sit whole in bf16 on every rank, 1/N of them
#     under FSDP.
# Prompt lengths come from no data: --plan-prompt-tokens stands for the longest prompt in a
# generation batch. The activation figures follow autograd's saved tensors, layer by layer;
# tests/test_plan.py checks them against the tensors autograd really saves for backward, on CPU.

GB = 1e9   # bytes. --gpu-memory is in GB too: an "80 GB" card holds 80 GiB = 85.9 GB, and the CUDA
           # context and the allocator's fragmentation take a few of them, so 80 is a fair usable figure
KINDS = ("weights", "grads", "optimizer", "activations", "kv_cache", "other_models")
PLAN_BATCHES = dict(score_rows=64, evaluate_rm=128)   # the batches 05 scores with (score_rows, evaluate_rm):
# defaults of its code, no flag. 04-07 generate --sample-batch answers at a time (args.sample_batch).
PLAN_NEW_TOKENS = dict(evaluate_chat=32, toy_comparisons=40, gatt=40)   # answer lengths that are no flag either:
# 04's evaluate_chat, 05's toy sampling (its longer, safety answers), 07's MAX_NEW_TOKENS


@dataclass
class PlanModel:
    """What the planner needs of a model, read off a copy built on the meta device."""
    args: M.ModelArgs
    params: int
    matmul: int      # weights of the nn.Linear layers: what autocast casts to bf16, and saves
    root: int        # outside the blocks (embedding, final norm, head): FSDP2's root group
    block: int       # one TransformerBlock
    lm_head: bool    # logits over the vocabulary (a language model), else a scalar (a reward model)


def plan_model(model_args, cls=None) -> PlanModel:
    with torch.device("meta"):
        model = (cls or M.Transformer)(model_args)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return PlanModel(model_args, params,
                     matmul=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
                     root=params - block * model_args.n_layers, block=block,
                     lm_head=getattr(model, "output", None) is not None)


@dataclass
class PlanSetup:
    gpus: int
    memory: float     # usable bytes a GPU
    fsdp: bool
    elem: int         # bytes of an element in the compute dtype: 2 (bf16 autocast) or 4 (fp32)
    ckpt: bool        # --activation-checkpointing (03's loop only)
    prompt: int       # longest prompt of a generation batch, in tokens
    reduce_every: bool = False   # --reduce-every-micro-step: FSDP's gradients stay sharded between micro-steps

    @property
    def shards(self):   # FSDP's share of a trained model on each rank
        return self.gpus if self.fsdp else 1

    @property
    def parallelism(self):
        return f"FSDP over {self.gpus} rank(s)" if self.fsdp else f"DDP over {self.gpus} ranks" \
            if self.gpus > 1 else "one GPU, no parallelism"


def layer_activation_bytes(a, elem: int) -> float:
    """Bytes one TransformerBlock saves for backward per token (02's code, read op by op). The
    residual stream is fp32 (the embedding is not autocast): each RMSNorm keeps its fp32 input and
    output (4 + 4 bytes a channel, twice a block). Under bf16 autocast each of the five linear layers
    that read a norm's output casts it to bf16 for itself (wq, wk, wv; w1, w3) and saves its copy;
    attention saves q, k, v and its output (flash or memory-efficient kernels: no seq x seq
    matrix) and a float per head; SwiGLU saves w1 x, w3 x, silu(w1 x) and their product. In fp32
    the linear layers read the norm's output itself."""
    d, hidden, heads = a.dim, M.ffn_hidden_dim(a), a.n_heads
    kv = (a.n_kv_heads or heads) / heads
    norms = 2 * (4 + 4) * d
    casts = (3 + 2) * elem * d if elem < 4 else 0
    attention = elem * d * (2 + 2 * kv) + 4 * heads
    return norms + casts + attention + 4 * elem * hidden


def training_activations(m: PlanModel, s: PlanSetup, rows: int, seq: int, mask: bool, ckpt: bool, label: str):
    """Saved tensors of one micro-step's forward (rows x seq tokens), at their peak (backward's
    start). mask: the chapter passes an attention mask (04's packing, 06's padding), which the
    fused kernel takes as a bias in the compute dtype, made and saved by every layer; with grouped
    kv heads no fused kernel takes a mask with enable_gqa, and SDPA falls back to the math kernel,
    which saves the seq x seq attention probabilities and the repeated keys and values."""
    a, e, tokens = m.args, s.elem, rows * seq
    per_layer = layer_activation_bytes(a, e) * tokens
    if mask:
        per_layer += rows * seq * seq * e
        if (a.n_kv_heads or a.n_heads) < a.n_heads:
            per_layer += rows * a.n_heads * seq * seq * e + 2 * e * a.dim * tokens
    if ckpt:   # each block keeps its input only, and backward recomputes one block at a time
        layers = a.n_layers * 4 * a.dim * tokens + per_layer
        what = f"{label} activations, checkpointed: {a.n_layers} block inputs + one block recomputed"
    else:
        layers = a.n_layers * per_layer
        what = f"{label} activations, {a.n_layers} blocks x {rows} x {seq:,} tokens"
    items = [(what + (" (attention mask: math kernel)" if mask and (a.n_kv_heads or a.n_heads) < a.n_heads
                      else " (attention mask as a bias)" if mask else ""), "activations", layers, False)]
    head = tokens * (8 * a.dim + (e * a.dim if e < 4 else 0))   # the final norm, the head's input
    if m.lm_head:   # the loss keeps fp32 log-probabilities over the vocabulary
        head += 4 * a.vocab_size * tokens
    items.append((f"{label} head and loss" + (", fp32 log-probabilities" if m.lm_head else ""), "activations",
                  head, False))
    if m.lm_head:   # backward starts with two more fp32 tensors of that size (the incoming and outgoing gradient)
        items.append((f"{label} loss gradients at backward's start, fp32", "activations",
                      8 * a.vocab_size * tokens, False))
    if e < 4 and not ckpt:   # each matmul saves its weight's bf16 copy for backward
        items.append((f"{label} weights cast to bf16 by autocast, saved for backward, whole", "activations",
                      2 * m.matmul, False))
    elif e < 4:   # checkpointing, with autocast's cache off (train()): the head's and one block's copies
        block_matmul = m.block - 2 * a.dim   # a block's weights less its two norms' gains
        items.append((f"{label} weights cast to bf16: the head's and the recomputed block's", "activations",
                      2 * (m.matmul - (a.n_layers - 1) * block_matmul), False))
    return items


def trained_state(m: PlanModel, s: PlanSetup, label: str, grads: bool, accumulate: bool = False,
                  running: bool = True, kinds=("weights", "grads", "optimizer")):
    """Weights, gradients and AdamW's moments of a model being trained, per rank, as 03's train()
    (and 06's PPO loop) hold them. grads: in backward (else they are freed: zero_grad(set_to_none)).
    accumulate: FSDP with gradient accumulation in 03's loop. running: it computes in this phase."""
    n, share = m.params, s.shards
    part = f", 1/{s.gpus} a rank" if s.fsdp else ", whole"
    items = [(f"{label} weights, fp32{part}", kinds[0], 4 * n / share, s.fsdp),
             (f"{label} AdamW moments, fp32{part}", kinds[2], 8 * n / share, s.fsdp)]
    if s.fsdp and running:   # FSDP2's working set: the root group stays unsharded through forward and backward,
        # and two blocks are gathered at a time (this one and the prefetched next one)
        items.append((f"{label}: FSDP's gathered root and two blocks, fp32", kinds[0], 4 * (m.root + 2 * m.block),
                      False))
    if grads:
        items.append((f"{label} gradients, fp32{part}", kinds[1], 4 * n / share, s.fsdp))
        if s.fsdp and accumulate and not s.reduce_every:
            items.append((f"{label} gradients kept unsharded between micro-steps (FSDP2 without sync), fp32",
                          kinds[1], 4 * n, False))
        elif s.fsdp:
            items.append((f"{label}: two blocks' unsharded gradients before reduce-scatter", kinds[1],
                          8 * m.block, False))
        elif s.gpus > 1:
            items.append((f"{label}: DDP's gradient buckets, fp32, a second copy", kinds[1], 4 * n, False))
    return items


def whole(m: PlanModel, label: str, kind: str, elem: int = 4):
    return [(f"{label}, {'fp32' if elem == 4 else 'bf16'}, whole on this rank", kind, elem * m.params, False)]


def held(m: PlanModel, s: PlanSetup, label: str, kind: str, running: bool = False):
    """A trained model kept after its training, without gradients or optimizer: sharded under FSDP.
    running: it computes in this phase, so FSDP gathers its root and blocks."""
    if not s.fsdp:
        return whole(m, label, kind)
    return [(f"{label}, fp32, 1/{s.gpus} a rank", kind, 4 * m.params / s.gpus, True)] + \
        [(f"{label}: FSDP's gathered root and two blocks, fp32", kind, 4 * (m.root + 2 * m.block), False)] * running


def forward_transient(m: PlanModel, rows: int, seq: int, elem: int, logits_copies: int, label: str):
    """The most a forward without gradients holds at once: the residual stream in and out and a
    norm's output (fp32), SwiGLU's three intermediates, and the logits (fp32, all positions)."""
    a, tokens = m.args, rows * seq
    nbytes = tokens * (12 * a.dim + 3 * elem * M.ffn_hidden_dim(a))
    if m.lm_head:
        nbytes += logits_copies * 4 * a.vocab_size * tokens
    return [(f"{label}: a forward of {rows} x {seq:,} tokens", "activations", nbytes, False)]


def kv_cache(a, rows: int, length: int, elem: int) -> float:
    return 2 * a.n_layers * rows * length * (a.n_kv_heads or a.n_heads) * (a.dim // a.n_heads) * elem


def generation(m: PlanModel, rows: int, prompt: int, new: int, label: str, elem: int = 4):
    """02's generate on a model of elem bytes a weight (fp32 unless a copy was cast: sampling runs
    outside autocast): the KV cache in that dtype for rows x min(context, prompt + new) positions,
    and the prompt's forward (its logits)."""
    length = min(m.args.max_seq_len, prompt + new)
    return [(f"{label}: KV cache, {'fp32' if elem == 4 else 'bf16'}, {rows} x {length:,} positions", "kv_cache",
             kv_cache(m.args, rows, length, elem), False),
            *forward_transient(m, rows, min(prompt, length - 1), elem, 1, f"{label}: the prompts' forward")]


def phase_total(items) -> float:
    return sum(i[2] for i in items)


# -- the stages, phase by phase: [(name, [(what, kind, bytes, shrinks with more GPUs)])] ------

def plan_pretrain(args, s: PlanSetup, models):
    m = models["policy"]
    training = trained_state(m, s, "model", grads=True, accumulate=args.grad_accum > 1) + training_activations(
        m, s, args.micro_batch, args.seq_len, mask=False, ckpt=s.ckpt, label="model")
    # under FSDP the model is built in host memory and reaches the GPU as shards (build_device)
    return [(f"train: {args.micro_batch} x {args.seq_len:,} tokens a micro-step, {args.grad_accum} micro-steps",
             training)]


def sft_training(args, s, m, label):
    """04's run_sft (also 06's RS fine-tuning and 07's two steps): 03's loop with 04's packing mask."""
    return trained_state(m, s, label, grads=True, accumulate=args.grad_accum > 1) + training_activations(
        m, s, args.micro_batch, args.seq_len, mask=True, ckpt=s.ckpt, label=label)


def plan_sft(args, s: PlanSetup, models):
    m, phases = models["policy"], []
    toy_eval = not getattr(args, "data", None)   # 04 evaluates on the toy world's tasks only
    answers = lambda: generation(m, args.sample_batch, s.prompt, PLAN_NEW_TOKENS["evaluate_chat"], "evaluation")
    if toy_eval and getattr(args, "init", None) != "scratch":   # under FSDP sharded already (place)
        phases.append(("evaluate the start model (answer_all)", held(m, s, "model", "weights", True) + answers()))
    phases.append(("SFT: 03's loop, 04's packing mask", sft_training(args, s, m, "model")))
    if toy_eval:
        phases.append(("evaluate the SFT model (answer_all)", held(m, s, "model", "weights", True) + answers()))
    if getattr(args, "compare_scratch", False):
        phases.append(("--compare-scratch: random weights train, the SFT model held",
                       held(m, s, "SFT model", "other_models") + sft_training(args, s, m, "scratch model")))
    return phases


def plan_reward(args, s: PlanSetup, models):
    rm, lm, phases = models["reward"], models["policy"], []
    toy = not (args.helpful_data or args.safety_data)
    if toy:   # rank 0 samples and judges the toy comparisons with one or two chat models
        n = 2 if args.sample_b else 1
        phases.append(("toy comparisons: rank 0 samples answers (answer_all)",
                       [(f"{n} chat model(s), fp32, whole", "other_models", n * 4 * lm.params, False)]
                       + generation(lm, args.sample_batch, s.prompt, PLAN_NEW_TOKENS["toy_comparisons"],
                                    "sampling")))
    names = [n for n, f in (("Helpfulness", args.helpful_data), ("Safety", args.safety_data)) if f or toy]
    for i, name in enumerate(names):
        kept = held(rm, s, f"the {names[0]} RM, trained", "other_models") if i else []   # main's `rms` dict
        phases.append((f"{name} RM: train ({args.micro_batch} rows of up to {args.seq_len:,} tokens)",
                       kept + trained_state(rm, s, "RM", grads=True, accumulate=args.grad_accum > 1)
                       + training_activations(rm, s, args.micro_batch, args.seq_len, False, s.ckpt, "RM")))
        rows = PLAN_BATCHES["evaluate_rm"]
        phases.append((f"{name} RM: evaluate_rm, {rows} rows a batch (rows up to --seq-len)",
                       kept + trained_state(rm, s, "RM", grads=False)
                       + forward_transient(rm, rows, args.seq_len, s.elem, 0, "evaluate_rm")))
    return phases


def frozen_held(m: PlanModel, s: PlanSetup, label: str, count: int = 1, running: bool = False):
    """Models that only run forward (06's reference and RMs), in the compute dtype: whole on every
    rank, or under FSDP 1/world_size a rank, with a block and the root gathered while one runs
    (count 0: only that gathered part, for a phase that adds it to models already counted)."""
    dtype = "bf16" if s.elem == 2 else "fp32"
    if not s.fsdp:
        return [(f"{label}, {dtype}, whole", "other_models", count * s.elem * m.params, False)]
    items = []
    if count:
        items.append((f"{label}, {dtype}, 1/{s.gpus} a rank", "other_models", count * s.elem * m.params / s.gpus, True))
    if running:
        items.append((f"{label}: FSDP's gathered root and two blocks, {dtype}", "other_models",
                      s.elem * (m.root + 2 * m.block), False))
    return items


def plan_rs_ppo(args, s: PlanSetup, models):
    m, rm, W, e = models["policy"], models["reward"], s.gpus, s.elem
    rms_label = "Helpfulness and Safety RMs"
    rms = frozen_held(rm, s, rms_label, 2)
    scoring_rms = frozen_held(rm, s, rms_label, 2, running=True)
    policy = whole(m, "policy", "weights")
    length = min(m.args.max_seq_len, s.prompt + args.max_new_tokens)   # prompt + answer (+ EOS within it)
    rows = lambda n: max(1, min(args.sample_batch, n))
    first_rows = rows(max(args.calibration_prompts, args.fig_prompts * args.fig_n,
                          args.rs_prompts // W * args.rs_k if args.rs_iterations else 0))
    # run_rlhf: the start model samples (and is evaluated) in the compute dtype, whole on every rank;
    # under FSDP the RMs are read into host memory and reach the GPU as shards (build_device)
    start = whole(m, "start model (the sampler)", "weights", e)
    phases = [
        ("load: both RMs and the start model" + (", the model whole on every rank" if s.fsdp else ", whole"),
         rms + start),
        ("calibration, Figures 7-8 (" + ("every rank" if s.fsdp else "rank 0") + ") and RS: sample_answers",
         rms + start + generation(m, first_rows, s.prompt, args.max_new_tokens, "sampling", e)),
        ("calibration: both RMs score the samples (score_rows)",
         scoring_rms + start + forward_transient(rm, first_rows, length, e, 0, "scoring"))]
    if args.rs_iterations:
        sampler_kept = whole(m, "the round's sampler, kept", "other_models", e) if e < 4 else []
        if e < 4 and not s.fsdp:   # rs_round: the fp32 weights to train load beside the sampler (under
            phases.append(("RS: the model to fine-tune loads whole in fp32",   # FSDP in host memory)
                           rms + sampler_kept + whole(m, "model to fine-tune", "weights")))
        phases += [("RS fine-tuning: 03's loop on the pool, the RMs held",
                    rms + sampler_kept + sft_training(args, s, m, "policy")),
                   ("RS: rs.pt loads whole (the next sampler), the trained model still held",
                    rms + held(m, s, "trained model", "other_models") + whole(m, "rs.pt", "weights", e))]
    if not args.ppo_iterations:
        return phases
    ref = frozen_held(m, s, "reference policy")
    # run_ppo under FSDP: a whole copy in the compute dtype samples, refreshed every iteration
    sampler = whole(m, "sampler copy of the policy", "other_models", e) if s.fsdp else []
    value = lambda grads, running: trained_state(rm, s, "value model", grads, running=running,
                                                 kinds=("other_models",) * 3)
    steady = lambda running: rms + ref + sampler + trained_state(m, s, "policy", False, running=running) + \
        value(False, running)
    if s.fsdp:   # the three are read into host memory; fully_shard moves each rank's shards here
        phases.append(("PPO: reference, policy and value model built in host memory, their shards moved here",
                       steady(False) + [("a block on its way to the device, whole before FSDP shards it, fp32",
                                         "other_models", 4 * m.block, False)]))
    else:
        phases.append(("PPO: reference, policy and value model load, whole",
                       rms + ref + policy + whole(rm, "value model", "other_models")))
    ppo_rows = rows(args.ppo_prompts // W)
    if s.fsdp:
        largest = m.args.vocab_size * m.args.dim   # the embedding and the output layer
        gathered = [("one weight of the policy gathered whole (the largest), fp32", "other_models", 4 * largest, False)]
        phases.append(("PPO iteration: the sampler refreshed weight by weight", steady(False) + gathered))
    phases += [("PPO iteration: rollouts (sample_answers)",   # under FSDP the sampler copy's dtype
                steady(False) + generation(m, ppo_rows, s.prompt, args.max_new_tokens, "rollouts",
                                           s.elem if s.fsdp else 4)),
               ("PPO iteration: both RMs score the rollouts (score_rows)",
                steady(False) + frozen_held(rm, s, rms_label, 0, running=True)
                + forward_transient(rm, ppo_rows, length, e, 0, "scoring")),
               ("PPO iteration: old and reference log-probs, values (no gradients)",
                steady(True) + frozen_held(m, s, "reference policy", 0, running=True)
                + forward_transient(m, args.ppo_micro_batch, length, e, 3, "log-probs")),
               (f"PPO update: policy and value graphs of {args.ppo_micro_batch} rollouts alive together",
                rms + ref + sampler + trained_state(m, s, "policy", grads=True) + value(True, True)
                + training_activations(m, s, args.ppo_micro_batch, length, True, s.ckpt, "policy")
                + training_activations(rm, s, args.ppo_micro_batch, length, True, s.ckpt, "value model")),
               ("after PPO: ppo.pt alone evaluated (evaluate)",
                rms + whole(m, "ppo.pt", "weights", e)
                + generation(m, args.sample_batch, s.prompt, PLAN_NEW_TOKENS["evaluate_chat"], "evaluation", e))]
    return phases


def plan_gatt(args, s: PlanSetup, models):
    m = models["policy"]
    a, ctx = m.args, m.args.max_seq_len
    new = PLAN_NEW_TOKENS["gatt"]
    e, batch = s.elem, args.sample_batch
    # under FSDP each step's model is read into host memory and reaches the GPU as shards (no build phase)
    two = whole(m, "models before and after GAtt", "other_models", e) * 2   # in the compute dtype
    # dialogues of up to 20 turns: fit() cuts them to the context less an answer's room, so the
    # context bounds their length (attention_dialogs builds them that long on purpose)
    share = -(-args.dialogues // s.gpus)   # every rank samples its share of the dialogues
    sampling = generation(m, min(batch, share), ctx - new, new, "sampling", e)
    return [
        ("step 1: instructions in the current message (03's loop)", sft_training(args, s, m, "model")),
        ("GAtt sampling (every rank, a share): the step-1 model, whole; converse, dialogues up to the context",
         whole(m, "step-1 model", "weights", e) + sampling),
        ("step 2: Ghost Attention (03's loop)", sft_training(args, s, m, "model")),
        ("evaluation (every rank, a share of the dialogues): adherence, before and after GAtt whole, "
         "dialogues up to the context",
         two + generation(m, min(batch, args.eval_dialogues), ctx - new, new, "adherence", e)),
        ("evaluation (every rank): attention maps of a dialogue the length of the context (Figure 10)",
         two + [("one layer's attention probabilities, fp32, until reduced", "activations", a.n_heads * ctx * ctx * 4,
                 False),
                ("that layer's scores while computed, fp32", "activations", 2 * a.n_heads * ctx * ctx * 4, False)]),
        ("evaluation (every rank, a share of the prompts): 04's table, the start model loads beside the two",
         two + whole(m, "start model (--init)", "other_models", e)
         + generation(m, batch, s.prompt, PLAN_NEW_TOKENS["evaluate_chat"], "evaluation", e))]


PLAN_STAGES = {"pretrain": plan_pretrain, "sft": plan_sft, "reward": plan_reward, "rs_ppo": plan_rs_ppo,
               "gatt": plan_gatt}


# -- compute: FLOPs and time at a given MFU ------------------------------------------------

def rm_flops_per_token(a, seq: int) -> float:
    """A reward model's training FLOPs per token: 02's count without the vocabulary head (its head
    is one row)."""
    return M.flops_per_token(a, seq) - 6 * (a.vocab_size - 1) * a.dim


def plan_flops(stage: str, args, s: PlanSetup, models):
    """-> (FLOPs of the run or None, FLOPs a step, what was counted). Training counts
    forward + backward (02's flops_per_token); a forward alone is a third of it."""
    a = models["policy"].args
    per_token = M.flops_per_token(a, args.seq_len)
    per_step = args.batch_tokens * per_token
    if stage == "pretrain":
        return args.steps * per_step, per_step, f"{args.steps:,} steps x {args.batch_tokens:,} tokens"
    if stage == "sft":
        if args.steps:
            return args.steps * per_step, per_step, f"{args.steps:,} steps x {args.batch_tokens:,} tokens"
        return None, per_step, "the steps follow from the data (pass --steps to count them)"
    if stage == "reward":
        return None, args.batch_tokens * rm_flops_per_token(a, args.seq_len), \
            "a step of an RM; the steps follow from the data"
    if stage == "gatt":   # step 1 may take a batch of its own (07's --inst-batch-tokens)
        inst_step = (getattr(args, "inst_batch_tokens", None) or args.batch_tokens) * per_token
        return args.inst_steps * inst_step + args.steps * per_step, per_step, \
            f"{args.inst_steps + args.steps:,} training steps (step 1 and GAtt); sampling and evaluation not counted"
    # 06, with every answer as long as --max-new-tokens allows (an upper bound)
    length = min(a.max_seq_len, s.prompt + args.max_new_tokens)
    fwd, rm_fwd = M.flops_per_token(a, length) / 3, rm_flops_per_token(a, length) / 3
    judged = fwd + 2 * rm_fwd   # generate, then both RMs score
    iteration = args.ppo_prompts * length * (judged + 2 * fwd + rm_fwd
                                             + args.ppo_epochs * 3 * (fwd + rm_fwd))
    temperatures = {float(t) for t in args.fig_temperatures.split(",") if t.strip()} | {args.rs_temperature}
    samples = args.calibration_prompts + args.fig_prompts * args.fig_n * len(temperatures) \
        + args.rs_iterations * args.rs_prompts * args.rs_k
    pool = sum(args.rs_prompts * (r + 1) for r in range(args.rs_iterations))   # the pool grows a round at a time
    total = args.ppo_iterations * iteration + samples * length * judged + \
        args.rs_epochs * pool * length * M.flops_per_token(a, args.seq_len)
    return total, iteration, (f"{args.ppo_iterations} PPO iterations of {args.ppo_prompts} rollouts, "
                              f"{samples:,} other samples and RS on the pool, every answer "
                              f"{args.max_new_tokens} tokens long (an upper bound)")


# -- running a plan --------------------------------------------------------------------------

def plan_setup(args) -> PlanSetup:
    if args.dtype not in ("auto", "bf16", "fp32"):
        raise UserError(f"--plan with --dtype {args.dtype}: the chapters train in bf16 (auto on a GPU) or fp32")
    return PlanSetup(gpus=args.gpus, memory=args.gpu_memory * GB, fsdp=args.fsdp,
                     elem=4 if args.dtype == "fp32" else 2, ckpt=args.activation_checkpointing,
                     prompt=args.plan_prompt_tokens, reduce_every=args.reduce_every_micro_step)


def plan_phases(stage: str, args, s: PlanSetup, models):
    """-> [(phase name, items, total bytes)] and the index of the peak phase."""
    phases = [(name, items, phase_total(items)) for name, items in PLAN_STAGES[stage](args, s, models)]
    return phases, max(range(len(phases)), key=lambda i: phases[i][2])


def micro_flags(stage: str):
    """The flags that set the rows of a forward in each stage (a training micro-batch; 06's
    generation batch too), with their smallest value."""
    return {"reward": {"micro_batch": 2}, "rs_ppo": {"micro_batch": 1, "ppo_micro_batch": 1, "sample_batch": 8},
            "gatt": {"micro_batch": 1, "sample_batch": 1}}.get(
        stage, {"micro_batch": 1})


def plan_valid(stage: str, args, gpus: int) -> bool:
    """Would the chapter accept these flags (the batch tiles the ranks and micro-batches)?"""
    try:
        args.grad_accum = grad_accum_steps(args.batch_tokens, args.seq_len, args.micro_batch, gpus)
    except UserError:
        return False
    if stage == "rs_ppo":
        return not (args.ppo_prompts % args.ppo_mini_batch or args.ppo_mini_batch % (gpus * args.ppo_micro_batch)
                    or args.rs_prompts % gpus)
    return True


def cheapest_fix(stage: str, args, s: PlanSetup, models):
    """The first change that fits, cheapest first: a smaller micro-batch (costs nothing but some
    speed), activation checkpointing (a third more compute), under FSDP a reduce-scatter at every
    micro-step (more communication), FSDP on the same GPUs, then more GPUs (with checkpointing,
    then with both, where that alone is not enough). -> (the change in words, its peak bytes),
    or (None, the last plan tried: the most GPUs, with checkpointing) when nothing fits."""
    tries = []
    for flag, smallest in micro_flags(stage).items():
        value = getattr(args, flag)
        while value // 2 >= smallest:
            value //= 2
            tries.append(({flag: value}, {}))
    if not s.ckpt:
        tries.append(({}, {"ckpt": True}))
        tries += [(flags, {"ckpt": True}) for flags, _ in tries[:-1]]
    if s.fsdp and not s.reduce_every:
        tries += [({}, {"reduce_every": True, "ckpt": True})]
    if not s.fsdp and s.gpus > 1:
        tries += [({}, {"fsdp": True}), ({}, {"fsdp": True, "ckpt": True})]
    gpus = s.gpus
    while gpus < 4096:
        gpus *= 2
        tries += [({}, {"gpus": gpus, "fsdp": True}), ({}, {"gpus": gpus, "fsdp": True, "ckpt": True}),
                  ({}, {"gpus": gpus, "fsdp": True, "ckpt": True, "reduce_every": True})]
    last = None
    for flags, setup in tries:
        trial, s2 = argparse.Namespace(**{**vars(args), **flags}), replace(s, **setup)
        if not plan_valid(stage, trial, s2.gpus):
            continue
        phases, peak = plan_phases(stage, trial, s2, models)
        last = (s2, phases[peak])
        if phases[peak][2] <= s2.memory:
            words = [f"--{k.replace('_', '-')} {v}" for k, v in flags.items()]
            words += ["--fsdp"] * (s2.fsdp and not s.fsdp) + ["--activation-checkpointing"] * (s2.ckpt and not s.ckpt)
            words += ["--reduce-every-micro-step"] * (s2.reduce_every and not s.reduce_every)
            if s2.gpus != s.gpus:
                words.append(f"on {s2.gpus} GPUs" + (f" (torchrun --nproc_per_node={s2.gpus})" if s2.gpus <= 8 else
                                                      f" (torchrun on {s2.gpus // 8} nodes of 8)"))
            return " ".join(words), phases[peak][2]
    return None, last


def host_memory(args, stage: str, models, s: PlanSetup):
    """-> (bytes, what): the CPU memory each rank fills with weights while it builds its models,
    beyond the pages of memory-mapped checkpoints (ours are read so: 02's load_weights; a node's
    ranks share those pages, which the OS can drop and read again)."""
    init = str(getattr(args, "init", None) or "")
    ours = init.endswith(".pt")   # else a Meta or Hugging Face folder (the planner reads no files)
    m = models["policy"]
    fresh = stage == "pretrain" or init == "scratch"
    if fresh and s.fsdp:   # 02's on_meta: drawn as shard_model shards it
        return 4 * max(m.block, m.root), ("the model is drawn a block at a time as FSDP shards it "
                                          "(the largest part, fp32)")
    if fresh:
        return 4 * m.params, "the model is built whole, fp32"
    if stage in ("sft", "reward") and s.fsdp and not ours:   # 04's load_start, 05's from_lm: lazy=True
        m = models["reward"] if stage == "reward" else m
        return 4 * max(m.block, m.root), ("the start model is read a block at a time as FSDP shards it "
                                          "(the largest part, fp32)")
    if stage == "rs_ppo" and s.fsdp:   # 06: the frozen models lazily, in the compute dtype; the rest mapped
        rm = models["reward"]
        return s.elem * max(m.block, m.root, rm.block, rm.root), ("PPO's reference and both RMs are read a "
                                                                  "block at a time as FSDP shards them (the "
                                                                  "largest part, in the compute dtype)")
    if not ours:
        return 4 * m.params, "the start model is read whole from its folder and cast to fp32"
    return 0, "our checkpoints are memory-mapped, nothing copied whole"


def plan_stage(args, stage: str, budget=None, reward_model=None):
    """--plan: print the stage's memory per rank, phase by phase, its verdict on --gpus x
    --gpu-memory, the cheapest change that would fit, FLOPs and time at --mfu; write --plan-json.
    budget: 06's BUDGET (its defaults, resolved as 06 resolves them). reward_model: 05's class.
    Touches no GPU, data or checkpoint; returns the JSON's dict."""
    if args.plan == "table2":
        print_table2()
        return {"table2": table2_rows()}
    resolve_args(args, args.gpus)   # the real run's defaults, and its check that the batch tiles the ranks
    for key, (paper, toy, _) in (budget or {}).items():
        if getattr(args, key) is None:
            value = toy if args.preset in CPU_PRESETS else paper
            setattr(args, key, value.get(args.preset, 0.01) if isinstance(value, dict) else value)
    if getattr(args, "no_rs", False):
        args.rs_iterations = 0
    if stage == "reward" and args.micro_batch % 2:
        raise UserError(f"--micro-batch {args.micro_batch} must be even: a pair is two rows, chosen and rejected")
    if not plan_valid(stage, argparse.Namespace(**vars(args)), args.gpus):   # 06's own checks, in one line
        raise UserError(f"--ppo-prompts {args.ppo_prompts}, --ppo-mini-batch {args.ppo_mini_batch}, --ppo-micro-batch "
                        f"{args.ppo_micro_batch} and --rs-prompts {args.rs_prompts} do not tile {args.gpus} ranks "
                        "(06_rs_ppo.py would refuse them)")
    s = plan_setup(args)
    model_args = M.PRESETS[args.preset]
    models = {"policy": plan_model(model_args)}
    if reward_model is not None:
        models["reward"] = plan_model(model_args, reward_model)
    phases, peak = plan_phases(stage, args, s, models)
    peak_bytes, fits = phases[peak][2], phases[peak][2] <= s.memory

    script = {"pretrain": "03_pretrain.py", "sft": "04_sft.py", "reward": "05_reward.py", "rs_ppo": "06_rs_ppo.py",
              "gatt": "07_gatt.py"}[stage]
    m = models["policy"]
    print(f"plan: {script} --preset {args.preset}: {m.params:,} parameters (vocabulary {model_args.vocab_size:,}, "
          "the preset's)" + (f"; reward and value models {models['reward'].params:,}" if "reward" in models else ""))
    micro = f"micro-batch {args.micro_batch} x {args.seq_len:,} tokens, {args.grad_accum} micro-step(s)"
    if stage == "rs_ppo":
        micro += f" (RS); PPO micro-batch {args.ppo_micro_batch}, answers up to {args.max_new_tokens:,} tokens"
    print(f"{s.gpus} GPU(s) x {args.gpu_memory:g} GB | {s.parallelism} | "
          f"{'bf16 autocast, fp32 weights and AdamW' if s.elem == 2 else 'fp32'} | {micro} | activation "
          f"checkpointing {'on' if s.ckpt else 'off'}"
          + (f" | prompts of up to {s.prompt} tokens (--plan-prompt-tokens)" if stage != "pretrain" else ""))
    print("\nmemory per rank (GB) in each phase, as today's code holds it:")
    print(f"{'total':>7} " + " ".join(f"{k:>12}" for k in KINDS) + "  phase")
    for i, (name, items, total) in enumerate(phases):
        by_kind = {k: sum(b for _, kind, b, _ in items if kind == k) for k in KINDS}
        print(f"{total / GB:>7.1f} " + " ".join(f"{by_kind[k] / GB:>12.1f}" if by_kind[k] else f"{'-':>12}"
                                                for k in KINDS) + f"  {name}" + ("  <- peak" if i == peak else ""))
    name, items, _ = phases[peak]
    print(f"\npeak: {peak_bytes / GB:.1f} GB, in '{name}':")
    for what, kind, nbytes, _ in sorted(items, key=lambda i: -i[2]):
        print(f"{nbytes / GB:>9.2f}  {kind:<13} {what}")
    fix = None
    if fits:
        print(f"\nverdict: fits on {s.gpus} x {args.gpu_memory:g} GB ({peak_bytes / GB:.1f} GB at the peak, "
              f"{s.memory / GB - peak_bytes / GB:.1f} GB to spare)")
    else:
        print(f"\nverdict: does not fit on {s.gpus} x {args.gpu_memory:g} GB ({peak_bytes / GB:.1f} GB at the peak)")
        change, found = cheapest_fix(stage, args, s, models)
        if change:
            fix = change
            print(f"cheapest change that fits: {change} ({found / GB:.1f} GB at the peak)")
        else:
            print("no change of --micro-batch, --activation-checkpointing, --fsdp or the number of GPUs makes it fit"
                  + ("" if found is None else
                     f": on {found[0].gpus:,} GPUs with FSDP and checkpointing, '{found[1][0]}' still needs "
                     f"{found[1][2] / GB:.1f} GB, {sum(b for _, _, b, shrinks in found[1][1] if not shrinks) / GB:.1f}"
                     " GB of it held whole on a rank (models, KV caches, batches no flag sets)")
                  + ". The code has to change: issue 18's second part (models built and kept sharded, sampling "
                    "in bf16, evaluation spread over the ranks)")

    fpt = M.flops_per_token(m.args, args.seq_len)
    device_peak = args.peak_flops or A100_PEAK
    total, per_step, counted = plan_flops(stage, args, s, models)
    rate = s.gpus * device_peak * args.mfu
    print(f"\ncompute: {fpt / 1e9:.2f} GFLOP a token trained at {args.seq_len:,} tokens (02's flops_per_token: "
          f"6 x the {m.params - m.args.vocab_size * m.args.dim:,} weights that multiply + 12 x layers x dim x seq)")
    which = f"{s.gpus} x {device_peak / 1e12:g} TFLOP/s" + ("" if args.peak_flops else " (an A100's bf16, the paper's;"
                                                             " --peak-flops for another GPU)")
    step_name = "a PPO iteration" if stage == "rs_ppo" else "a step"
    print(f"{step_name}: {per_step:.3e} FLOP, {per_step / rate:,.1f} s at MFU {args.mfu:.0%} on {which}")
    if total is not None:
        print(f"the stage: {total:.3e} FLOP ({counted}): {fmt_duration(total / rate)} at MFU {args.mfu:.0%}"
              + (" (a lower bound: decoding runs far below a training MFU)" if stage == "rs_ppo" else ""))
    else:
        print(f"the stage: {counted}")
    host, what = host_memory(args, stage, models, s)
    print(f"host memory: {what}: {host / GB:.1f} GB a rank, "
          f"{min(s.gpus, 8) * host / GB:.0f} GB for {min(s.gpus, 8)} ranks on a node")
    # a checkpoint: the trained model (05: an RM; 06: PPO's policy and value model), fp32 weights
    # and Adam's two moments, 12 bytes a parameter, gathered whole on rank 0 unless sharded
    # (with --sharded-checkpoint only the finished model's weights are gathered: 06's policy alone)
    kept = models["reward"].params if stage == "reward" else models["policy"].params
    trained = kept + (models["reward"].params if stage == "rs_ppo" else 0)
    sharded = s.fsdp and getattr(args, "sharded_checkpoint", False)
    ckpt_host = 4 * kept if sharded else 12 * trained
    print(f"checkpoints: " + (f"each rank writes its shards (--sharded-checkpoint); rank 0 gathers the finished "
                              f"weights alone in CPU memory: {ckpt_host / GB:.1f} GB" if sharded else
                              f"rank 0 gathers the training state (fp32 weights and Adam's two moments) in CPU "
                              f"memory: {ckpt_host / GB:.1f} GB" + (" (--sharded-checkpoint: 1/N a rank)"
                                                                  if s.fsdp else "")))
    if stage == "pretrain":
        print()
        print_table2()

    result = dict(stage=script, preset=args.preset, gpus=s.gpus, gpu_memory_gb=args.gpu_memory,
                  parallelism="FSDP" if s.fsdp else "DDP" if s.gpus > 1 else "none",
                  dtype="bf16" if s.elem == 2 else "fp32", micro_batch=args.micro_batch, seq_len=args.seq_len,
                  activation_checkpointing=s.ckpt, prompt_tokens=s.prompt,
                  per_rank_bytes={**{k: sum(b for _, kind, b, _ in items if kind == k) for k in KINDS},
                                  "peak": peak_bytes},
                  peak_phase=name, fits=fits, fix=fix,
                  phases=[dict(name=n, bytes=t, items=[dict(what=w, kind=k, bytes=b) for w, k, b, _ in its])
                          for n, its, t in phases],
                  flops_per_token=fpt, flops_per_step=per_step, flops=total, mfu=args.mfu, peak_flops=device_peak,
                  seconds=total / rate if total is not None else None, host_bytes_per_rank=host,
                  checkpoint_host_bytes_rank0=ckpt_host)
    if stage == "pretrain":
        result["table2"] = table2_rows()
    if args.plan_json:
        tok.write_json(args.plan_json, result)
        print(f"wrote {args.plan_json}")
    return result


def fmt_duration(seconds: float) -> str:
    return f"{seconds / 86400:,.1f} days" if seconds >= 86400 else f"{seconds / 3600:,.1f} hours" \
        if seconds >= 3600 else fmt_time(seconds)


# ------------------------------------------------------------------------------------------
# A run: flags, data, model, train(), then what the model learned.

def main(argv=None):
    t_start = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, PAPER, TOY)
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece model (default RUN_DIR/tokenizer.model)")
    parser.add_argument("--mix", help=f"sources and sampling weights (default {DEFAULT_MIX}; with --data: data=1)")
    parser.add_argument("--data", nargs="+", type=Path, metavar="FILE",
                        help="your corpus instead of the default mix: .txt files (a document each) and/or "
                             ".bin token files (uint16 ids; uint32 for vocabularies of 65536 or more)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the toy world (make_world)")
    parser.add_argument("--world-docs", type=tok.number_flag("--world-docs", at_least=1), default=10_000,
                        help="toy-world documents to generate")
    parser.add_argument("--compare", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="overlay these runs' curves (their pretrain.json) on the figure")
    args = parser.parse_args(argv)
    if args.plan:   # what the command would need, on paper: no GPU, data or checkpoint
        return plan_stage(args, "pretrain")
    for other in args.compare:   # check now, not after the training
        if not (other / "pretrain.json").is_file():
            raise UserError(f"--compare {other}: no pretrain.json there (train a run into it first)")
    rank, world_size, device = setup_distributed(args.device)
    resolve_args(args, world_size)
    check_writable(args.run_dir)
    log = print if rank == 0 else (lambda *a, **k: None)

    # 1. Tokenizer and data. One process tokenizes; the others wait, then map the same files.
    tok_path = find_tokenizer(args)
    tokenizer, args.tokenizer = tok.Tokenizer(tok_path), tok_path
    world = make_world(args.world_seed)
    sources = {"data": list(args.data)} if args.data else {
        "shakespeare": sorted(tok.DEFAULT_CORPUS_DIR.glob("*.txt")),
        "world": world_documents(world, args.world_docs, random.Random(args.world_seed))}
    args.mix = args.mix or ("data=1" if args.data else DEFAULT_MIX)
    weights = parse_mix(args.mix, list(sources))
    if rank == 0:
        t0 = time.time()
        for name in weights:
            manifest = prepare_source(args.run_dir / "data", name, sources[name], tokenizer, tok_path)
            log(f"data {name}: {manifest['train_tokens']:,} train + {manifest['val_tokens']:,} validation tokens, "
                f"weight {weights[name]:.2f}")
        log(f"data ready in {time.time() - t0:.1f}s under {args.run_dir / 'data'}")
    if world_size > 1:
        dist.barrier()
    data = load_splits(args.run_dir / "data", weights, tokenizer.n_words, args.seq_len)

    # 2. The model, with the tokenizer's vocabulary; every rank builds the same initial weights
    model_args = replace(M.PRESETS[args.preset], vocab_size=tokenizer.n_words)
    if args.seq_len > model_args.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds preset {args.preset}'s context {model_args.max_seq_len}")
    torch.manual_seed(args.seed)
    # under --fsdp on the meta device, drawn a block at a time as train() shards it (02's on_meta)
    model = M.on_meta(M.Transformer, model_args) if args.fsdp else M.Transformer(model_args).to(device)
    n_params = M.count_params(model_args)
    log(f"model {args.preset}: {n_params:,} parameters | {world_size} process(es) on {device} | batch "
        f"{args.batch_tokens:,} tokens = {world_size} ranks x {args.micro_batch} x {args.seq_len} tokens x "
        f"{args.grad_accum} micro-steps | {args.steps} steps | peak LR {args.lr:g}")

    # 3. Batches. Sequence i of a step is a pure function of (seed, step, i); rank r at
    #    micro-step k takes i in (k * world_size + r) * micro_batch + [0, micro_batch).
    def get_batch(step, micro):
        first = (micro * world_size + rank) * args.micro_batch
        return to_xy([sequence(data, weights, "train", args.seq_len, args.seed, step, i)
                      for i in range(first, first + args.micro_batch)], device)

    val_batches = {n: [to_xy([sequence(data, {n: 1.0}, "val", args.seq_len, 0, b, i)   # seed 0: fixed
                              for i in range(args.micro_batch)], device) for b in range(args.eval_batches)]
                   for n in weights}

    def evaluate(model):   # the mix's loss is the weighted mean of the sources', as is its entropy
        per_source = {n: sum(lm_loss(model, b).item() for b in bs) / len(bs) for n, bs in val_batches.items()}
        return {"val_loss": sum(weights[n] * v for n, v in per_source.items()),
                **({f"val_{n}": v for n, v in per_source.items()} if len(per_source) > 1 else {})}

    # 4. Train
    ckpt_path = args.run_dir / "pretrain.pt"
    start_outputs(args.run_dir, "pretrain.json")
    result = train(args, model, get_batch, lm_loss, evaluate, ckpt_path,
                   extra={"tokenizer": str(tok_path), "mix": weights})
    history = result["history"]

    # 5. What it learned: the loss against a model blind to context, and samples (every rank
    #    samples, since an FSDP forward needs all of them; rank 0 prints)
    entropy = unigram_entropy(data, weights, tokenizer.n_words)
    final_val = next(h["val_loss"] for h in reversed(history) if "val_loss" in h)
    log(f"\nfinal validation loss {final_val:.3f} nats/token | unigram entropy of the training tokens "
        f"{entropy:.3f} (the loss of a model that ignores context)")
    rng = random.Random(args.seed)
    person, (question, answer) = rng.choice(world.people), arithmetic_task(rng)
    prompts = [("Ham.\nTo be, or not to be,", 0.8, 48, None), (f"{question} =", 0.0, 6, answer),
               (f"{person.name} lives in", 0.0, 6, person.town),
               (f"{person.name}'s favourite colour is", 0.0, 6, person.colour)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    for prompt, temperature, n_new, expected in prompts:
        out = M.generate(model, [tokenizer.encode(prompt, bos=True, eos=False)], n_new, temperature,
                         0.9, tokenizer.eos_id, generator, args.compile_decode)[0]
        text = tokenizer.decode(out)
        samples.append(dict(prompt=prompt, completion=text, expected=expected))
        if expected:   # a fact or a sum: its first sentence is the answer
            text = f"{text.split('.')[0]}.   (the world says: {expected})"
        log(f"\n> {prompt!r} (temperature {temperature})\n{text}")

    metrics = None
    if rank == 0:
        # finished: False after --stop-at, so that pipeline.py runs this stage again
        metrics = dict(config=json.loads(json.dumps(vars(args), default=str)), finished=result["finished"],
                       n_params=n_params,
                       final_val_loss=final_val, unigram_entropy=entropy, tokens_per_s=result["tokens_per_s"],
                       train_s=result["train_s"], wall_s=time.time() - t_start, history=history, samples=samples)
        tok.write_json(args.run_dir / "pretrain.json", metrics)
        runs = [(f"{args.preset} ({n_params / 1e6:.1f}M)", history)]
        for other in args.compare:
            o = json.loads((other / "pretrain.json").read_text())
            runs.append((f"{o['config']['preset']} ({o['n_params'] / 1e6:.1f}M)", o["history"]))
        plot_losses(args.run_dir / "pretrain_loss.png", runs, entropy)
        speed = f"{result['tokens_per_s']:,.0f}" if result["tokens_per_s"] else "n/a"
        log(f"\n{speed} tokens/s | wall {fmt_time(time.time() - t_start)} | "
            f"wrote {saved_checkpoint(ckpt_path, args, result['finished'])}, "
            f"pretrain.json and pretrain_loss.png")
        if not result["finished"]:
            log(f"stopped at step {args.stop_at} of {args.steps} (--stop-at): pretrain.json says finished: "
                "false; continue with --resume")
    end_distributed()
    return metrics


if __name__ == "__main__":
    tok.run_cli(main)