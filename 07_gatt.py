"""
Chapter 07: Ghost Attention (Llama 2 paper Sec. 3.3, Figures 9 and 10, Table 30).

A system message such as "act as Napoleon" should hold for the whole dialogue, but the RLHF
model forgets it after a few turns (Figure 9, left). Ghost Attention (GAtt) fixes this with
data alone: take a multi-turn dialogue [u1, a1, ..., un, an] and an instruction that should
hold throughout; concatenate the instruction to every user message and let the latest model
sample the answers, which then follow it; build the training sample with the instruction in
the first turn only, and set the loss to zero on every token of the earlier turns, assistant
messages included. The model learns to give the last answer, which follows the instruction,
when the instruction is far back. The file, in order:
 1. that method, as small functions: with_instruction, gatt_example, last_turn_only, gatt_examples;
 2. the toy world's part: the paper's three families of instructions as rules a program can
    check: Public figure ("Always act as the King from now on": the answer opens with the
    speaker label "King:", as in a play), Language ("Always speak like a pirate": then "Arr!"),
    Hobby ("You enjoy music": then "I enjoy music."), one or two combined, half the time in the
    short form ("Figure: King; Hobby: music"); follows() is the annotator;
 3. the loop. Step 1 gives the toy model what the paper's RLHF model already knows: a short SFT
    to follow an instruction in the *current* message (single turns, and dialogues with it in
    every user message; 04's plain dialogues mixed in): "before GAtt". Step 2 is GAtt, on
    dialogues sampled by the step-1 model (the latest model, as in the paper): "after GAtt";
 4. the evaluation: dialogues of 20 turns with the instruction in turn 1 only (a system message)
    and the model's own answers fed back: the share of turns that follow it, by turn (cf. Table
    30, Figure 28); the attention each answer pays to the system message, by layer (cf. Figure
    10); 04's helpfulness and safety table on held-out prompts;
 5. plumbing: the command line, main.
Above 600 lines: the evaluation (Table 30 with a copy control, Figure 10's attention recomputed
from the weights, the held-out check, two figures) is over a third of it.
Outputs in RUN_DIR: gatt.pt (the GAtt model; loads like sft.pt), gatt_before.pt (step 1),
gatt_samples.jsonl (the sampled dialogues), gatt.json, gatt_adherence.png, gatt_attention.png;
gatt_before_2.pt and gatt_samples_2.jsonl (and _3) if step 1 needed another round (--inst-rounds).
The toy context of 512 tokens holds about 10 of our turns: from there on the evaluation drops
the oldest turns after the first, as 04's chat REPL drops old turns, so turn 1 and its
instruction stay in view, ~450 tokens back (the paper's 4096 hold all 20).
What to look at: turn 1 should follow the instruction before GAtt and after; from turn 2 on,
before GAtt, it fades (Figure 9, left). Two evaluations tell reading the instruction from
copying it: fed its own answers, a model can keep a rule by copying its last answer's opening;
given earlier answers that follow no rule (the copy control), only a model that reads the
system message keeps it. GAtt should lift both, the second one being the paper's point. The
attention on the system message as an answer begins should rise after GAtt (Figure 10); 04's
table shows what GAtt costs helpfulness and safety. Measured figures, over seeds, are in
README.md and in report.md.

Run:
  python 07_gatt.py                          # toy, from 06's runs/toy/ppo.pt: ~4 min on a 2-core CPU
  python 07_gatt.py --init runs/toy/sft.pt   # from the SFT model, if 06 has not run
  python 07_gatt.py --init runs/1b/ppo.pt --tokenizer runs/1b/tokenizer.model --preset 1B \\
      --device cuda --dtype bf16 --compile --seq-len 1024 --batch-tokens 65536 --micro-batch 16 \\
      --inst-examples 40000 --inst-steps 60 --dialogues 1024 --steps 40
  torchrun --nproc_per_node=8 07_gatt.py --init runs/7b/ppo.pt --preset 7B --fsdp --dtype bf16 \\
      --activation-checkpointing --sample-batch 8 ...   # fits 8 x 80 GB (add --plan to see)
  python 04_sft.py chat --ckpt runs/toy/gatt.pt --system "Figure: King"   # talk to it
(the big presets take the paper's SFT settings, 64 x 4096 tokens a step and LR 2e-5; the toy
world's dialogues fit in 1024 tokens. Not yet run at those sizes.)
"""
import argparse
import copy
import importlib
import json
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
S = importlib.import_module("04_sft")
UserError = tok.UserError

# The paper gives no hyper-parameters for GAtt, a fine-tuning on synthetic dialogues: we take
# its SFT settings (Sec. 3.1). Toy: rows of 512 tokens, ~10 turns (a longer GAtt sample loses
# middle turns, as the evaluation's dialogues do).
# Step 1 teaches a skill the model lacks, and the skill arrives suddenly (measured from sft.pt):
# at LR 1e-3 it came later than our step budget allows, at 2e-3 within it. What brings it is the
# number of steps more than the tokens: four rows a step beat eight rows at half the steps, and
# two rows at 400 steps beat four at 250 (from one machine's 06 model: at 250 x 4 the step-1
# model named the wrong figure in two answers of three; at 400 x 2 three seeds named the right
# one in 91-100%; README, chapter 07). So step 1 takes 500 steps of two rows (TOY_INST_BATCH_TOKENS), the tokens of 250 x 4.
# GAtt runs at a quarter of the LR (--gatt-lr says why), and it too gains from more, smaller steps:
# 400 of three rows, the tokens of 300 x 4, kept the rule under the copy control at turns 5-20 in
# 92.4-98.6% of turns from three seeds' 06 models, where 300 x 4 gave 89.8-98.8 (B, balanced
# instructions in both; README, chapter 07).
PAPER = {**S.PAPER, "sample_batch": 32}   # dialogues up to the context: a longer KV cache a row than 04's
TOY = dict(batch_tokens=3 * 512, seq_len=512, micro_batch=3, lr=2e-3, warmup_steps=10,
           log_every=25, eval_every=1000, ckpt_every=50, sample_batch=96)   # 96: GAtt's dialogues at once
TOY_INST_BATCH_TOKENS = 2 * 512   # step 1's batch on the CPU presets (the comment above says why)
# Even so, when the skill arrives varies with the seed and the starting model in no simple way (one
# seed of three at 4cf148d: the figure followed in 46% of the sampled answers; no step count, LR or
# data size we tried passed from every model; README, chapter 07). So step 1 is checked, not tuned:
# while fewer than STEP1_FOLLOWING of its GAtt samples' answers follow their instruction, another
# round of --inst-steps steps trains the step-1 model on new dialogues (from that failed model, a
# second round brought the figure to 100%), up to --inst-rounds rounds.
STEP1_FOLLOWING = 0.9
TASK_KINDS = ("arithmetic", "fact", "list")   # short helpful tasks: many turns fit the context
MAX_NEW_TOKENS = 40                            # an answer: up to ~20 tokens, the rules up to ~10 more
PAPER_TABLE30 = {"baseline": {2: 100, 4: 10, 6: 0, 20: 0}, "GAtt": {2: 100, 4: 100, 6: 100, 20: 100}}


# ========================================================================================
# 1. Ghost Attention (Sec. 3.3), as small pure functions in the paper's order. The sampling
#    between with_instruction and gatt_example ("Next, we can sample from this synthetic data
#    using the latest RLHF model") is converse (part 2), called by sample_gatt_dialogs (part 3).

def with_instruction(instruction: str, user: str) -> str:
    """Sec. 3.3: "We can then synthetically concatenate this instruction to all the user messages
    of the conversation." Meta's <<SYS>> block costs 18 tokens a turn; in a 512-token context we
    write the instruction in front of the text instead."""
    return f"{instruction}\n{user}"


def gatt_example(tokenizer, instruction: str, users, answers, max_len: int = None):
    """Sec. 3.3: "Instead of augmenting all context-dialogue turns with the instruction, we can
    drop it in all but the first turn". -> (ids, learn): the dialogue in 04's template with the
    instruction in the first turn only (a system message), and learn True only on the last
    answer's tokens (last_turn_only). A dialogue longer than max_len tokens loses its oldest
    turns after the first, as the evaluation's dialogues do once the context is full: the
    instruction and the supervised last turn always stay."""
    dialog = [{"role": "system", "content": instruction}]
    for user, answer in zip(users, answers):
        dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    while max_len and len(S.encode_dialog(tokenizer, dialog)[0]) > max_len and len(dialog) > 5:
        del dialog[3:5]   # [system, user 1, answer 1] stay, and the last turn
    ids, is_answer = S.encode_dialog(tokenizer, dialog)
    return ids, last_turn_only(ids, is_answer, tokenizer.bos_id)


def last_turn_only(ids, is_answer, bos_id: int):
    """Sec. 3.3: "we simply set the loss to 0 for all the tokens from the previous turns,
    including assistant messages". They were sampled with the instruction in their user message,
    so without it they mismatch their context, which "could hurt the training". ids, is_answer:
    04's encode_dialog -> learn, True only on the last answer's tokens."""
    last_turn = len(ids) - 1 - ids[::-1].index(bos_id)   # every turn opens with BOS
    return [answer and i >= last_turn for i, answer in enumerate(is_answer)]


def gatt_examples(tokenizer, sampled, min_turns: int = 2, plain_history: float = 0.0, max_len: int = None,
                  seed: int = 0):
    """Sec. 3.3: "These steps produce an SFT dataset". Every prefix of a sampled dialogue is
    itself a dialogue whose answers were sampled with the instruction in every message (an
    answer saw only the turns before it), so a dialogue of n turns gives samples of
    min_turns..n turns, one supervised turn each: on a CPU, sampling costs more than training.
    A sample whose last answer breaks the instruction is dropped, as it would teach the opposite
    (our choice: the paper does not say).
    plain_history (our addition, not the paper's): in that share of the samples the earlier
    answers, which carry no loss, are given with their rules stripped (strip_rules). In the
    paper's samples every earlier answer follows the rule, so a small model can learn to copy
    the opening of the last answer instead of reading the instruction: measured with 07's copy
    control, it did, and the rule faded once the earlier answers did not show it."""
    rng, out, dropped = random.Random(seed), [], 0
    for s in sampled:
        for k in range(min_turns, len(s["users"]) + 1):
            if not all(follows(s["rules"], s["answers"][k - 1]).values()):
                dropped += 1
                continue
            answers = s["answers"][:k]
            if rng.random() < plain_history:
                answers = [strip_rules(a) for a in answers[:-1]] + answers[-1:]
            out.append(gatt_example(tokenizer, s["instruction"], s["users"][:k], answers, max_len))
    return out, dropped


# ========================================================================================
# 2. The toy world's part. Instructions (Sec. 3.3): "Hobbies ('You enjoy e.g. Tennis'),
# Language ('Speak in e.g. French'), or Public Figure ('Act as e.g. Napoleon')", randomly
# combined, and half the time made shorter ("Always act as Napoleon from now" -> "Figure:
# Napoleon"). A 2M-parameter model cannot speak French, and a program cannot judge whether it
# sounds like Napoleon; so each family becomes a rule whose trace in the answer a program can
# check. Every value is one token of the toy vocabulary, and only the instruction says which
# one applies: to follow it, the model must look at it. (A first version signed answers "- the
# king" at the end, which the toy model never learned in our budget; a speaker label that opens
# the answer, as in the plays it was pretrained on, it learns. The instruction writes the figure
# as the label does, "King": a lower-case "king" added a change of case to the copy, and the
# figure became the rule it followed least often.)

FIGURES = "King Queen Duke Fool".split()                            # Figure: opens with "King:"
STYLES = {"pirate": "Arr!", "bard": "Hark!", "robot": "Beep!"}   # Language: then its interjection
HOBBIES = "music dance flowers wine".split()                        # Hobby: then "I enjoy music."
FAMILIES = {"language": list(STYLES), "figure": FIGURES, "hobby": HOBBIES}
LONG = {"language": "Always speak like a {}.", "figure": "Always act as the {} from now on.",
        "hobby": "You enjoy {}."}
SHORT = {"language": "Language: {}", "figure": "Figure: {}", "hobby": "Hobby: {}"}


def random_instruction(rng: random.Random, evaluation: bool = False):
    """Sec. 3.3: "we construct the final instruction by randomly combining the above constraints".
    -> (text, rules): one or two families, half the time in the short form. rules: {family:
    value}, what the annotator checks. Combinations of two families are split by 03's
    held_out_pair into a training and an evaluation part (evaluation=True draws from the latter):
    10 of the 40, each value held out with one value of each other family at most. A
    single-family instruction is in both: holding one out would hold out its value, which the
    model would then never have seen (there are only 11)."""
    def draw(rng):   # -> rules, and the places of the two values in their families (03's split)
        families = rng.sample(list(FAMILIES), n_families)
        rules = {f: rng.choice(FAMILIES[f]) for f in sorted(families, key=list(FAMILIES).index)}
        places = [FAMILIES[f].index(v) for f, v in rules.items()]
        return rules, (*places, max(len(FAMILIES[f]) for f in rules))
    n_families = rng.choice((1, 2))
    rules = draw(rng)[0] if n_families == 1 else P.draw_from_part(draw, rng, evaluation, P.held_out_pair)
    return instruction_text(rules, short=rng.random() < 0.5), rules


def instruction_text(rules: dict, short: bool) -> str:
    if short:
        return "; ".join(SHORT[f].format(v) for f, v in rules.items())
    return " ".join(LONG[f].format(v) for f, v in rules.items())


def rule_sets(evaluation: bool = False):
    """-> (singles, pairs): every rule set of one family, and every one of two families in the
    part that `evaluation` names (03's held_out_pair, as random_instruction splits them)."""
    families = list(FAMILIES)
    singles = [{f: v} for f in families for v in FAMILIES[f]]
    pairs = [{f: v, g: w} for a, f in enumerate(families) for g in families[a + 1:]
             for i, v in enumerate(FAMILIES[f]) for j, w in enumerate(FAMILIES[g])
             if P.held_out_pair(i, j, max(len(FAMILIES[f]), len(FAMILIES[g]))) == evaluation]
    return singles, pairs


def balanced_instructions(rng: random.Random, n: int):
    """n instructions of the training part for GAtt's sampled dialogues, as random_instruction
    draws them (half of one family, half of two; half in the short form) but with every rule set
    as often as the others, to one. GAtt's data holds only ~100 instructions, each repeated in a
    sample per turn; drawn at random, 6-10 of the 30 pairs never came in three seeds and a few
    came 4-5 times (a figure might meet no language), and after GAtt the model named, for a
    held-out pair, a figure that its language had come with: "Queen: Arr!" for a pirate King,
    which the step-1 model had answered "King: Arr!" (README, chapter 07)."""
    out = []
    for group, k in zip(rule_sets(), ((n + 1) // 2, n // 2)):
        order = []
        while len(order) < k:   # the whole group in a new order, again and again
            order += rng.sample(group, len(group))
        out += order[:k]
    rng.shuffle(out)
    return [(instruction_text(rules, short=rng.random() < 0.5), rules) for rules in out]


def apply_rules(rules: dict, answer: str) -> str:
    """A plain answer rewritten to follow the rules: the reference answers of step 1."""
    opening = [f"{rules['figure'].capitalize()}:"] if "figure" in rules else []   # a speaker, as in a play
    opening += [STYLES[rules["language"]]] if "language" in rules else []
    opening += [f"I enjoy {rules['hobby']}."] if "hobby" in rules else []
    return " ".join(opening + [answer])


SPEAKER = r"^(?:[A-Z]\w*: )?"   # an optional speaker label at the start


def follows(rules: dict, answer: str) -> dict:
    """The annotator: {family: does the answer follow that rule}."""
    answer = answer.strip()
    checks = {"figure": lambda v: answer.startswith(f"{v.capitalize()}:"),
              "language": lambda v: re.match(SPEAKER + re.escape(STYLES[v]), answer) is not None,
              "hobby": lambda v: re.search(rf"\b{v}\b", answer, re.IGNORECASE) is not None}
    return {f: checks[f](v) for f, v in rules.items()}


def strip_rules(answer: str) -> str:
    """The plain answer inside a rule-following one, for 04's gold score."""
    styles = "|".join(map(re.escape, STYLES.values()))
    return re.sub(SPEAKER + rf"(?:(?:{styles}) )?(?:I enjoy \w+\. )?", "", answer.strip() + " ", count=1).strip()


# ----------------------------------------------------------------------------------------
# Step 1's dialogues: follow an instruction that is in the current message. The paper's RLHF
# model can; ours has never seen one. Reference answers are 04's, rewritten by apply_rules:
# annotators' answers, in the paper's terms. 04's plain dialogues are mixed in so it keeps its
# manners.

def task_turn(world, rng, evaluation=False):
    return S.make_task(world, rng.choice(TASK_KINDS), rng, evaluation)


def instruction_dialogs(world, n: int, seed: int, plain_share: float = 0.3, max_turns: int = 8):
    """n step-1 dialogues: plain_share of them 04's, with no instruction; of the rest, a third
    single turns with the instruction as a system message, a third single turns with it
    concatenated to the user message, a third 2 to max_turns turns with it concatenated to
    every user message (the form GAtt samples in). A system message in turn 1 of a longer
    dialogue never occurs: that is what GAtt adds."""
    rng = random.Random(seed)
    n_plain = round(n * plain_share)
    dialogs = S.sft_dialogs(world, n_plain, seed, careless_share=0.0)   # 06 removed the careless tail
    for i in range(n - n_plain):
        text, rules = random_instruction(rng)
        form = i % 3
        dialog = [{"role": "system", "content": text}] if form == 0 else []
        for _ in range(1 if form < 2 else rng.randint(2, max_turns)):
            task = task_turn(world, rng)
            dialog += [{"role": "user", "content": task.prompt if form == 0 else with_instruction(text, task.prompt)},
                       {"role": "assistant", "content": apply_rules(rules, task.answer)}]
        dialogs.append(dialog)
    rng.shuffle(dialogs)
    return dialogs


# ----------------------------------------------------------------------------------------
# Talking to the model: batched, turn by turn, its own answers fed back. If a dialogue no
# longer fits the context, the oldest turns after the first go (the first holds the
# instruction); 04's REPL drops turns the same way, keeping the system message.

def fit(tokenizer, dialog, budget: int):
    """The dialogue (ending with the user's turn) cut to at most `budget` tokens."""
    dialog = list(dialog)
    first = 3 if dialog[0]["role"] == "system" else 2   # messages of turn 1, its answer included
    while len(S.encode_dialog(tokenizer, dialog)[0]) > budget and len(dialog) > first + 1:
        del dialog[first:first + 2]
    return dialog


def converse(model, tokenizer, instructions, users, every_turn: bool, temperature=0.0, generator=None,
             max_new_tokens=MAX_NEW_TOKENS, batch_size=32, compile=False, written=None):
    """The model answers users[i][t] turn by turn -> (dialogues, whole; the model's answers,
    per dialogue). every_turn=False: the instruction is a system message in turn 1 only (the
    evaluation); True: it is concatenated to every user message (the GAtt sampling of Sec. 3.3).
    written: per dialogue, the answers written back into it in place of the model's own (the copy
    control below). compile: 02's compiled decoding step (--compile-decode)."""
    was_training = model.training
    model.eval()
    dialogs = [[] if every_turn else [{"role": "system", "content": inst}] for inst in instructions]
    answers = [[] for _ in dialogs]
    budget = model.args.max_seq_len - max_new_tokens
    for first in range(0, len(dialogs), batch_size):   # a batch of dialogues, turn by turn
        batch = range(first, min(first + batch_size, len(dialogs)))
        # each turn's prompt is the dialogue so far; 02's Session keeps the KV cache from the turn
        # before, so only the new turn (and what changed, e.g. turns dropped by fit) is read again
        with M.Session() as session:
            active = list(batch)
            for t in range(max(len(users[i]) for i in batch)):
                still = [j for j, i in enumerate(active) if t < len(users[i])]
                if len(still) < len(active):
                    session.keep(still)
                    active = [active[j] for j in still]
                for i in active:
                    user = with_instruction(instructions[i], users[i][t]) if every_turn else users[i][t]
                    dialogs[i].append({"role": "user", "content": user})
                prompts = [S.encode_dialog(tokenizer, fit(tokenizer, dialogs[i], budget))[0] for i in active]
                outs = M.generate(model, prompts, max_new_tokens, temperature, 0.9, tokenizer.eos_id, generator,
                                  compile, session=session)
                for i, out in zip(active, outs):
                    answers[i].append(tokenizer.decode(out).strip())
                    dialogs[i].append({"role": "assistant", "content": written[i][t] if written else answers[i][t]})
    model.train(was_training)
    return dialogs, answers


# ========================================================================================
# 3. The loop: step 1 and step 2 are 04's SFT through 03's loop (train_step); between them, the
#    step-1 model samples GAtt's dialogues and gatt_examples rebuilds them (gatt_data).

def sample_gatt_dialogs(model, tokenizer, world, n: int, turns: int, seed: int, temperature: float,
                        compile=False, batch_size: int = 32, part=(0, 1)):
    """Sec. 3.3: "Next, we can sample from this synthetic data using the latest RLHF model." n
    dialogues of `turns` turns, the instruction concatenated to every user message, each answer
    sampled by `model` (the step-1 model). part=(rank, ranks): every rank draws the same n
    dialogues and samples its share, rank, rank + ranks, ..., with its own random numbers."""
    rng = random.Random(seed)
    instructions = balanced_instructions(rng, n)
    users = [[task_turn(world, rng).prompt for _ in range(turns)] for _ in range(n)]
    rank, ranks = part
    mine = range(rank, n, ranks)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + rank)
    _, answers = converse(model, tokenizer, [instructions[i][0] for i in mine], [users[i] for i in mine], True,
                          temperature, generator, batch_size=batch_size, compile=compile)
    return [dict(instruction=instructions[i][0], rules=instructions[i][1], users=users[i], answers=a)
            for i, a in zip(mine, answers)]


def train_step(args, name: str, examples, init, steps: int, lr: float, ckpt_path, rank, device, tokenizer, log,
               batch_tokens: int = None):
    """03's loop, through 04's run_sft: examples [(ids, learn)] packed into rows, the loss only
    where learn is True. 2% of the examples measure the held-out loss. batch_tokens: a batch of
    its own (default --batch-tokens), in micro-batches of at most --micro-batch rows."""
    cfg = copy.copy(args)
    cfg.steps, cfg.lr = steps, lr
    if batch_tokens and batch_tokens != args.batch_tokens:
        cfg.batch_tokens = batch_tokens
        cfg.micro_batch = max(1, min(args.micro_batch, batch_tokens // (args.seq_len * args.world_size)))
        cfg.grad_accum = P.grad_accum_steps(batch_tokens, args.seq_len, cfg.micro_batch, args.world_size)
    cfg.resume = cfg.resume and P.checkpoint_exists(ckpt_path, cfg)   # cut off before this step began: start it
    n_val = max(1, len(examples) // 50)
    # 04's padding: pack gives it no target and a dialogue of its own (-1), so no loss and no real
    # token reads its id. 06's rollouts pad with an id other than EOS: there `tokens != pad_id` marks
    # the real tokens.
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    rows, val_rows = S.pack(examples[n_val:], args.seq_len, pad_id), S.pack(examples[:n_val], args.seq_len, pad_id)
    n_learn = int((rows[1] != S.IGNORE).sum())
    log(f"\n== {name}: {len(examples):,} examples -> {len(rows[0]):,} rows of {args.seq_len} tokens, "
        f"{n_learn / rows[1].numel():.1%} of positions carry loss | {steps} steps of {cfg.batch_tokens:,} tokens | "
        f"peak LR {cfg.lr:g} ==")
    # in host memory under --fsdp: train() shards it onto the devices
    model = M.Transformer.from_pretrained(init, device=P.build_device(args, device)).train()
    if model.args.vocab_size != tokenizer.n_words:
        raise UserError(f"{init} has a vocabulary of {model.args.vocab_size}, the tokenizer {tokenizer.n_words}")
    return S.run_sft(cfg, model, rows, val_rows, ckpt_path, rank, device)


def gatt_data(args, world, tokenizer, before_path, rank, world_size, device, log, round_: int = 1,
              final: bool = True):
    """Step 2's data: the step-1 model samples --dialogues dialogues with the instruction in
    every user message (each rank its share; rank 0 writes gatt_samples.jsonl, in the dialogues'
    order, gatt_samples_{round}.jsonl after a later round of step 1; a resumed run reads it back);
    gatt_examples turns them into samples, and step-1 dialogues are replayed beside them
    (--replay). final=False: no error if no answer follows (another round of step 1 comes).
    -> (sampled, examples shuffled, n_replay, the data's counts for gatt.json)"""
    t0 = time.time()
    samples_path = args.run_dir / ("gatt_samples.jsonl" if round_ == 1 else f"gatt_samples_{round_}.jsonl")
    if world_size > 1:   # rank 0 wrote the step-1 model: every rank reads it next
        dist.barrier()
    if not (args.resume and samples_path.is_file()):
        log(f"\nsampling {args.dialogues} dialogues of {args.train_turns} turns from {before_path} "
            f"(temperature {args.temperature}), the instruction concatenated to every user message"
            + (f", {world_size} ranks a share each" if world_size > 1 else "") + " ...")
        # the sampler computes in the compute dtype (bf16 on a GPU: half the weights, a bf16 KV cache)
        sampler = M.Transformer.from_pretrained(before_path, device=device, dtype=M.pick_dtype(args.dtype, device))
        sampled = sample_gatt_dialogs(sampler, tokenizer, world, args.dialogues, args.train_turns, args.seed,
                                      args.temperature, args.compile_decode, args.sample_batch, (rank, world_size))
        if args.rules_by_program:   # a model that follows nothing (the pipeline's micro smoke run)
            for s in sampled:
                s["answers"] = [apply_rules(s["rules"], a) for a in s["answers"]]
        if world_size > 1:   # the shares back in the dialogues' order: dialogue i came from rank i % ranks
            sampled = P.gather_shares(sampled, args.dialogues)
        if rank == 0:
            tok.atomic_write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sampled))
        del sampler
    if world_size > 1:
        dist.barrier()
    sampled = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").split("\n") if line]
    examples, dropped = gatt_examples(tokenizer, sampled, plain_history=args.plain_history, max_len=args.seq_len + 1,
                                      seed=args.seed)
    if not examples and final:
        raise UserError(f"no sampled answer after turn 1 follows its instruction: step 1 did not teach the rules "
                        f"({before_path}; raise --inst-steps, --inst-rounds or --lr)")
    n_replay = round(len(examples) * args.replay / (1 - args.replay)) if examples else 0
    examples += [S.encode_dialog(tokenizer, d) for d in instruction_dialogs(world, n_replay, args.seed + 1)]
    n_followed = sum(all(follows(s["rules"], a).values()) for s in sampled for a in s["answers"])
    n_answers = sum(len(s["answers"]) for s in sampled)
    log(f"GAtt data: {len(sampled)} dialogues, {n_followed / n_answers:.1%} of the sampled answers follow the "
        f"instruction; {len(examples) - n_replay:,} samples of 2-{args.train_turns} turns ({dropped} dropped: the "
        f"last answer broke the instruction) + {n_replay:,} step-1 dialogues replayed, in {time.time() - t0:.0f}s")
    random.Random(args.seed).shuffle(examples)
    return sampled, examples, n_replay, dict(dialogues=len(sampled), samples=len(examples), dropped=dropped,
                                             answers_following=n_followed / n_answers)


# ========================================================================================
# 4. Evaluation and figures.

def mean(xs):
    return sum(xs) / max(len(xs), 1)


# ----------------------------------------------------------------------------------------
# Evaluation 1: multi-turn adherence (Table 30, Figure 28). The instruction is a system
# message in turn 1 only, the user's messages are held-out toy tasks, the model's answers are
# fed back; at each turn the annotator says whether the answer follows every rule. A dialogue's
# script is (instruction, rules, tasks): the user's side, the model answering.

def eval_dialogs(world, n: int, turns: int, seed: int):
    """n scripts [(instruction, rules, tasks)]: instructions and tasks from 03's evaluation part."""
    rng = random.Random(seed + 7_000_003)
    out = []
    for _ in range(n):
        text, rules = random_instruction(rng, evaluation=True)
        out.append((text, rules, [task_turn(world, rng, evaluation=True) for _ in range(turns)]))
    return out


def play(model, tokenizer, scripts, compile, batch_size, part, written=None):
    """converse on the scripts (eval_dialogs), the instruction as the system message. part=(rank,
    ranks): each rank plays its share (script i on rank i % ranks), all get every dialogue back.
    -> (dialogues, the model's answers)"""
    rank, ranks = part
    mine = range(rank, len(scripts), ranks)
    talks, answers = converse(model, tokenizer, [scripts[i][0] for i in mine],
                              [[t.prompt for t in scripts[i][2]] for i in mine], False, batch_size=batch_size,
                              compile=compile, written=[written[i] for i in mine] if written else None)
    if ranks > 1:
        talks, answers = zip(*P.gather_shares(list(zip(talks, answers)), len(scripts)))
    return list(talks), list(answers)


def adherence(model, tokenizer, scripts, compile=False, batch_size: int = 32, part=(0, 1)) -> dict:
    """The model plays each script (eval_dialogs) -> share of dialogues following the instruction
    at each turn (all rules, and per family), the gold score of the answers' plain part, the
    first turn at which some dialogue had to drop turns to fit the context, and examples.
    part: as play's (every rank then returns the same)."""
    talks, answers = play(model, tokenizer, scripts, compile, batch_size, part)
    turns = len(scripts[0][2])
    budget = model.args.max_seq_len - MAX_NEW_TOKENS   # the prompt of turn t is talk[:2 + 2t]
    window_from = next((t + 1 for t in range(turns)
                        if any(len(S.encode_dialog(tokenizer, talk[:2 + 2 * t])[0]) > budget for talk in talks)), None)
    checks = [[follows(rules, a[t]) for t in range(turns)] for (_, rules, _), a in zip(scripts, answers)]
    by_family = {f: [mean([c[t][f] for c in checks if f in c[t]]) for t in range(turns)] for f in FAMILIES}
    followed = [[all(c[t].values()) for t in range(turns)] for c in checks]   # per dialogue: for intervals
    return {"by_turn": [mean([f[t] for f in followed]) for t in range(turns)], "followed": followed,
            "by_family": by_family, "window_from": window_from,
            "gold": mean([S.gold_score(task, strip_rules(a[t])) for (_, _, tasks), a in zip(scripts, answers)
                          for t, task in enumerate(tasks)]),
            "examples": [{"instruction": sc[0], "turns": [[task.prompt, a] for task, a in zip(sc[2], answers[i])]}
                         for i, sc in enumerate(scripts[:3])]}


def adherence_given_plain_history(model, tokenizer, scripts, compile=False, batch_size: int = 32,
                                  part=(0, 1)) -> dict:
    """The copy control. Fed its own answers, a model that followed the rule in turn 1 can keep
    following it by copying the opening of its last answer, without reading the instruction
    again: the free-running test above cannot tell the two apart. Here the earlier turns hold the
    reference answers as 04 wrote them, which follow no rule (teacher-forced), and each turn is
    answered once: an answer that follows the rule at turn t read it in the system message, ~t
    turns back. -> the share following it by turn, and per dialogue (for intervals)."""
    _, answers = play(model, tokenizer, scripts, compile, batch_size, part,
                      written=[[t.answer for t in sc[2]] for sc in scripts])
    turns = len(scripts[0][2])
    followed = [[all(follows(rules, a[t]).values()) for t in range(turns)]
                for (_, rules, _), a in zip(scripts, answers)]
    return {"by_turn": [mean([f[t] for f in followed]) for t in range(turns)], "followed": followed}


# ----------------------------------------------------------------------------------------
# Evaluation 2: attention maps (Figure 10). 02's Attention does not hand out its softmax (it
# calls SDPA), so we recompute each layer's attention probabilities from the layer's own
# weights, exactly as it computes them: RMSNorm, wq/wk, RoPE, repeat_kv, softmax(q k^T / sqrt(d))
# under the causal mask. A test checks that these probabilities reproduce the layer's output.

def layer_attention(layer, h, freqs_cis):
    """The attention probabilities (batch, heads, seq, seq) of a TransformerBlock whose input
    is the residual stream h (batch, seq, dim), with a causal mask."""
    a = layer.attention
    bsz, seqlen, _ = h.shape
    x = layer.attention_norm(h)
    q = M.apply_rotary_emb(a.wq(x).view(bsz, seqlen, a.n_heads, a.head_dim), freqs_cis)
    k = M.apply_rotary_emb(a.wk(x).view(bsz, seqlen, a.n_kv_heads, a.head_dim), freqs_cis)
    q, k = q.transpose(1, 2), M.repeat_kv(k, a.n_rep).transpose(1, 2)   # (bsz, heads, seq, head_dim)
    scores = q @ k.transpose(-2, -1) / math.sqrt(a.head_dim)
    scores = scores.masked_fill(~M.causal_mask(seqlen, 0, h.device), float("-inf"))
    return F.softmax(scores.float(), dim=-1)


@torch.no_grad()
def attention_maps(model, tokens, reduce=None):
    """tokens (batch, seq) -> [per layer: attention probabilities (batch, heads, seq, seq)], or
    reduce(probabilities) per layer: then one layer's map at a time is alive (at 7B and 4,096
    tokens a layer's is 2.1 GB, all 32 of them 69 GB)."""
    h = model.tok_embeddings(tokens)
    freqs_cis = model.freqs_cis[:, :tokens.shape[1]].to(tokens.device)
    maps = []
    for layer in model.layers:
        probs = layer_attention(layer, h, freqs_cis)
        maps.append(probs if reduce is None else reduce(probs))
        h = layer(h, 0, freqs_cis, None)   # 02's own forward carries the residual stream on
    return maps


def system_span(tokenizer, instruction: str):
    """Positions [start, end) of the system block "<<SYS>>...<</SYS>>" in a dialogue's ids.
    The newlines around it are byte pieces, which BPE never merges with a neighbour, so the
    prefixes' ids are prefixes of the dialogue's."""
    start = len(tokenizer.encode(S.B_INST, bos=True, eos=False))
    return start, len(tokenizer.encode(f"{S.B_INST} {S.B_SYS}{instruction}{S.E_SYS}", bos=True, eos=False))


def system_attention(model, tokenizer, dialogs):
    """-> (layers x turns) list: the attention that each turn pays to the system message's
    tokens, at the position that predicts the answer's first token (where our rules act: they
    open the answer), in the most attentive head of each layer (Figure 10 shows the maximum
    "across the network"), averaged over dialogues (one alone is noisy). The first message
    is the system message, which 04's template folds into the first user turn."""
    device, per_dialog = next(model.parameters()).device, []
    for dialog in dialogs:
        ids, is_answer = S.encode_dialog(tokenizer, dialog)
        sys_start, sys_end = system_span(tokenizer, dialog[0]["content"])
        opens = [i - 1 for i in range(1, len(ids)) if is_answer[i] and not is_answer[i - 1]]   # one a turn
        per_layer = attention_maps(model.eval(), torch.tensor([ids], device=device),
                                   reduce=lambda p: p[0, :, opens, sys_start:sys_end].sum(-1).amax(0).float().cpu())
        per_dialog.append(torch.stack(per_layer))
    turns = max(m.shape[1] for m in per_dialog)   # dialogues differ in length: average what each has
    total = sum(F.pad(m, (0, turns - m.shape[1])) for m in per_dialog)
    count = sum(F.pad(torch.ones(m.shape[1]), (0, turns - m.shape[1])) for m in per_dialog)
    return (total / count).tolist()


def attention_dialogs(tokenizer, world, n: int, seed: int, max_len: int):
    """n long dialogues whose answers follow their instruction, the same tokens for every model,
    each with as many turns as fit in max_len tokens, from 03's evaluation part."""
    rng, dialogs = random.Random(seed + 9_000_011), []
    for _ in range(n):
        text, rules = random_instruction(rng, evaluation=True)
        dialog = [{"role": "system", "content": text}]
        while True:
            task = task_turn(world, rng, evaluation=True)
            turn = [{"role": "user", "content": task.prompt},
                    {"role": "assistant", "content": apply_rules(rules, task.answer)}]
            if len(S.encode_dialog(tokenizer, dialog + turn)[0]) > max_len:
                break
            dialog += turn
        dialogs.append(dialog)
    return dialogs


# ----------------------------------------------------------------------------------------
# Held out by construction: the evaluations above ask only what 03's evaluation part holds,
# and gatt.json records 04's overlap of their prompts with the training dialogues'.

def prompt_texts(dialogs) -> list:
    """What dialogues ask: their system and user messages, an instruction concatenated to a
    user message (with_instruction) split off from the task, since each also occurs alone."""
    return [part for d in dialogs for m in d if m["role"] != "assistant" for part in m["content"].split("\n")]


def step1_seed(seed: int, round_: int) -> int:
    """The seed of step 1's dialogues in a round: new dialogues each round (the replay takes seed + 1)."""
    return seed if round_ == 1 else seed + 1000 * round_


def training_texts(world, args, sampled, n_replay: int, rounds: int = 1) -> list:
    """The prompt texts of everything 07 trains on, drawn again as main() draws them: step 1's
    dialogues (of every round), the GAtt samples (the instruction and the user's messages) and
    the replayed step-1 dialogues."""
    dialogs = [d for r in range(1, rounds + 1) for d in instruction_dialogs(world, args.inst_examples,
                                                                            step1_seed(args.seed, r))]
    dialogs += instruction_dialogs(world, n_replay, args.seed + 1)
    dialogs += [[{"role": "system", "content": s["instruction"]}] + [{"role": "user", "content": u} for u in s["users"]]
                for s in sampled]
    return prompt_texts(dialogs)


def evaluation_texts(scripts, long_dialogs, tasks) -> list:
    """The held-out prompt texts: the tasks of the adherence scripts, the attention dialogues
    and 04's table, and the adherence scripts' instructions that combine two families (one
    family alone is in both parts, see random_instruction)."""
    return ([task.prompt for sc in scripts for task in sc[2]] + S.user_messages(long_dialogs)
            + [task.prompt for task in tasks] + [text for text, rules, _ in scripts if len(rules) == 2])


# ----------------------------------------------------------------------------------------
# The evaluations of a run, its tables and figures.

def evaluate(args, world, tokenizer, init, before_path, gatt_path, device, log, timings, part=(0, 1)):
    """With the models as saved, whole on every rank: adherence by turn, own answers and the copy
    control (Table 30); the attention on the system message (Figure 10); 04's table for the start
    model, before and after GAtt. part=(rank, ranks): each rank plays and answers its share, and
    all get the same results. -> (adherence, attention, chat, scripts, long_dialogs, tasks)"""
    t0 = time.time()
    dtype = M.pick_dtype(args.dtype, device)   # evaluated in the compute dtype, as they were sampled
    models = {"before GAtt": M.Transformer.from_pretrained(before_path, device=device, dtype=dtype),
              "after GAtt": M.Transformer.from_pretrained(gatt_path, device=device, dtype=dtype)}
    scripts = eval_dialogs(world, args.eval_dialogues, args.eval_turns, args.seed)
    adh = {}
    for name, model in models.items():
        adh[name] = adherence(model, tokenizer, scripts, args.compile_decode, args.sample_batch, part)
        adh[name]["control"] = adherence_given_plain_history(model, tokenizer, scripts, args.compile_decode,
                                                             args.sample_batch, part)
        log(f"{name}: turns following the instruction, by turn: "
            + " ".join(f"{100 * x:.0f}" for x in adh[name]["by_turn"]) + f" (%) | gold of the plain part "
            f"{adh[name]['gold']:.3f}\n{'':>{len(name) + 2}}the same, earlier answers given plain (copy control): "
            + " ".join(f"{100 * x:.0f}" for x in adh[name]["control"]["by_turn"]))
    timings["adherence_s"] = time.time() - t0
    t0 = time.time()
    long_dialogs = attention_dialogs(tokenizer, world, args.attention_dialogues, args.seed,
                                     models["after GAtt"].args.max_seq_len)
    attention = {name: system_attention(model, tokenizer, long_dialogs) for name, model in models.items()}
    tasks = S.eval_tasks(world, args.eval_per_kind, args.seed)
    models = {"start (--init)": M.Transformer.from_pretrained(init, device=device, dtype=dtype), **models}
    chat = {name: S.evaluate_chat(model, tokenizer, tasks, compile=args.compile_decode, batch_size=args.sample_batch,
                                  part=part) for name, model in models.items()}
    if part[0] == 0:
        S.print_table(chat)
    timings["chat_eval_s"] = time.time() - t0
    return adh, attention, chat, scripts, long_dialogs, tasks


def report(args, adh, attention, chat, long_dialogs, timings, log) -> dict:
    """Table 30 beside the paper's, the attention by layer, the two figures. -> the results
    main() returns and gatt.json holds."""
    summary = {name: {"turn_1": r["by_turn"][0], "turns_2_4": mean(r["by_turn"][1:4]),
                      "turns_5_on": mean(r["by_turn"][4:]), "gold_plain_part": r["gold"],
                      "control_turn_1": r["control"]["by_turn"][0],
                      "control_turns_5_on": mean(r["control"]["by_turn"][4:])}
               for name, r in adh.items()}
    log("\nturns following the instruction (%), cf. Table 30:\n" + f"{'':<22}" +
        "".join(f"{'turn ' + str(t):>9}" for t in PAPER_TABLE30["GAtt"] if t <= args.eval_turns) +
        f"{'turns 5+':>10}{'5+, control':>13}")
    for (name, r), paper in zip(adh.items(), PAPER_TABLE30.values()):
        log(f"{name:<22}" + "".join(f"{100 * r['by_turn'][t - 1]:>9.0f}" for t in paper if t <= args.eval_turns)
            + f"{100 * summary[name]['turns_5_on']:>10.1f}{100 * summary[name]['control_turns_5_on']:>13.1f}")
        log(f"{'  (paper)':<22}" + "".join(f"{v:>9}" for t, v in paper.items() if t <= args.eval_turns))
    for name, by_layer in attention.items():
        log(f"attention on the system message as the answer begins, turns 2-{len(by_layer[0])} by layer "
            f"({name}): " + " ".join(f"{mean(row[1:]):.3f}" for row in by_layer))
    plot_adherence(args.run_dir / "gatt_adherence.png", adh)
    plot_attention(args.run_dir / "gatt_attention.png", attention, len(long_dialogs))
    return dict(summary=summary, adherence=adh, chat=chat, timings=timings,
                attention=dict(by_layer_and_turn=attention, example_dialog=long_dialogs[0]))


def plot_adherence(path, results: dict):
    plt = P.pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 4.2))
    turns = range(1, len(next(iter(results.values()))["by_turn"]) + 1)
    for i, (name, r) in enumerate(results.items()):
        ax.plot(turns, [100 * x for x in r["by_turn"]], marker="o", ms=3, color=f"C{i}", label=f"{name}, own answers")
        if "control" in r:
            ax.plot(turns, [100 * x for x in r["control"]["by_turn"]], ls="--", marker="s", ms=3, color=f"C{i}",
                    label=f"{name}, earlier answers plain (copy control)")
    window = min((r["window_from"] for r in results.values() if r["window_from"]), default=None)
    if window:
        ax.axvspan(window - 0.5, turns[-1] + 0.5, color="grey", alpha=0.12,
                   label="context full: the oldest turns after turn 1 are dropped")
    for i, (name, points) in enumerate(PAPER_TABLE30.items()):
        ax.scatter(list(points), list(points.values()), marker="x", s=50, color=f"C{i}",
                   label=f"paper, Table 30: {name}")
    ax.set(xlabel="turn (the instruction is in turn 1 only)", ylabel="turns following the instruction (%)",
           ylim=(-5, 105), title="Multi-turn adherence before and after GAtt (cf. Figure 28, Table 30)")
    ax.set_xticks(turns)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))   # outside: curves fill the box
    P.save_figure(plt, fig, path)


def plot_attention(path, maps: dict, n_dialogs: int):
    plt = P.pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.8 * len(maps) + 1, 3.8), squeeze=False, layout="constrained")
    for ax, (name, m) in zip(axes[0], maps.items()):
        image = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
        ax.set(title=name, xlabel="turn (answers that follow the instruction, given)", ylabel="layer")
        ax.set_xticks(range(len(m[0])), range(1, len(m[0]) + 1))
        ax.set_yticks(range(len(m)), range(1, len(m) + 1))
    fig.colorbar(image, ax=axes[0].tolist(), label="attention on the system message\n(most attentive head)")
    fig.suptitle(f"Attention paid to the system message as each answer begins, mean of {n_dialogs} dialogues "
                 "(cf. Figure 10)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ========================================================================================
# 5. Plumbing: the command line, the checks on it, and main, which runs the phases in order:
#    step 1, the GAtt data, step 2, the evaluations.

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    P.add_training_args(parser, PAPER, TOY)
    add = parser.add_argument
    add("--init", help="the RLHF model to start from (default RUN_DIR/ppo.pt, 06's final policy)")
    add("--tokenizer", type=Path, help="SentencePiece model (default RUN_DIR/tokenizer.model)")
    add("--inst-examples", type=int, default=4000,
        help="step 1: dialogues, 70%% with an instruction in the current message, 30%% 04's (default 4000)")
    add("--inst-steps", type=int, default=500,
        help="step 1: optimizer steps (default 500: with fewer, a seed's step-1 model followed its instruction in "
             "too few of its sampled answers, and GAtt, trained on the rest, learned to copy)")
    add("--inst-rounds", type=tok.number_flag("--inst-rounds", at_least=1), default=3,
        help=f"step 1: at most this many rounds of --inst-steps; another, on new dialogues, while fewer than "
             f"{STEP1_FOLLOWING:.0%} of the step-1 model's sampled GAtt answers follow their instruction (default 3)")
    add("--inst-batch-tokens", type=tok.number_flag("--inst-batch-tokens", at_least=1),
        help=f"step 1: tokens a step (default {TOY_INST_BATCH_TOKENS} on the CPU presets: more, smaller steps "
             "taught the toy model the rules more reliably; --batch-tokens at full scale)")
    add("--dialogues", type=int, default=96,
        help="GAtt: dialogues to sample; each gives a sample per turn from the second (default 96: once step 1 "
             "teaches the rules, nearly every sampled answer follows them and none is dropped)")
    add("--train-turns", type=int, default=20,
        help="GAtt: turns per sampled dialogue (default 20, as many as the evaluation: trained on fewer "
             "turns, the toy model kept the rule as far as it was trained and often lost it beyond)")
    add("--steps", type=int, default=400, help="GAtt: optimizer steps (default 400)")
    add("--gatt-lr", type=float, help="GAtt: peak learning rate (default --lr / 4: step 1 teaches a new skill, "
                                      "GAtt only adjusts one, and a higher rate erodes what 06 taught)")
    add("--replay", type=float, default=0.5,
        help="GAtt: share of step-1 dialogues mixed into its data (default 0.5; not in the paper: without "
             "them the toy model, tuned on a few hundred samples, loses much of 06's helpfulness and safety)")
    add("--temperature", type=float, default=0.7, help="GAtt: temperature of the sampled answers (default 0.7)")
    add("--plain-history", type=float, default=0.75,
        help="GAtt: share of samples whose earlier answers are given plain, the rules stripped (default 0.75; not "
             "in the paper: without it the toy model learns to copy its last answer rather than read the "
             "instruction, see the copy control)")
    add("--eval-dialogues", type=int, default=32, help="adherence: dialogues per model (default 32)")
    add("--eval-turns", type=int, default=20, help="adherence: turns per dialogue (default and paper: 20)")
    add("--attention-dialogues", type=int, default=16,
        help="attention maps: long dialogues to average over (default 16)")
    add("--eval-per-kind", type=int, default=40,
        help="helpfulness and safety (04's table): held-out prompts per task kind (default 40)")
    add("--world-seed", type=int, default=0, help="seed of 03's toy world (default 0)")
    add("--rules-by-program", action="store_true", help="rewrite the sampled answers to follow their rules "
        "(only to test the plumbing with an untrained model; the paper samples the latest model's answers)")
    return parser.parse_args(argv)


def input_paths(args, log):
    """-> (tokenizer path, the start model's path), each checked to exist, and the flags checked."""
    for flag in ("inst_examples", "inst_steps", "dialogues", "train_turns", "steps", "eval_dialogues",
                 "eval_turns", "attention_dialogues", "eval_per_kind"):
        if getattr(args, flag) < (2 if flag == "train_turns" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be at least {2 if flag == 'train_turns' else 1}")
    if args.inst_batch_tokens % (args.seq_len * args.world_size):
        raise UserError(f"--inst-batch-tokens {args.inst_batch_tokens} is not a multiple of ranks x seq-len = "
                        f"{args.world_size} x {args.seq_len}")
    if not 0 <= args.plain_history <= 1:
        raise UserError(f"--plain-history {args.plain_history} must be in [0, 1]: a share of the GAtt samples")
    if not 0 <= args.replay < 1:
        raise UserError(f"--replay {args.replay} must be in [0, 1): the share of replayed dialogues")
    return P.find_tokenizer(args), S.find_start(args, "ppo.pt", "RLHF model", "06_rs_ppo.py", log)


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    if args.plan:   # 03's planner: memory per GPU and compute, on paper (no GPU, data or checkpoint)
        return P.plan_stage(args, "gatt")
    rank, world_size, device = P.setup_distributed(args.device)
    P.resolve_args(args, world_size)
    if args.inst_batch_tokens is None:
        args.inst_batch_tokens = TOY_INST_BATCH_TOKENS if args.preset in P.CPU_PRESETS else args.batch_tokens
    log = print if rank == 0 else (lambda *a, **k: None)
    tok_path, init = input_paths(args, log)
    args.gatt_lr = args.gatt_lr or args.lr / 4
    tokenizer, world = tok.Tokenizer(tok_path), P.make_world(args.world_seed)
    timings = {}

    # 1. Step 1: follow an instruction in the current message (the paper's starting point)
    t0 = time.time()
    before_path, gatt_path = args.run_dir / "gatt_before.pt", args.run_dir / "gatt.pt"
    examples = [S.encode_dialog(tokenizer, d) for d in instruction_dialogs(world, args.inst_examples, args.seed)]
    out_before = train_step(args, "step 1: instructions in the current message", examples, init,
                            args.inst_steps, args.lr, before_path, rank, device, tokenizer, log, args.inst_batch_tokens)
    timings["step1_s"] = time.time() - t0
    if args.stop_at and args.stop_at < args.inst_steps:
        return stop(f"stopped at step {args.stop_at} of step 1 (--stop-at): continue with --resume", log)

    # 2. The GAtt data: sampled by the step-1 model, the instruction in every user message. Too few
    #    of its answers follow: step 1 has not taught the rules yet, and trains another round.
    t0 = time.time()
    rounds, following, step1_more = 1, [], {}
    while True:
        final = rounds == args.inst_rounds
        sampled, examples, n_replay, data = gatt_data(args, world, tokenizer, before_path, rank, world_size, device,
                                                      log, rounds, final)
        following.append(data["answers_following"])
        if final or following[-1] >= STEP1_FOLLOWING:
            break
        rounds += 1
        log(f"the step-1 model follows its instruction in {following[-1]:.1%} of its sampled answers (fewer than "
            f"{STEP1_FOLLOWING:.0%}): step 1 again, round {rounds} of at most {args.inst_rounds}, on new dialogues")
        t1, start = time.time(), before_path
        before_path = args.run_dir / f"gatt_before_{rounds}.pt"
        more = [S.encode_dialog(tokenizer, d)
                for d in instruction_dialogs(world, args.inst_examples, step1_seed(args.seed, rounds))]
        step1_more[f"step1_round{rounds}"] = train_step(
            args, f"step 1, round {rounds}", more, start, args.inst_steps, args.lr, before_path, rank, device,
            tokenizer, log, args.inst_batch_tokens)["history"]
        timings["step1_s"] += time.time() - t1
        t0 += time.time() - t1
    data.update(step1_rounds=rounds, answers_following_by_round=following)
    timings["sampling_s"] = time.time() - t0

    # 3. Step 2: Ghost Attention
    t0 = time.time()
    out_gatt = train_step(args, "step 2: Ghost Attention", examples, before_path, args.steps, args.gatt_lr,
                          gatt_path, rank, device, tokenizer, log)
    timings["gatt_s"] = time.time() - t0
    if args.stop_at and args.stop_at < args.steps:
        return stop(f"stopped at step {args.stop_at} of GAtt (--stop-at): continue with --resume", log)

    # 4. Evaluations, with the models as saved, whole on every rank, each playing a share; rank 0 reports
    results = None
    adh, attention, chat, scripts, long_dialogs, tasks = evaluate(args, world, tokenizer, init, before_path,
                                                                   gatt_path, device, log, timings, (rank, world_size))
    if rank == 0:
        results = report(args, adh, attention, chat, long_dialogs, timings, log)
        tok.write_json(args.run_dir / "gatt.json", dict(
            config=vars(args), **results, gatt_data=data,
            histories={"step1": out_before["history"], **step1_more, "gatt": out_gatt["history"]},
            wall_s=time.time() - t_start, overlap=S.overlap(evaluation_texts(scripts, long_dialogs, tasks),
                                                            training_texts(world, args, sampled, n_replay, rounds))))
    return stop(f"\nwall {P.fmt_time(time.time() - t_start)} | wrote {gatt_path.name}, gatt.json, "
                f"gatt_adherence.png, gatt_attention.png in {args.run_dir}", log, results)


def stop(message, log, results=None):
    log(message)
    P.end_distributed()
    return results


if __name__ == "__main__":
    tok.run_cli(main)
