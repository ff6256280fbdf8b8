"""
Chapter 03: pretraining (Llama 2 paper Sec. 2.1-2.2, Table 1).

Llama 2 is a next-token predictor trained on 2T tokens of public text with AdamW (beta1 0.9,
beta2 0.95, eps 1e-5, weight decay 0.1), a cosine schedule with 2000 warm-up steps that
decays to 10% of the peak, gradient clipping at 1.0, a global batch of 4M tokens and
sequences of 4096 (Table 1: peak LR 3e-4 for 7B and 13B, 1.5e-4 for 34B and 70B). This
script is that recipe at any scale. What you see:
  * the corpus (Shakespeare plus documents about a small invented "toy world" that chapters
    04-07 build their tasks on) tokenized once into flat token files under RUN_DIR/data,
  * a log line per --log-every steps: loss, LR, gradient norm, tokens/s, MFU, ETA; and the
    validation loss, overall and per source,
  * at the end: the validation loss beside the unigram entropy of the data (the loss of a
    model that ignores context), samples (a play, arithmetic, facts of the world), and
    RUN_DIR/pretrain_loss.png (loss against tokens, in the spirit of the paper's Figure 5),
    pretrain.json (metrics) and pretrain.pt (which 02's Transformer.from_pretrained loads).
The training loop, train() below, is the one every later chapter runs.

Run:
  python 01_tokenizer.py && python 03_pretrain.py      # toy model on a 2-core CPU: ~2 minutes
  python 03_pretrain.py --preset 1B --device cuda --dtype bf16 --compile \\
      --batch-tokens 524288 --seq-len 2048 --micro-batch 8 --data my_corpus/*.txt
  torchrun --nproc_per_node=8 03_pretrain.py --preset 7B --fsdp --dtype bf16 \\
      --tokenizer llama-2-7b/tokenizer.model --data my_tokens.bin   # the paper's other numbers are the defaults
  python 03_pretrain.py --preset micro --run-dir runs/micro && \\
      python 03_pretrain.py --compare runs/micro         # two sizes on one figure
"""
import argparse
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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
UserError = tok.UserError

# ------------------------------------------------------------------------------------------
# Defaults: the paper's at full scale (Sec. 2.2, Table 1), and for the CPU presets (micro,
# toy, small) values tuned to fit about two minutes on 2 cores. --help shows both.

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
    # beat 1024 and 4096, and sequences of 128 beat 256 (more steps matter more than context)
    steps=670, batch_tokens=2048, seq_len=128, micro_batch=16,
    # tiny models tolerate, and in a few hundred steps need, a far higher LR than 7B's (toy:
    # 5e-3 measured best of 1e-3 to 5e-3 in this budget)
    lr={"micro": 3e-3, "toy": 5e-3, "small": 1e-3},
    warmup_steps=30, log_every=20, eval_every=70, ckpt_every=140, eval_batches=4)
DEFAULT_MIX = "shakespeare=0.6,world=0.4"
VAL_FRACTION = 0.05   # the last 5% of each source's tokens is its validation split

# ------------------------------------------------------------------------------------------
# The toy world. The paper grades its later stages (SFT, reward models, RLHF, Ghost
# Attention; Sec. 3) with human annotators reading open-ended chat. To show each stage's
# effect on a CPU in minutes, we need tasks whose right answer a program knows. So the
# pretraining mix holds documents about a small invented world: people and towns (facts as
# (subject, relation, value) triples), worked arithmetic, list puzzles, and rules about
# harm. Chapter 04 asks about it in dialogue, 05's annotators grade answers against these
# tables, 06 rewards them, 07 keeps an instruction across turns. All of it follows from a
# seed, and chapters import these functions rather than copy them.

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
# the combination. Each task generator takes `evaluation`: True draws from the evaluation part,
# False from the training part, None (03's own documents) from the whole space. The pretraining
# documents state every fact and sum, held-out ones included: the paper's pretraining data is
# not held out from its evaluations either, and whether fine-tuning brings out what pretraining
# stored is what chapter 04's fact questions test.
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


def act_held_out(world: World, act) -> bool:
    """A harmful act and its benign look-alike are held out together, when a held-out person or
    town is named in them."""
    names = list(world.towns) + [p.name for p in world.people]
    return any(held_out(n) for n in names if n in act[0])


def draw_from_part(draw, rng: random.Random, evaluation):
    """draw(rng) -> (item, key), repeated until held_out_key(key) == evaluation; with evaluation
    None the first draw, from the whole space."""
    for _ in range(MAX_DRAWS):
        item, key = draw(rng)
        if evaluation is None or held_out_key(key) == evaluation:
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
# Data. Each source is tokenized once into two flat token files, NAME.train.bin and
# NAME.val.bin under RUN_DIR/data, every document wrapped in BOS ... EOS as Llama's are. They
# are reused while NAME.json's fingerprint (tokenizer file + inputs) still matches. A training
# sequence is a random window of seq_len + 1 tokens (inputs, and targets shifted by one)
# inside one split, so no window ever straddles train and validation.

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


# The mix. Llama samples each source by a weight: Llama 1 took CommonCrawl 67%, C4 15%,
# GitHub, Wikipedia and Books 4.5% each, ArXiv 2.5%, StackExchange 2% (Llama 2 keeps its mix
# private; it "up-sampled the most factual sources", Sec. 2.1). We draw per sequence.

def parse_mix(text: str, available) -> dict:
    """'shakespeare=0.6,world=0.4' -> {'shakespeare': 0.6, 'world': 0.4}, normalised to sum 1."""
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
    return list(weights)[rng.choice(len(weights), p=list(weights.values()))]


def sequence(data, weights, split: str, seq_len: int, seed: int, step: int, index: int) -> torch.Tensor:
    """Sequence `index` of step `step`: seq_len + 1 tokens, a pure function of the arguments. So
    any rank can draw its share of a global batch, and a resumed run sees the same data."""
    rng = np.random.default_rng([seed, ("train", "val").index(split), step, index])
    tokens = data[pick_source(weights, rng)][split]
    start = int(rng.integers(0, len(tokens) - seq_len))   # start + seq_len + 1 <= len(tokens)
    return torch.from_numpy(tokens[start:start + seq_len + 1].astype(np.int64))


def to_xy(rows, device):
    xy = torch.stack(rows)   # on a GPU: copy from pinned memory while the GPU is busy
    xy = xy.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def lm_loss(model, batch):
    """Next-token cross-entropy; targets of -100 are ignored (chapter 04 masks prompts so)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


def unigram_entropy(data, weights, vocab_size: int) -> float:
    """Entropy (nats) of the mix's token frequencies: the loss of the best model that ignores context."""
    p = sum(w * np.bincount(data[n]["train"], minlength=vocab_size) / len(data[n]["train"])
            for n, w in weights.items())
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------
# The training machinery, which chapters 04-07 import: flags, processes, optimizer,
# schedule, checkpoints, and the loop.

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
    add("--fsdp", action="store_true", help="under torchrun: shard every TransformerBlock (FSDP2), not DDP")
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
    helps = dict(steps="optimizer steps", batch_tokens="global batch in tokens (all ranks and micro-steps)",
                 seq_len="tokens per sequence", micro_batch="sequences per forward, per rank",
                 lr="peak learning rate", warmup_steps="linear warm-up steps", log_every="steps per log line",
                 eval_every="steps between validations", ckpt_every="steps between checkpoints",
                 eval_batches="fixed validation micro-batches (per source), the same on every rank")
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
    return args


def grad_accum_steps(batch_tokens: int, seq_len: int, micro_batch: int, world_size: int) -> int:
    """The global batch is given in tokens (4M in the paper); ranks and micro-steps must tile it."""
    per_micro_step = world_size * micro_batch * seq_len
    if batch_tokens <= 0 or batch_tokens % per_micro_step:
        raise UserError(f"--batch-tokens {batch_tokens} is not a multiple of ranks x micro-batch x seq-len "
                        f"= {world_size} x {micro_batch} x {seq_len} = {per_micro_step}")
    return batch_tokens // per_micro_step


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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed():
    """Leave together: rank 0 still writes files when the others are done, and a gloo rank that
    tears its process group down while a peer is still connected can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def configure_optimizer(model, lr: float, weight_decay: float, betas, eps: float, device):
    """AdamW (Sec. 2.2), weight decay on the linear layers' weight matrices only. Not on the
    RMSNorm gains: they are per-channel scales, and decay would shrink the activations they
    exist to scale. Not on the token embedding: AdamW decays every row at every step, but a
    row only gets gradient when its token occurs, so rare tokens would fade between their
    occurrences. (The paper does not say; GPT-2 decays the embedding, OLMo does not.)"""
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[p.dim() >= 2 and "tok_embeddings" not in name].append(p)
    return torch.optim.AdamW([{"params": groups[True], "weight_decay": weight_decay},
                              {"params": groups[False], "weight_decay": 0.0}],
                             lr=lr, betas=tuple(betas), eps=eps, fused=device.type == "cuda")


def get_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Sec. 2.2: linear warm-up to the peak, then a cosine down to min_ratio (10%) of it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# Dense bf16 peaks (no sparsity) by GPU name, for MFU = achieved model FLOP/s / peak FLOP/s.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("MI300X", 1307e12)]


def peak_flops(device):
    if device.type != "cuda":
        return None   # CPUs vary too much for a table: pass --peak-flops
    return next((peak for key, peak in PEAK_FLOPS if key in torch.cuda.get_device_name(device)), None)


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


def save_checkpoint(path, model, optimizer, cfg, step, history, extra=None):
    """Weights, optimizer moments, config, RNG states and the step, which is also the data
    position (every batch is a function of seed, step, micro-step and rank): all an exact
    resume needs. Collective under FSDP (shards are gathered); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                                  if torch.cuda.is_available() else {})}
        M.save_atomic({"model_args": asdict(model.args), "model": model_state, "optimizer": optim_state,
                       "config": json.loads(json.dumps(vars(cfg), default=str)), "step": step,
                       "history": history, "rng": rng, **(extra or {})}, path)


# The flags a resumed run must share with the run it continues to be exact (the data order, the
# schedule, the optimizer); another value is allowed, with a warning that says so.
EXACT_RESUME = ("seq_len", "micro_batch", "batch_tokens", "world_size", "seed", "steps", "lr", "warmup_steps",
                "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip")


def load_training_state(path, model, optimizer, cfg=None):
    """Restore save_checkpoint's file into model and optimizer; -> (step, history). With cfg,
    warn of every flag in EXACT_RESUME that differs from the checkpoint's run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    ckpt = M.load_checkpoint(path)
    if ckpt.get("model_args") != asdict(model.args):
        theirs, ours = ckpt.get("model_args", {}), model.args
        raise UserError(f"{path} holds another model (preset {ckpt.get('config', {}).get('preset')}: dim "
                        f"{theirs.get('dim')}, {theirs.get('n_layers')} layers, vocab {theirs.get('vocab_size')}) "
                        f"than this one (dim {ours.dim}, {ours.n_layers} layers, vocab {ours.vocab_size}): "
                        "use its --preset and tokenizer, or drop --resume")
    before = ckpt.get("config", {})
    changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (it had {before[k]})" for k in EXACT_RESUME
               if cfg is not None and k in before and getattr(cfg, k, None) != before[k]]
    if changed and not (dist.is_initialized() and dist.get_rank()):
        print(f"warning: resuming {path} with {', '.join(changed)}: training goes on, but no longer exactly "
              "as the interrupted run would have")
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"], ckpt["history"]


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(cfg, model, get_batch, compute_loss, evaluate=None, ckpt_path=None, extra=None):
    """The loop of every chapter. cfg: flags from add_training_args, after resolve_args.
    model: the plain module on its device, with .args (a ModelArgs). get_batch(step,
    micro_step) -> this rank's micro-batch, a pure function of its arguments (that makes
    resume exact). compute_loss(model, batch) -> the micro-batch's mean loss.
    evaluate(model) -> {name: number}, run on every rank (an FSDP forward needs them all).
    extra: more keys for the checkpoint. Returns {"history": [a dict per logged step],
    "tokens_per_s", "train_s", "finished": False if --stop-at cut it off}. The logged loss is the
    mean since the previous log line. A run stopped off a log step still logs and evaluates where it
    stops, in an entry marked "stopped" that keeps the open window's sum; a resumed run takes that
    window back and drops what only the stop added, so its history is the uninterrupted run's."""
    device, world = next(model.parameters()).device, cfg.world_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.fsdp:   # FSDP2: each block's weights, gradients and Adam moments live 1/world per rank
        from torch.distributed.fsdp import fully_shard
        for block in [m for m in model.modules() if isinstance(m, M.TransformerBlock)]:
            fully_shard(block)
        fully_shard(model)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
    step, history = load_training_state(ckpt_path, model, optimizer, cfg) if cfg.resume else (0, [])
    resumed_stop = history.pop().copy() if history and "stopped" in history[-1] else None
    runner = torch.compile(model) if cfg.compile else model   # `model` stays the plain one we save
    ddp = world > 1 and not cfg.fsdp
    if ddp:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device] if device.type == "cuda" else None)
    amp_dtype = M.pick_dtype(cfg.dtype, device)
    if amp_dtype == torch.float16:
        raise UserError("--dtype fp16 would need loss scaling: train in bf16 or fp32")
    # bf16 autocast: matmuls in bf16; weights, optimizer state and reductions stay fp32
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    flops_per_step = M.flops_per_token(model.args, cfg.seq_len) * cfg.batch_tokens
    peak = cfg.peak_flops or peak_flops(device)
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
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last)
                # DDP all-reduces gradients during backward: only the last micro-step needs that
                with runner.no_sync() if ddp and not last else nullcontext():
                    with autocast():
                        loss = compute_loss(runner, get_batch(step, micro)) / cfg.grad_accum   # mean of micro-steps
                    loss.backward()
                loss_since += loss.detach()
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
                if world > 1:   # the mean over ranks (gloo has no AVG)
                    dist.all_reduce(loss_since)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                entry = dict(step=step, tokens=step * cfg.batch_tokens, lr=lr, grad_norm=grad_norm.item(),
                             loss=loss_since.item() / (world * steps_since))   # mean since the last log line
                elapsed = time.time() - t_mark   # .item() above waited for the GPU, so this is honest
                new_steps = steps_since - carried   # steps of this process (a resumed window began before)
                tok_s = new_steps * cfg.batch_tokens / elapsed
                if step - new_steps >= first:   # the first step pays for warm-up and compilation: not averaged
                    timed_s, timed_steps = timed_s + elapsed, timed_steps + new_steps
                mfu = f"{flops_per_step * new_steps / elapsed / (peak * world):.1%}" if peak else "n/a"
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
                save_checkpoint(ckpt_path, model, optimizer, cfg, step, history, extra)
                saved = step
            t_mark += time.time() - t_other
    except KeyboardInterrupt:   # Ctrl-C: say where, and what the run folder holds
        where = (f"{ckpt_path} holds step {saved}: continue with --resume" if ckpt_path and saved else
                 "no checkpoint of this run was written yet: run it again")
        raise KeyboardInterrupt(f"stopped during step {step + 1} of {cfg.steps}; {where}") from None
    return {"history": history, "train_s": timed_s, "finished": step >= cfg.steps,
            "tokens_per_s": timed_steps * cfg.batch_tokens / timed_s if timed_s else None}


# ------------------------------------------------------------------------------------------
# The figure: loss against tokens processed, one colour per run (the paper's Figure 5 has
# one per model size); the training loss thin, the validation loss bold.

def plot_losses(path, runs, entropy=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    for other in args.compare:   # check now, not after the training
        if not (other / "pretrain.json").is_file():
            raise UserError(f"--compare {other}: no pretrain.json there (train a run into it first)")
    rank, world_size, device = setup_distributed(args.device)
    resolve_args(args, world_size)
    check_writable(args.run_dir)
    log = print if rank == 0 else (lambda *a, **k: None)

    # 1. Tokenizer and data. One process tokenizes; the others wait, then map the same files.
    tok_path = args.tokenizer or args.run_dir / "tokenizer.model"
    if not tok_path.is_file():
        raise UserError(f"tokenizer not found: {tok_path} (run 01_tokenizer.py first, or pass --tokenizer)")
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
            m = prepare_source(args.run_dir / "data", name, sources[name], tokenizer, tok_path)
            log(f"data {name}: {m['train_tokens']:,} train + {m['val_tokens']:,} validation tokens, "
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
    model = M.Transformer(model_args).to(device)
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
                         0.9, tokenizer.eos_id, generator)[0]
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
        log(f"\n{speed} tokens/s | wall {fmt_time(time.time() - t_start)} | wrote {ckpt_path}, "
            f"pretrain.json and pretrain_loss.png")
        if not result["finished"]:
            log(f"stopped at step {args.stop_at} of {args.steps} (--stop-at): pretrain.json says finished: "
                "false; continue with --resume")
    end_distributed()
    return metrics


if __name__ == "__main__":
    tok.run_cli(main)
