"""What each bug hunt does to a run, measured. Each effect runs the same short, seeded run twice,
once with the chapter's own function and once with the bug hunt's copy (exercises/bugs.py) in its
place, and prints what it measured side by side, with a one-line reading:

    python exercises/effects.py bug_kl_sign     # one bug hunt (seconds)
    python exercises/effects.py                 # all of them (under a minute on 2 cores)

Every number printed is measured by the runs it reports on: nothing is written down. The runs are
micro-sized so they take seconds on a CPU: 02's micro preset (2 layers, dim 64), the checker's
700-piece tokenizer, 04's toy dialogues, and where a run needs a model that already talks, a micro
SFT policy trained here in a few seconds (120 steps of 04's SFT on the toy dialogues), shared by
the effects run in one process. PPO's runs use two micro reward models with random weights as the
judge: they score every answer, they just know nothing; what the bugs change is how the score and
the KL reach the policy, and that is what is measured. Everything is seeded: a rerun on the same
machine prints the same numbers."""
import argparse
import copy
import importlib
import random
import sys
import textwrap
import time
from argparse import Namespace
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import check  # noqa: E402   the checker's chapters, tokenizer, micro models and swapped()
from check import BY_NAME, M, P, R, RL, S, micro, swapped, tokenizer  # noqa: E402

G = importlib.import_module("07_gatt")
WORLD = P.make_world(0)
CPU = torch.device("cpu")


@dataclass
class Row:
    key: str        # the tests' name for it
    what: str       # what was measured, in words
    chapter: float  # with the chapter's function
    bug: float      # with the bug hunt's copy
    fmt: str = "{:.3f}"


@dataclass
class Effect:
    run: str        # the run, in words
    rows: list
    reading: str    # one line: what the numbers say, from the numbers

    def __getitem__(self, key):
        return next(r for r in self.rows if r.key == key)


def bug(name):
    return BY_NAME[name].learner()


def ratio(a, b):
    return a / b if b else float("inf")


# ----------------------------------------------------------------------------------------------
# The micro runs the effects share.

SFT_STEPS, SFT_ROWS, SFT_SEQ, SFT_LR = 120, 8, 96, 4e-3


def sft_run(module=S, patch=None, steps=SFT_STEPS):
    """A micro SFT run: 04's template, pack and sft_loss on 1,000 of 04's toy dialogues, `steps`
    steps of 8 rows of 96 tokens, 03's AdamW at a constant LR 4e-3. In 120, 02's micro model learns
    the toy answers' shape and ends some of them with EOS within 12 tokens: PPO's effects need
    answers of different lengths. patch is swapped into module for the whole run."""
    tk = tokenizer()
    with swapped(module, patch or {}), torch.enable_grad():   # the first caller may be a no_grad effect
        examples = [S.encode_dialog(tk, d) for d in S.sft_dialogs(WORLD, 1000, seed=0)]
        x, y, doc = S.pack(examples, SFT_SEQ, tk.eos_id)
        model = micro(M.Transformer, tk.n_words).train()
        opt = P.configure_optimizer(model, SFT_LR, 0.1, (0.9, 0.95), 1e-8, CPU)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            rows = torch.randint(0, len(x), (SFT_ROWS,), generator=g)
            S.sft_loss(model, (x[rows], y[rows], doc[rows])).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model.eval()


@cache
def _sft_policy():
    return sft_run()


def sft_policy():
    """The micro SFT policy (trained once per process): a fresh copy, so a run may train it."""
    return copy.deepcopy(_sft_policy())


def other_dialogs(n=64):
    """Toy dialogues the SFT run did not draw (seed 1), for losses measured after it."""
    return S.sft_dialogs(WORLD, n, seed=1)


@torch.no_grad()
def sft_loss_on(model, examples):
    """04's sft_loss over examples [(ids, learn)], packed in rows of 96 tokens."""
    return S.sft_loss(model, S.pack(examples, SFT_SEQ, tokenizer().eos_id)).item()


PPO_ITERATIONS, PPO_PROMPTS, PPO_LR = 10, 16, 1e-3
# 06's settings for a micro run: 16 rollouts of up to 12 tokens per iteration at temperature 0.7,
# mini-batches of 8, one epoch. LR 1e-3, 100x 06's toy PPO LR, so that 10 iterations move the
# policy at all; kl_beta 0.5, not the toy's 0.1: at this LR a shorter leash holds the chapter's
# policy near its reference, which is what the KL bugs break.
PPO_ARGS = dict(check.PPO_ARGS, max_new_tokens=12, ppo_mini_batch=8, kl_beta=0.5)


def micro_reward(pad_id=0):
    tk = tokenizer()
    return RL.Reward(micro(R.RewardModel, tk.n_words, 1), micro(R.RewardModel, tk.n_words, 2), pad_id, tk.eos_id)


def ppo_run(patch, iterations=PPO_ITERATIONS):
    """10 micro PPO iterations of 06's ppo_step from the micro SFT policy, the reference a frozen
    copy of it, with patch swapped into 06. -> (the log entries, policy, reference)."""
    tk = tokenizer()
    policy, value = sft_policy(), micro(R.RewardModel, tk.n_words, seed=3)
    ref, reward = copy.deepcopy(policy), micro_reward()
    opts = [P.configure_optimizer(m, PPO_LR, 0.1, (0.9, 0.95), 1e-5, CPU) for m in (policy, value)]
    with swapped(RL, patch), torch.enable_grad():
        log = [RL.ppo_step(Namespace(**PPO_ARGS), policy, value, ref, reward, policy, tk,
                           RL.draw_prompts(WORLD, PPO_PROMPTS, seed=it), it, opts, [policy, value], nullcontext)
               for it in range(iterations)]
    return log, policy, ref


def rollouts(policy, n=PPO_PROMPTS, seed=0, pad_id=0, layout=None):
    """n answers sampled as 06's PPO samples them, laid out by 06's rollout_batch (or `layout`):
    a batch with prompts, samples, tokens, real, mask and start (rollout_batch's width_p)."""
    tk = tokenizer()
    prompts = RL.draw_prompts(WORLD, n, seed=seed)
    samples = RL.sample_answers(policy, tk, prompts, 1, PPO_ARGS["max_new_tokens"], PPO_ARGS["ppo_temperature"],
                                torch.Generator().manual_seed(seed))
    tokens, real, mask, start = (layout or RL.rollout_batch)(samples, pad_id, CPU)
    return Namespace(prompts=prompts, samples=samples, tokens=tokens, real=real, mask=mask, start=start)


@torch.no_grad()
def kl_to_reference(policy, ref):
    """KL(policy || reference) per answer, 06's estimate (kl_rewards' sum over the answer) on 64
    fresh rollouts, with the chapter's functions; and the answers' mean length in tokens."""
    b = rollouts(policy, n=64, seed=999)
    logp, ref_logp = (RL.answer_logprobs(m, b.tokens, b.real, b.start, PPO_ARGS["ppo_temperature"])
                      for m in (policy, ref))
    _, kl = RL.kl_rewards(logp, ref_logp, torch.zeros(len(b.mask)), b.mask, 0.0)
    return kl.mean().item(), b.mask.sum(1).mean().item()


@cache
def chapter_ppo():
    """The chapter's 10 micro PPO iterations (two effects compare with them): -> (largest KL it
    logged, KL to the reference after it, answer length after it)."""
    log, policy, ref = ppo_run({})
    return (max(e["kl"] for e in log), *kl_to_reference(policy, ref))


# ----------------------------------------------------------------------------------------------
# The effects, one per bug hunt: each returns an Effect.

def effect_bug_rope_rotates_halves():
    fixed = sft_policy()   # trained with 02's RoPE: a stand-in for Meta's weights
    examples = [S.encode_dialog(tokenizer(), d) for d in other_dialogs()]
    read_chapter = sft_loss_on(fixed, examples)
    with swapped(M, {"apply_rotary_emb": bug("bug_rope_rotates_halves")}):
        read_bug = sft_loss_on(fixed, examples)
        scratch_bug = sft_loss_on(sft_run(M, {"apply_rotary_emb": bug("bug_rope_rotates_halves")}), examples)
    return Effect(
        "the micro SFT policy (trained with 02's interleaved RoPE) scored on 64 other toy dialogues with each RoPE; "
        "then the same SFT run from scratch with the bug's RoPE",
        [Row("loaded", "SFT loss of the trained weights, read with this RoPE", read_chapter, read_bug),
         Row("scratch", "SFT loss of a model trained from scratch with this RoPE", read_chapter, scratch_bug)],
        f"read with the other pairing of channels, trained weights lose what they learned about positions (loss "
        f"{read_chapter:.2f} -> {read_bug:.2f}), while a model trained from scratch with it learns as well "
        f"({scratch_bug:.2f}): only a comparison with the reference layout's logits finds the bug")


@torch.no_grad()
def effect_bug_mask_without_cache_offset():
    model, tk = sft_policy(), tokenizer()

    def decode_in_chunks():
        """Each dialogue's prompt prefilled into the KV cache, then its answer fed as one chunk (as
        speculative decoding checks a draft), against the full forward: (max |logit diff|, share
        of the answer's positions whose greedy next token differs)."""
        worst, differ, total = 0.0, 0, 0
        for ids, is_answer in (S.encode_dialog(tk, d) for d in other_dialogs(16)):
            tokens = torch.tensor([ids])
            split = is_answer.index(True)
            full = model(tokens)[:, split:]
            model.setup_cache(1, len(ids))
            model(tokens[:, :split], 0)
            chunk = model(tokens[:, split:], split)
            model.clear_cache()
            worst = max(worst, (chunk - full).abs().max().item())
            differ += (chunk.argmax(-1) != full.argmax(-1)).sum().item()
            total += full.shape[1]
        return worst, differ / total

    chapter, buggy = decode_in_chunks(), None
    with swapped(M, {"causal_mask": bug("bug_mask_without_cache_offset")}):
        buggy = decode_in_chunks()
    return Effect(
        "the micro SFT policy on 16 toy dialogues: the prompt prefilled into the KV cache, the rest of the "
        "dialogue from its first answer fed as one chunk, against the full forward",
        [Row("logit_diff", "largest |logit difference|, chunked decoding vs full forward", chapter[0], buggy[0],
             "{:.2e}"),
         Row("argmax", "share of answer positions whose greedy next token differs", chapter[1], buggy[1])],
        f"with the offset, cached decoding is the full forward to float precision; without it each chunk sees "
        f"the wrong keys and the next token changes at {100 * buggy[1]:.0f}% of the positions, with no error raised")


def effect_bug_sft_learns_prompt():
    tk = tokenizer()
    dialogs = S.sft_dialogs(WORLD, 1000, seed=0)
    chapter_model = sft_policy()
    bug_patch = {"encode_dialog": bug("bug_sft_learns_prompt")}
    bug_model = sft_run(S, bug_patch)

    def prompt_share(encode):   # of the tokens the SFT loss is taken on, those of system and user messages
        learned = prompt = 0
        for d in dialogs:
            ids, mask = S.encode_dialog(tk, d)   # the chapter's mask says which tokens are answers
            _, learn = encode(tk, d)
            learned += sum(learn)
            prompt += sum(lrn and not ans for lrn, ans in zip(learn, mask))
        return prompt / learned

    # how well each model writes the user's side: the loss on the prompts' tokens of other dialogues
    prompts = [(ids, [not a for a in is_answer]) for ids, is_answer in
               (S.encode_dialog(tk, d) for d in other_dialogs())]
    answers = [S.encode_dialog(tk, d) for d in other_dialogs()]
    rows = [Row("prompt_share", "share of the SFT loss's tokens that are prompt tokens",
                prompt_share(S.encode_dialog), prompt_share(bug_patch["encode_dialog"])),
            Row("prompt_loss", "loss on the prompts' tokens of 64 other dialogues, after 120 steps",
                sft_loss_on(chapter_model, prompts), sft_loss_on(bug_model, prompts)),
            Row("answer_loss", "loss on their answers' tokens", sft_loss_on(chapter_model, answers),
                sft_loss_on(bug_model, answers))]
    return Effect(
        "two micro SFT runs (120 steps on 04's toy dialogues), with 04's encode_dialog and with the bug's",
        rows,
        f"{100 * rows[0].bug:.0f}% of the bug's loss is spent on text the user writes, and the model learns to "
        f"write the prompts (their loss {rows[1].chapter:.2f} -> {rows[1].bug:.2f}); the answers, Sec. 3.1's only "
        f"target, get the rest (their loss {rows[2].chapter:.2f} -> {rows[2].bug:.2f})")


def effect_bug_loss_diluted_by_padding():
    model, tk = sft_policy(), tokenizer()
    examples = [S.encode_dialog(tk, d) for d in other_dialogs(32)]
    packed = S.pack(examples, SFT_SEQ, tk.eos_id)                              # rows filled with dialogues
    padded = [torch.cat(t) for t in zip(*(S.pack([e], SFT_SEQ, tk.eos_id) for e in examples))]   # one per row

    @torch.no_grad()
    def losses():   # the loss on every position's logits: 04's sft_loss computes only the answers' first
        return [S.masked_lm_loss(model(x, mask=S.doc_mask(doc)), y).item() for x, y, doc in (packed, padded)]

    chapter = losses()
    with swapped(S, {"masked_lm_loss": bug("bug_loss_diluted_by_padding")}):
        buggy = losses()
    return Effect(
        "04's masked_lm_loss on the micro SFT policy's logits for the same 32 toy dialogues, packed into rows of 96 tokens, then "
        "one dialogue per row (the rest padding)",
        [Row("packed", "loss, dialogues packed", chapter[0], buggy[0]),
         Row("padded", "loss, one dialogue per row", chapter[1], buggy[1])],
        f"the same tokens, the same model: the chapter's loss does not move, the bug's falls by "
        f"{ratio(buggy[0], buggy[1]):.1f}x with the padding, and its gradient, the effective learning rate, with it")


def effect_bug_margin_sign():
    tk, policy = tokenizer(), sft_policy()
    # 05's comparisons: two answers of the micro SFT policy per prompt (at 05's temperatures),
    # rated by 05's helpfulness annotator
    pairs = R.encode_set(tk, R.collect([policy, policy], tk, lambda rng: R.helpful_task(WORLD, rng),
                                       R.helpfulness_score, 1280, 0, 16, log=lambda *a: None), 96)
    train, test = pairs[:1024], pairs[1024:]
    clear = [i for i, p in enumerate(test) if p[2] in R.RATINGS[:2]]   # better, significantly better

    def train_rm(loss, margin):
        """30 steps of 16 pairs, the RM initialised from the policy's trunk as 05's from_lm does.
        -> (accuracy, mean gap r_c - r_r) on the clearly better test pairs."""
        torch.manual_seed(0)
        rm = micro(R.RewardModel, tk.n_words)
        trunk = {k: v for k, v in policy.state_dict().items() if k != "output.weight"}
        rm.load_state_dict({**trunk, "reward_head.weight": rm.reward_head.weight})
        rm.train()
        opt = P.configure_optimizer(rm, 1e-3, 0.1, (0.9, 0.95), 1e-5, CPU)
        margins = torch.tensor([R.margin_of(p[2], margin) for p in train])
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            idx = torch.randint(0, len(train), (16,), generator=g).tolist()
            rewards = rm(*R.collate([train[i][0] for i in idx] + [train[i][1] for i in idx], tk.eos_id, CPU))
            loss(rewards[:16], rewards[16:], margins[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rm.eval()
        gap = R.score_rows(rm, [p[0] for p in test], tk.eos_id) - R.score_rows(rm, [p[1] for p in test], tk.eos_id)
        gap = gap[clear]
        return (gap > 0).float().mean().item(), gap.mean().item()

    chapter, buggy = train_rm(R.ranking_loss, "large"), train_rm(bug("bug_margin_sign"), "large")
    none = train_rm(R.ranking_loss, "none")   # no margin: the two losses are the same
    return Effect(
        f"three micro RM runs on 05's comparisons of the micro SFT policy's answers: margin 'large' with 05's "
        f"ranking_loss and with the bug's, and margin 'none'; scored on the {len(clear)} test pairs rated better or "
        "significantly better",
        [Row("accuracy", "accuracy on the clearly better test pairs, margin large", chapter[0], buggy[0]),
         Row("gap", "their mean reward gap r_chosen - r_rejected, margin large", chapter[1], buggy[1]),
         Row("gap_no_margin", "the same gap with margin none (both losses agree)", none[1], none[1])],
        f"the margin should make the RM separate clearly better answers by more than no margin does (gap "
        f"{none[1]:.2f} -> {chapter[1]:.2f}); with its sign flipped it separates them by less ({buggy[1]:.2f}). "
        + (f"Accuracy hardly tells (on these easy pairs {chapter[0]:.2f} vs {buggy[0]:.2f}): the gap is what the "
           "margin changes" if abs(chapter[0] - buggy[0]) < 0.05 else
           f"The accuracy on these pairs falls with it ({chapter[0]:.2f} -> {buggy[0]:.2f}): a margin that pushes "
           "the wrong way leaves the RM unsure of the pairs it should be surest of"))


def effect_bug_kl_sign():
    log, policy, ref = ppo_run({"kl_rewards": bug("bug_kl_sign")})
    _, kl, length = chapter_ppo()
    bug_kl, bug_length = kl_to_reference(policy, ref)
    return Effect(
        f"{PPO_ITERATIONS} micro PPO iterations (06's ppo_step, kl_beta {PPO_ARGS['kl_beta']}) from the micro SFT "
        "policy, with 06's kl_rewards and with the bug's; then 64 fresh rollouts",
        [Row("kl", f"KL(policy || reference) per answer after {PPO_ITERATIONS} iterations", kl, bug_kl),
         Row("length", f"mean answer length then (tokens, {PPO_ARGS['max_new_tokens']} the most)", length,
             bug_length, "{:.2f}")],
        f"the flipped sign pays the policy for leaving the SFT model: its KL ends {ratio(bug_kl, kl):.0f}x the "
        f"chapter's and its answers drift longer ({length:.1f} -> {bug_length:.1f} tokens)")


def effect_bug_kl_against_the_sampler():
    log, policy, ref = ppo_run({"ppo_step": bug("bug_kl_against_the_sampler")})
    logged, kl, _ = chapter_ppo()
    bug_kl, _ = kl_to_reference(policy, ref)
    return Effect(
        f"{PPO_ITERATIONS} micro PPO iterations (kl_beta {PPO_ARGS['kl_beta']}) from the micro SFT policy, with "
        "06's ppo_step and with the bug's; then 64 fresh rollouts",
        [Row("logged", "largest KL the run logged", logged, max(e["kl"] for e in log)),
         Row("kl", f"KL(policy || reference) per answer after {PPO_ITERATIONS} iterations", kl, bug_kl)],
        f"the KL against the policy itself is 0 at every token: the log reads 0 while the policy's real KL to "
        f"the SFT model ends {ratio(bug_kl, kl):.1f}x the chapter's, the penalty doing nothing")


@torch.no_grad()
def effect_bug_score_on_pad():
    b = rollouts(sft_policy())
    mask, score = b.mask, micro_reward()(b.samples, b.prompts)["score"]
    logp = torch.zeros_like(mask)   # the KL part is not what moves: the score's place is

    def lands_in_answer(kl_rewards):   # rows whose score sits on a token the mask counts
        rewards, _ = kl_rewards(logp, logp, score, mask, PPO_ARGS["kl_beta"])
        return ((rewards * mask).sum(1) == score).float().mean().item()

    shorter = (mask.sum(1) < mask.shape[1]).float().mean().item()
    chapter, buggy = lands_in_answer(RL.kl_rewards), lands_in_answer(bug("bug_score_on_pad"))
    return Effect(
        f"one PPO rollout batch of the micro SFT policy ({PPO_PROMPTS} answers, {100 * shorter:.0f}% shorter than "
        "the longest), its scores placed by 06's kl_rewards and by the bug's",
        [Row("scored", "share of answers whose score lands inside the answer (on its last token)", chapter, buggy)],
        f"the bug puts every score in the last column: {100 * (1 - buggy):.0f}% of the answers, those that "
        "ended early, get it on padding the mask zeroes and learn from the KL alone")


@torch.no_grad()
def effect_bug_gae_past_eos():
    tk = tokenizer()
    b = rollouts(sft_policy())
    mask, score = b.mask, micro_reward()(b.samples, b.prompts)["score"]
    values = RL.answer_values(micro(R.RewardModel, tk.n_words, seed=3), b.tokens, b.real, b.start)
    logp = torch.zeros_like(mask)   # at the first iteration the policy is the reference: no KL
    rewards, _ = RL.kl_rewards(logp, logp, score, mask, PPO_ARGS["kl_beta"])
    short = mask.sum(1) < mask.shape[1]
    zeroed = values * mask   # the same values with those on the padding set to 0

    def moved(gae):   # the largest change of a short answer's advantage when only the padding's values change
        return (gae(rewards, values, mask)[0] - gae(rewards, zeroed, mask)[0])[short].abs().max().item()

    buggy = bug("bug_gae_past_eos")
    last = mask.sum(1).long() - 1
    at_eos = lambda gae: gae(rewards, values, mask)[0][torch.arange(len(mask)), last][short]
    leak = (at_eos(buggy) - at_eos(RL.gae)).abs().mean().item()
    spread = RL.gae(rewards, values, mask)[0][mask.bool()].std().item()
    return Effect(
        f"one PPO rollout batch of the micro SFT policy ({int(short.sum())} of {len(short)} answers shorter than "
        "the longest), their scores and a micro value model's values, GAE by 06's gae and by the bug's",
        [Row("padding", "largest change of a short answer's advantage when only the padding's values change",
             moved(RL.gae), moved(buggy))],
        f"the value read on the padding after an EOS leaks into that EOS's advantage: here it moves a short "
        f"answer's EOS advantage by {leak:.2f} on average (before whitening; the advantages' spread is "
        f"{spread:.2f}), noise that a short answer gets only for sharing its batch with a longer one")


@torch.no_grad()
def effect_bug_logprobs_without_temperature():
    policy, temperature = sft_policy(), PPO_ARGS["ppo_temperature"]
    b = rollouts(policy)
    sampler = RL.answer_logprobs(policy, b.tokens, b.real, b.start, temperature)   # what the tokens were drawn from

    def first_step(answer_logprobs):   # the ratio against the sampler before any update, as PPO's clip sees it
        ratio_ = torch.exp(answer_logprobs(policy, b.tokens, b.real, b.start, temperature) - sampler)
        outside = ((ratio_ - 1).abs() > PPO_ARGS["clip_eps"]).float()
        return RL.masked_mean(ratio_, b.mask).item(), RL.masked_mean(outside, b.mask).item()

    chapter, buggy = first_step(RL.answer_logprobs), first_step(bug("bug_logprobs_without_temperature"))
    return Effect(
        f"one PPO rollout batch of the micro SFT policy sampled at temperature {temperature}, its log-probs by "
        "06's answer_logprobs and by the bug's, before any update",
        [Row("ratio", "mean ratio pi_logged / pi_sampler over the answer tokens", chapter[0], buggy[0]),
         Row("outside_clip", f"share of answer tokens outside the clip range 1 +- {PPO_ARGS['clip_eps']}",
             chapter[1], buggy[1])],
        f"before a single update, {100 * buggy[1]:.0f}% of the tokens are already outside the clip range: PPO "
        "optimises and penalises the KL of a distribution it never sampled from")


@torch.no_grad()
def effect_bug_pad_is_eos():
    tk = tokenizer()
    policy = sft_policy()

    def eos_counted(layout):   # finished answers whose EOS is in the mask, with pad_id = eos_id (Llama has no pad)
        b = rollouts(policy, pad_id=tk.eos_id, layout=layout)
        eos_at = {i: len(a) - 1 for i, (_, a, finished) in enumerate(b.samples) if finished}   # row: EOS column
        return sum(b.mask[i, t].item() for i, t in eos_at.items()) / len(eos_at), len(eos_at)

    (chapter, finished), (buggy, _) = eos_counted(RL.rollout_batch), eos_counted(bug("bug_pad_is_eos"))
    return Effect(
        f"one PPO rollout batch of the micro SFT policy ({finished} of {PPO_PROMPTS} answers finished with EOS), "
        "laid out with pad_id = eos_id by 06's rollout_batch and by the bug's",
        [Row("eos_counted", "share of finished answers whose EOS the mask counts", chapter, buggy)],
        "the bug takes every EOS for padding: no EOS gets the score or a gradient, so PPO never rewards an "
        "answer for ending")


def effect_bug_gatt_learns_every_answer():
    tk, rng = tokenizer(), random.Random(0)
    sampled = []   # 07's sampled dialogues, with reference answers that follow the rules in every turn
    for _ in range(16):
        instruction, rules = G.random_instruction(rng)
        tasks = [G.task_turn(WORLD, rng) for _ in range(4)]
        sampled.append(dict(instruction=instruction, rules=rules, users=[t.prompt for t in tasks],
                            answers=[G.apply_rules(rules, t.answer) for t in tasks]))

    def earlier_share():   # of the loss tokens, those outside each example's last turn
        examples, _ = G.gatt_examples(tk, sampled)
        learned = earlier = 0
        for ids, learn in examples:
            last_turn = len(ids) - 1 - ids[::-1].index(tk.bos_id)
            learned += sum(learn)
            earlier += sum(lrn for lrn in learn[:last_turn])
        return earlier / learned, learned / len(examples)

    chapter = earlier_share()
    with swapped(G, {"gatt_example": bug("bug_gatt_learns_every_answer")}):
        buggy = earlier_share()
    return Effect(
        "07's gatt_examples on 16 dialogues of 4 turns (the instruction in every user message, as GAtt samples), "
        "built by 07's gatt_example and by the bug's",
        [Row("earlier_share", "share of the loss tokens on earlier answers (learned without the instruction in view)",
             chapter[0], buggy[0]),
         Row("per_example", "loss tokens per example", chapter[1], buggy[1], "{:.1f}")],
        f"{100 * buggy[0]:.0f}% of the bug's loss teaches answers that follow an instruction their context no longer "
        "shows, what Sec. 3.3 zeroes the loss on")


EFFECTS = {name.removeprefix("effect_"): f for name, f in globals().items() if name.startswith("effect_bug_")}


def measure(name):
    """-> the Effect of one bug hunt, and the seconds it took (one thread: the tensors are tiny)."""
    threads, t0 = torch.get_num_threads(), time.time()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        return EFFECTS[name](), time.time() - t0
    finally:
        torch.set_num_threads(threads)


def show(name, effect, seconds):
    ex = BY_NAME[name]
    mine, theirs = f"{ex.chapter[:2]}'s {ex.target}", name
    width, col = max(len(r.what) for r in effect.rows), max(len(mine), len(theirs))
    wrap = lambda label, text: textwrap.fill(text, 110, initial_indent=f"  {label}: ", subsequent_indent="    ")
    print(f"{name} (a copy of {mine}), measured in {seconds:.1f}s")
    print(wrap("run", effect.run))
    print(f"  {'':{width}}  {mine:>{col}}  {theirs:>{col}}")
    for r in effect.rows:
        print(f"  {r.what:{width}}  {r.fmt.format(r.chapter):>{col}}  {r.fmt.format(r.bug):>{col}}")
    print(wrap("reading", effect.reading) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"bug hunts (default: all): {', '.join(EFFECTS)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EFFECTS]
    if unknown:
        print(f"no effect for {', '.join(unknown)}; one of: {', '.join(EFFECTS)}")
        return 2
    for name in args.names or EFFECTS:
        show(name, *measure(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
