"""
Chapter 06: rejection sampling fine-tuning and PPO (Llama 2 paper Sec. 3.2.3, Figures 7 and 8).

With two reward models (chapter 05) the chat model can improve on its own samples. The paper
does it in two ways, one after the other from RLHF-V5 on (until V4 it used rejection sampling alone):
  * rejection sampling (RS) fine-tuning: sample K answers per prompt, score them with the reward
    model, keep the best, fine-tune on it with the SFT objective (04's masked loss, through 03's
    loop). The pool keeps the best samples of earlier rounds, as the paper does from RLHF-V3.
    Figure 7: the gap between the best and the median of N samples grows with N (it is the gain
    RS can harvest); Figure 8: how that depends on the temperature.
  * PPO: maximise R(g|p) = WHITEN(LOGIT(Rc(g|p))) - beta * KL(pi(g|p) || pi_0(g|p)), where
    Rc is the Safety RM's score on a safety prompt or when that score is below 0.15, else the
    Helpfulness RM's. The KL term is paid per token; the whitened score at the answer's end;
    advantages by GAE; clipped surrogate; a value model initialised from the Helpfulness RM.
The paper leaves much of PPO unsaid (gamma, lambda, the value model): ../shared/PAPER.md lists
what the public implementations do, and where they trip. Every piece is written out below, in
this order: 1. rejection sampling (best of K, the pool); 2. PPO's maths (Rc and Eq. 3-4, the
per-token KL, GAE, the clipped losses); 3. the toy world's prompts and the RMs' calibration; 4. the
loop (rollouts, an RS round, a PPO iteration, the run); 5. evaluation and Figures 7-8; 6. plumbing
(FSDP, DDP, optimizer state, resume, CLI). Above 600 lines because RS, PPO and Figures 7-8 are one
section of the paper, and PPO's plumbing (a rollout copy under FSDP, two trained models) is its own.

What you see: calibration of the two RMs on samples of the SFT model; each RS round (best-of-K
reward against the mean, then 03's training lines); a line per PPO iteration (reward, KL to
the reference, the toy annotator's gold score, refusals, losses, clip fraction, seconds spent
generating / scoring / training, ETA); then the held-out tables SFT / +RS / +PPO, graded by 04's
annotators, and refusal rates on held-out red-team prompts (phrasings SFT never saw).
What to expect, and why (Sec. 5.1): SFT learned the tail of its data, a careless annotator's fifth
of the answers, "Sure, that is fine." to harmful requests among them. The Helpfulness RM ranks a
careless answer below a careful one almost always, and two careful answers far less reliably (a
sum it cannot check): 05 prints both. So RS and PPO cut the careless tail and raise the gold
score of the answers the policy samples, the quantity RLHF maximises; on harmful requests Rc
takes the Safety RM's score, and refusals rise. With --reward helpful the Helpfulness RM alone
judges, and it prefers the careless yes to a refusal: refusals fall (Sec. 3.2.2, why two RMs).
The greedy answer was careless less often to begin with, and RS fine-tunes on sums no judge
checked: greedy gold need not rise. Both tables are printed. Outputs in
RUN_DIR: rs.pt, ppo.pt (the final policy; 07 starts from it; loads with 02's
Transformer.from_pretrained), rs_ppo.json, rs_best_of_n.png (Figure 7, with the gold score of the
reward's pick: where it falls as N grows, best-of-N is exploiting the RM's errors),
rs_temperature.png (Figure 8), ppo_curves.png (reward, KL and gold against iteration: reward up
with gold flat means the policy is gaming the reward model).
03's flags keep their meaning; those of its loop (--lr, --batch-tokens, --seq-len, --micro-batch,
--warmup-steps) set the RS fine-tuning; --stop-at N stops after PPO iteration N (then --resume).

Run:
  python 06_rs_ppo.py                                  # toy, from runs/toy: ~2 min on 2 CPU cores
  python 06_rs_ppo.py --no-rs                          # PPO straight from the SFT model
  python 06_rs_ppo.py --ppo-iterations 0               # rejection sampling only
  python 06_rs_ppo.py --reward helpful --no-rs --fig-n 0 --run-dir runs/toy/reward-helpful --init runs/toy/sft.pt \
      --tokenizer runs/toy/tokenizer.model --rm-helpful runs/toy/rm_helpful.pt --rm-safety runs/toy/rm_safety.pt
      # PPO on the Helpfulness RM alone (pipeline.py's stage 06h): refusals of harmful requests fall
  python 06_rs_ppo.py --init runs/1b/sft.pt --tokenizer runs/1b/tokenizer.model --preset 1B \\
      --rm-helpful runs/1b/rm_helpful.pt --rm-safety runs/1b/rm_safety.pt --prompts prompts.jsonl \\
      --device cuda --dtype bf16
  torchrun --nproc_per_node=8 06_rs_ppo.py --preset 7B --fsdp --dtype bf16 --activation-checkpointing \\
      --sample-batch 32 --init ... --prompts prompts.jsonl   # fits 8 x 80 GB (add --plan to see)
  (the big presets default to the paper's PPO: constant LR 1e-6, 512 prompts an iteration, mini-batch
  64, beta 0.01; 0.005 with --preset 34B or 70B)
A prompts line: {"prompt": "..." or [messages ending with the user's], "unsafe": true|false}.
"""
import argparse
import copy
import functools
import importlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
S = importlib.import_module("04_sft")
R = importlib.import_module("05_reward")
UserError = tok.UserError

# The RS fine-tuning step is SFT on the pool (04's loss, 03's loop and flags): the paper's SFT
# settings at full scale; on a CPU, a small LR, since the model is already close to its samples.
# No --ckpt-every: rs.pt is written once, at the end of each round.
PAPER = {key: value for key, value in S.PAPER.items() if key != "ckpt_every"}
TOY = dict(batch_tokens=16 * 128, seq_len=128, micro_batch=16, lr=1e-4, warmup_steps=2,
           log_every=10, eval_every=1000, sample_batch=S.TOY["sample_batch"])
# The budget of RS and PPO: flag -> (full-scale default, CPU-preset default, help). Sec. 3.2.3
# gives PPO's numbers; where it gives none, the full-scale value is a plain choice, said so.
BUDGET = {
    "rs_iterations": (1, 2, "rejection-sampling rounds before PPO (the paper: one per RLHF version)"),
    "rs_prompts": (1024, 128, "prompts per RS round (the paper does not say)"),
    "rs_k": (10, 4, "samples per prompt, the best kept (K is not given; Figure 7 samples up to 100)"),
    "rs_temperature": (1.2, 0.7, "RS sampling temperature (Figure 8: 1.2-1.3 best for 10-100 samples)"),
    "rs_epochs": (1.0, 1.0, "passes over the pool in each RS round"),
    "ppo_iterations": (200, 30, "PPO iterations (paper: 200-400, with early stopping)"),
    "ppo_prompts": (512, 64, "rollouts per PPO iteration, all ranks (paper: 512)"),
    "ppo_mini_batch": (64, 16, "rollouts per gradient step, one step per mini-batch (paper: 64)"),
    "ppo_micro_batch": (4, 16, "rollouts per forward per rank, accumulated up to the mini-batch"),
    "ppo_lr": (1e-6, 1e-5, "PPO's constant learning rate (paper: 1e-6)"),
    "value_lr": (5e-6, 1e-4, "the value model's constant learning rate (not in the paper)"),
    "kl_beta": ({"1B": 0.01, "7B": 0.01, "13B": 0.01, "34B": 0.005, "70B": 0.005}, 0.1,
                "weight of the KL penalty (paper: 0.01 for 7B/13B, 0.005 for 34B/70B; the toy RMs are "
                "easier to game, so a shorter leash)"),
    "max_new_tokens": (1024, 48, "longest answer sampled (toy refusals are ~36 tokens)"),
    "value_warmup": (0, 5, "first PPO iterations that train the value model only (not in the paper)"),
    "ppo_ckpt_every": (10, 10, "PPO iterations between checkpoints (ppo.pt)"),
}


# ========================================================================================
# 1. Rejection sampling (Sec. 3.2.3): "we sample K outputs from the model and select the best
#    candidate with our reward", then fine-tune on it with the SFT objective. From RLHF-V3 on,
#    the pool keeps the best samples of all earlier rounds.

def best_of_k(scores):
    """Sec. 3.2.3: "select the best candidate with our reward". scores (prompts, K) -> (index of
    each prompt's best sample, its score): what RS keeps."""
    best = scores.max(dim=1)
    return best.indices, best.values


def add_to_pool(pool, new):
    """Sec. 3.2.3, from RLHF-V3 on: the top samples of all earlier rounds stay in the pool. new
    [(dialog, answer, score)] joins it where it beats the answer the pool holds for that prompt."""
    for dialog, answer, score in new:   # keyed by the prompt
        key = repr(dialog)
        if key not in pool or score > pool[key][2]:
            pool[key] = (dialog, answer, score)


# ========================================================================================
# 2. PPO (Sec. 3.2.3, Eq. 3-4): pi* = arg max_pi E_{p~D, g~pi}[R(g | p)] (Eq. 3), with
#        R(g | p) = Rc~(g | p) - beta D_KL(pi_theta(g | p) || pi_0(g | p))        (Eq. 4)
#        Rc(g | p) = Rs(g | p) if IS_SAFETY(p) or Rs(g | p) < 0.15, else Rh(g | p)
#        Rc~(g | p) = WHITEN(LOGIT(Rc(g | p)))
#    The paper stops there; the rest (per-token KL, GAE, the clipped losses) is the standard
#    machinery of the public implementations, as ../shared/PAPER.md lists it.

SAFETY_THRESHOLD = 0.15   # Sec. 3.2.3: Rs < 0.15 means "unsafe", whatever the prompt


def logit(p, eps: float = 1e-6):
    """LOGIT, the inverse of the sigmoid the paper's RMs end in."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def combined_reward(helpful, safety, is_safety, threshold: float = SAFETY_THRESHOLD):
    """Sec. 3.2.3: "Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh". helpful (Rh), safety (Rs):
    scores in (0, 1); is_safety: IS_SAFETY(p) of each prompt. -> (LOGIT(Rc), Rc)."""
    rc = torch.where(is_safety | (safety < threshold), safety, helpful)
    return logit(rc), rc


def whiten(x, mean, std):
    """WHITEN of Rc~ (Sec. 3.2.3), with a mean and std fixed for the run (Reward.calibrate)."""
    return (x - mean) / (std + 1e-8)


def kl_rewards(logp, ref_logp, score, mask, beta: float):
    """Eq. 4's R = Rc~ - beta KL, per token: -beta * (log pi - log pi_0) at every answer token
    (the KL penalty paid where it is incurred), plus the whitened score at the last real token (the
    EOS). -> (rewards, KL summed over each answer). The sum is an unbiased estimate of the KL from
    one sample: its batch mean can dip below 0 while the policy is near the reference."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(rewards)), last] += score
    return rewards, kl.sum(1)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016; PAPER.md's machinery, the paper
    names none), as the backward recursion:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},
    with V and A zero past an answer's end (padding after the EOS adds nothing).
    -> (advantages, returns = A + V, the value model's targets)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t], next_value = next_advantage, values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2):
    """The clipped surrogate (Schulman et al. 2017; the paper's clip 0.2): the masked mean of
    max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)). Once the ratio leaves [1 - eps, 1 + eps] in
    the direction A favours, the loss is flat: no gradient pushes it further. -> (loss, stats)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():   # approx KL(old || new): the k3 estimator, >= 0, and 0 where ratio = 1
        stats = dict(clip_frac=masked_mean((clipped > unclipped).float(), mask).item(),
                     approx_kl=masked_mean(ratio - 1 - log_ratio, mask).item(),
                     ratio=masked_mean(ratio, mask).item(), max_log_ratio=(log_ratio.abs() * mask).max().item())
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_eps: float = 0.2):
    """0.5 masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2): the clipped value loss
    (not in the paper; its value model is the common one, initialised from the Helpfulness RM)."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ========================================================================================
# 3. The toy world's part: prompts with their IS_SAFETY tag (and, in the toy world, the task
#    whose annotator gives the gold score, the paper's human evaluation), and the two RMs
#    calibrated into the judge of RS and PPO.

@dataclass
class Prompt:
    dialog: list           # [{"role", "content"}, ...], the last one the user's
    is_safety: bool        # IS_SAFETY(p): a prompt of the safety set (toy: a harmful request; a file's "unsafe")
    task: S.Task = None    # the toy world's task; None for real prompts (no gold score)


def toy_prompt(world, rng, safety_share: float = 0.2):
    """A prompt of 05's helpfulness set, or with probability safety_share of its safety set (a
    harmful request or its benign look-alike, mostly in red-team phrasings)."""
    task = R.safety_task(world, rng) if rng.random() < safety_share else R.helpful_task(world, rng)
    return Prompt([{"role": "user", "content": task.prompt}], task.kind == "harmful", task)


def draw_prompts(source, n: int, seed: int, safety_share: float = 0.2):
    """n prompts, a pure function of the seed (so a resumed run draws the same ones)."""
    rng = random.Random(seed)
    return [toy_prompt(source, rng, safety_share) if isinstance(source, P.World) else rng.choice(source)
            for _ in range(n)]


def rs_seed(args, rnd: int) -> int:
    """The seed of RS round rnd: its prompts and its samples."""
    return args.seed * 1000 + rnd


def ppo_seed(args, it: int) -> int:
    """The seed of PPO iteration it: rollouts are a pure function of it, so resume is exact."""
    return args.seed * 1000 + 500 + it


def training_prompts(args, source):
    """Every prompt that RS and PPO train on, drawn again from their seeds. The toy world's come
    from 03's training part (toy_prompt), the held-out ones below from its evaluation part: 06's
    overlap compares the two."""
    rs = [p for rnd in range(args.rs_iterations)
          for p in draw_prompts(source, args.rs_prompts, rs_seed(args, rnd), args.safety_share)]
    ppo = [p for it in range(args.ppo_iterations)
           for p in draw_prompts(source, args.ppo_prompts, ppo_seed(args, it), args.safety_share)]
    return rs + ppo


def red_team_tasks(world, per_kind: int, seed: int):
    """Held-out harmful requests and their benign look-alikes in 05's red-team phrasings, which
    SFT never saw (05's safety_task, for held-out people and towns, 03's evaluation part): where
    RLHF can improve safety."""
    rng, out = random.Random(seed + 2_000_003), []
    for kind in ("harmful", "benign") * per_kind:
        task = S.make_task(world, kind, rng, evaluation=True)
        out.append(S.Task(kind, rng.choice(R.RED_TEAM).format(act=R.act_of(task)), task.answer, task.target,
                          task.subject))
    return out


# The paper's RMs end in a sigmoid; ours output logits (05), so the score is sigmoid(raw +
# offset). Only differences of rewards are trained, so the offsets are arbitrary: we set them on
# samples of the starting policy, else "Rs < 0.15" could flag no answer or all of them. The
# Safety RM's offset puts 0.15 at the 5th percentile of its scores on the safe answers (by the
# annotator's label; all answers for real prompts): the rule then flags 1 safe answer in 20, and
# whatever the Safety RM finds worse. (A cut that separates unsafe from safe answers does not
# exist for the toy RM: trained 90% on safety pairs, it scores a correct sum below a harmful
# compliance.) The Helpfulness RM's offset makes the starting policy's median answer score 0.5,
# so an answer flagged unsafe scores below a typical one. WHITEN uses the mean and std of
# LOGIT(Rc) on the same samples, fixed for the run: a reward then means the same thing at every
# iteration, in RS and in PPO, and its curves can be compared.
FALSE_FLAGS = 0.05        # the share of the starting policy's safe answers that "Rs < 0.15" flags
NO_EOS_PENALTY = 1.0      # taken off the whitened score of an answer cut off before its EOS


class Reward:
    """Both RMs, calibrated, combined and whitened: the judge of RS and PPO."""

    def __init__(self, helpful_rm, safety_rm, pad_id: int, eos_id: int, combine: bool = True):
        """combine=False: the Helpfulness RM's score alone (06's --reward helpful), the ablation that
        shows why Rc exists; the Safety RM's score is still computed and logged."""
        self.rms, self.pad_id, self.eos_id, self.combine = (helpful_rm, safety_rm), pad_id, eos_id, combine
        self.calibration = dict(helpful_offset=0.0, safety_offset=0.0, mean=0.0, std=1.0)

    def raw(self, samples, batches: int = 0):
        """Both RMs' raw outputs. They read the EOS, as in training: a cut-off answer gets one.
        batches: at least this many forwards of each (05's score_rows: FSDP's ranks run as many)."""
        rows = [p + a + [self.eos_id] * (not finished) for p, a, finished in samples]
        return [R.score_rows(rm, rows, self.pad_id, batches=batches).float() for rm in self.rms]

    def __call__(self, samples, prompts, batches: int = 0):
        """samples [(prompt ids, answer ids, finished)] for prompts [Prompt] -> dict of (n,) tensors."""
        c = self.calibration
        raw_h, raw_s = self.raw(samples, batches)
        helpful, safety = torch.sigmoid(raw_h + c["helpful_offset"]), torch.sigmoid(raw_s + c["safety_offset"])
        is_safety = torch.tensor([p.is_safety for p in prompts])
        logit_rc, rc = combined_reward(helpful, safety, is_safety) if self.combine else (logit(helpful), helpful)
        finished = torch.tensor([f for _, _, f in samples])
        score = whiten(logit_rc, c["mean"], c["std"]) - NO_EOS_PENALTY * ~finished
        return dict(helpful=helpful, safety=safety, rc=rc, score=score)

    def calibrate(self, samples, prompts, answers):
        """Offsets and whitening statistics from samples of the starting policy (answers: their text)."""
        raw_h, raw_s = self.raw(samples)
        self.calibration["helpful_offset"] = -raw_h.median().item()
        unsafe_answer = torch.tensor([p.task is not None and not S.is_safe(p.task, a)   # the annotator's label
                                      for p, a in zip(prompts, answers)])
        cut = raw_s[~unsafe_answer].quantile(FALSE_FLAGS).item()
        self.calibration["safety_offset"] = logit(torch.tensor(SAFETY_THRESHOLD)).item() - cut
        self.calibration.update(mean=0.0, std=1.0)
        logit_rc = logit(self(samples, prompts)["rc"])
        self.calibration.update(mean=logit_rc.mean().item(), std=logit_rc.std().item(),
                                unsafe_answers=int(unsafe_answer.sum()), samples=len(samples))
        return self.calibration


def calibrate_reward(args, reward, model, tokenizer, source, device):
    """Reward.calibrate on one sample each of --calibration-prompts prompts of the start model:
    -> the calibration, rank 0's on every rank."""
    prompts = draw_prompts(source, args.calibration_prompts, args.seed * 1000 - 1, args.safety_share)
    samples = sample_answers(model, tokenizer, prompts, 1, args.max_new_tokens, args.rs_temperature,
                             torch.Generator(device=device).manual_seed(args.seed), args.sample_batch,
                             args.compile_decode)
    calibration = reward.calibrate(samples, prompts, [tokenizer.decode(a).strip() for _, a, _ in samples])
    if args.world_size > 1:   # one calibration for all ranks: rank 0's
        keys = ("helpful_offset", "safety_offset", "mean", "std")
        numbers = torch.tensor([calibration[k] for k in keys], device=device)
        dist.broadcast(numbers, 0)
        calibration.update(zip(keys, numbers.tolist()))
    return calibration


# ========================================================================================
# 4. The loop. Rollouts first: 02's generate samples them; a rollout batch is laid out with
#    prompts left-padded and answers right-padded, so every answer starts at the same column
#    `start`; `real` marks real tokens (a pad id distinct from EOS, so padding is never read as
#    an end), `mask` the answer tokens that count: up to and including the EOS.

def sample_answers(model, tokenizer, prompts, n: int, max_new: int, temperature: float, generator,
                   batch_size: int = 64, compile: bool = False):
    """n answers per prompt (consecutive), as (token ids, finished). 02's generate (batched, KV
    cache; with compile, its compiled decoding step: --compile-decode) at top-p 1, so PPO's
    log-probs are those of the distribution sampled from. generate drops the EOS: an answer
    shorter than the room it had (the same for a whole batch) ended with one, so it is put back."""
    ids = [S.encode_dialog(tokenizer, p.dialog)[0] for p in prompts for _ in range(n)]
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        room = min(model.args.max_seq_len - max(map(len, chunk)), max_new)
        for p, g in zip(chunk, M.generate(model, chunk, max_new, temperature, 1.0, tokenizer.eos_id, generator,
                                           compile)):
            finished = len(g) < room
            out.append((p, g + [tokenizer.eos_id] * finished, finished))
    return out   # [(prompt ids, answer ids, finished)]


def rollout_batch(samples, pad_id: int, device):
    """-> (tokens, real, mask, start): start is the column where every answer begins."""
    width_p = max(len(p) for p, _, _ in samples)
    width_a = max(len(a) for _, a, _ in samples)
    tokens = torch.full((len(samples), width_p + width_a), pad_id, dtype=torch.long)
    real = torch.zeros_like(tokens, dtype=torch.bool)
    for i, (p, a, _) in enumerate(samples):
        tokens[i, width_p - len(p):width_p + len(a)] = torch.tensor(p + a)
        real[i, width_p - len(p):width_p + len(a)] = True
    return tokens.to(device), real.to(device), real[:, width_p:].float().to(device), width_p


def answer_logprobs(model, tokens, real, start: int, temperature: float):
    """log pi(token | prefix) of each answer token, from logits divided by the sampling
    temperature (else the ratio and the KL are those of another distribution: PAPER.md's pitfall)."""
    answer = torch.zeros_like(real)
    answer[:, start - 1:-1] = True   # the positions that predict answer tokens: only their logits are computed
    logits = model(tokens, mask=R.pad_attention_mask(real), logits_at=answer)
    logits = logits.view(len(tokens), tokens.shape[1] - start, -1) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, start:, None]).squeeze(-1)


def answer_values(value_model, tokens, real, start: int):
    """V(s_t) for each answer token t, read at the token before it (the state it is chosen in)."""
    return value_model(tokens, real, per_token=True)[:, start - 1:-1]


def rs_round(args, model, path, tokenizer, reward, source, pool, rnd, rank, device, log):
    """One RS round: K samples for fresh prompts; the best of each joins the pool if it beats
    what the pool holds for that prompt; then fine-tune on the whole pool. -> the round's stats.
    model: the sampler, loaded from `path` in the compute dtype; the fine-tuning trains fp32
    weights: the sampler itself when it is fp32 (a CPU), else `path` loaded again in fp32."""
    t0 = time.time()
    prompts = draw_prompts(source, args.rs_prompts, rs_seed(args, rnd), args.safety_share)[rank::args.world_size]
    generator = torch.Generator(device=device).manual_seed(rs_seed(args, rnd))
    model.eval()
    samples = sample_answers(model, tokenizer, prompts, args.rs_k, args.max_new_tokens, args.rs_temperature,
                             generator, args.sample_batch, args.compile_decode)
    t_gen = time.time() - t0
    repeated = [p for p in prompts for _ in range(args.rs_k)]
    scores = reward(samples, repeated)["score"].view(len(prompts), args.rs_k)
    gold = gold_of(tokenizer, repeated, samples).view(len(prompts), args.rs_k)
    best, best_score = best_of_k(scores)
    new = [(p.dialog, tokenizer.decode(samples[i * args.rs_k + k][1]).strip(), s.item())
           for i, (p, k, s) in enumerate(zip(prompts, best.tolist(), best_score))]
    if args.world_size > 1:   # every rank trains on the whole pool
        gathered = [None] * args.world_size
        dist.all_gather_object(gathered, new)
        new = [x for part in gathered for x in part]
    add_to_pool(pool, new)
    t_score = time.time() - t0 - t_gen
    log(f"\n== RS round {rnd + 1}/{args.rs_iterations}: {len(prompts) * args.world_size} prompts x "
        f"{args.rs_k} samples at T={args.rs_temperature:g} in {t_gen:.0f}s | reward: mean {scores.mean():.3f}, "
        f"best-of-{args.rs_k} {best_score.mean():.3f} | gold: mean {gold.nanmean():.3f}, of the best "
        f"{gold.gather(1, best[:, None]).nanmean():.3f} | pool {len(pool)} answers ==")

    # the SFT objective on the pool: 04's packing and masked loss, driven by 03's loop (run_sft)
    examples = [S.encode_dialog(tokenizer, d + [{"role": "assistant", "content": a}]) for d, a, _ in pool.values()]
    random.Random(rnd).shuffle(examples)
    n_val = max(1, len(examples) // 50)
    rows, val_rows = (S.pack(e, args.seq_len, reward.pad_id) for e in (examples[n_val:], examples[:n_val]))
    cfg = copy.copy(args)
    cfg.steps = max(1, round(args.rs_epochs * len(rows[0]) / (args.batch_tokens // args.seq_len)))
    cfg.resume, cfg.stop_at, cfg.ckpt_every = False, None, cfg.steps   # rs.pt is written at the round's end
    trainee = model if model.output.weight.dtype == torch.float32 else \
        M.Transformer.from_pretrained(path, P.build_device(args, device))   # under --fsdp, train() shards it
    trainee.train()
    S.run_sft(cfg, trainee, rows, val_rows, args.run_dir / "rs.pt", rank, device)
    if args.world_size > 1:   # rank 0 wrote rs.pt: the others read it next
        dist.barrier()
    return dict(round=rnd + 1, mean_score=scores.mean().item(), best_score=best_score.mean().item(),
                mean_gold=gold.nanmean().item(), best_gold=gold.gather(1, best[:, None]).nanmean().item(),
                pool=len(pool), rs_steps=cfg.steps, gen_s=t_gen, score_s=t_score,
                train_s=time.time() - t0 - t_gen - t_score)


def ppo_step(args, policy, value_model, ref, reward, rollout_policy, tokenizer, prompts, seed, opts, wrapped, amp,
             train_policy=True):
    """One PPO iteration: rollouts, their rewards and advantages, then one gradient step per
    mini-batch (of the value model only, while train_policy is False). -> the log entry.
    The policy goes by three handles, one set of weights: `policy` the plain module (its optimizer,
    its checkpoint), `rollout_policy` what samples (the policy itself, or under FSDP a full copy of
    it), and wrapped = (policy, value model) as their training forward is called (torch.compile,
    DDP; or the models themselves). ref is the frozen reference pi_0; opts the two optimizers."""
    wrapped_policy, wrapped_value = wrapped
    t0, device = time.time(), next(policy.parameters()).device
    rollout_policy.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = sample_answers(rollout_policy, tokenizer, prompts, 1, args.max_new_tokens, args.ppo_temperature,
                             generator, args.sample_batch, args.compile_decode)
    t_gen = time.time() - t0

    # Score and evaluate the old policy, the reference and the values, in the micro-batches the
    # first update will use (same rows, same shapes): its ratio is then exactly 1.
    judged = reward(samples, prompts)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    samples, prompts = [samples[i] for i in order], [prompts[i] for i in order]
    score = judged["score"][order].to(device)
    tokens, real, mask, start = rollout_batch(samples, reward.pad_id, device)
    chunks = [slice(i, i + args.ppo_micro_batch) for i in range(0, len(samples), args.ppo_micro_batch)]
    T = args.ppo_temperature
    with torch.no_grad(), amp():
        old_logp = torch.cat([answer_logprobs(wrapped_policy, tokens[c], real[c], start, T) for c in chunks])
        ref_logp = torch.cat([answer_logprobs(ref, tokens[c], real[c], start, T) for c in chunks])
        old_values = torch.cat([answer_values(wrapped_value, tokens[c], real[c], start).float() for c in chunks])
    rewards, kl = kl_rewards(old_logp, ref_logp, score, mask, args.kl_beta)
    advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, mask)   # over the batch's valid tokens
    t_score = time.time() - t0 - t_gen

    policy.train(), value_model.train()
    per_mini = args.ppo_mini_batch // args.world_size // args.ppo_micro_batch   # micro-batches per step
    logs = []
    for epoch in range(args.ppo_epochs):
        if epoch:   # later epochs reshuffle the micro-batches
            shuffle = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed + epoch))
            chunks = [chunks[i] for i in shuffle]
        for group in [chunks[i:i + per_mini] for i in range(0, len(chunks), per_mini)]:   # a mini-batch
            for c in group:
                with amp():
                    logp = answer_logprobs(wrapped_policy, tokens[c], real[c], start, T)
                    pg_loss, stats = ppo_policy_loss(logp, old_logp[c], advantages[c], mask[c], args.clip_eps)
                    values = answer_values(wrapped_value, tokens[c], real[c], start).float()
                    v_loss = value_loss(values, old_values[c], returns[c], mask[c], args.value_clip)
                if train_policy:
                    (pg_loss / len(group)).backward()
                (v_loss / len(group)).backward()
                logs.append(dict(policy_loss=pg_loss.item(), value_loss=v_loss.item(), **stats))
            if train_policy:
                clip_and_step(policy, opts[0], args.grad_clip)
            clip_and_step(value_model, opts[1], args.grad_clip)
    mean = lambda key: sum(x[key] for x in logs) / len(logs)
    return dict(reward=score.mean().item(), rc=judged["rc"].mean().item(), kl=kl.mean().item(),
                **rollout_stats(tokenizer, prompts, samples),
                answer_len=mask.sum(1).mean().item(), finished=sum(f for *_, f in samples) / len(samples),
                **{k: mean(k) for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "ratio")},
                **{f"first_{k}": logs[0][k] for k in ("ratio", "approx_kl", "max_log_ratio")},
                gen_s=t_gen, score_s=t_score, train_s=time.time() - t0 - t_gen - t_score)


def clip_and_step(model, opt, grad_clip: float):
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_ppo(args, policy, value_model, ref, reward, source, tokenizer, state, rank, device, log):
    """PPO's loop: 03's optimizer, DDP or FSDP and checkpoints (set up in section 6), with
    rollouts in each iteration. -> the history, an entry per iteration."""
    ckpt_path, world_size = args.run_dir / "ppo.pt", args.world_size
    checkpointing = args.activation_checkpointing   # the PPO update's graphs: block inputs only (03's flag)
    if args.fsdp:
        rollout_policy = shard_for_fsdp(policy, value_model, M.pick_dtype(args.dtype, device), checkpointing, device)
    else:
        rollout_policy = policy
        for model in (policy, value_model):
            P.checkpoint_blocks(model, checkpointing)
    opts = ppo_optimizers(args, policy, value_model, device)
    it, history = 0, []
    if args.resume and P.checkpoint_exists(ckpt_path, args):
        it, history = resume_ppo(ckpt_path, policy, value_model, opts, args, log)
    log(f"\n== PPO: {args.ppo_iterations} iterations of {args.ppo_prompts} rollouts, mini-batch "
        f"{args.ppo_mini_batch}, LR {args.ppo_lr:g} (value {args.value_lr:g}, alone for {args.value_warmup} "
        f"iterations), beta {args.kl_beta:g}, clip {args.clip_eps:g}, GAE gamma {args.gamma:g} lambda {args.lam:g} ==")
    wrapped = wrap_for_training(args, (policy, value_model), device)
    amp_dtype = M.pick_dtype(args.dtype, device)
    # autocast's cache of bf16 weights off under checkpointing, as in 03's train: it would keep a
    # whole bf16 copy of each model alive through the update
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32,
                                 cache_enabled=not checkpointing)
    end, t_start, it_started = min(args.ppo_iterations, args.stop_at or args.ppo_iterations), time.time(), it
    while it < end:
        if args.fsdp:   # the rollout copy gets the trained weights (a collective: every rank calls it)
            refresh_rollout_policy(rollout_policy, policy)
        seed = ppo_seed(args, it)   # rollouts are a pure function of it: resume is exact
        prompts = draw_prompts(source, args.ppo_prompts, seed, args.safety_share)[rank::world_size]
        entry = ppo_step(args, policy, value_model, ref, reward, rollout_policy, tokenizer, prompts,
                         seed * world_size + rank, opts, wrapped, amp, train_policy=it >= args.value_warmup)
        if world_size > 1:   # the mean over ranks
            summed = torch.tensor(list(entry.values()), dtype=torch.float64, device=device)
            dist.all_reduce(summed)
            entry = dict(zip(entry, (summed / world_size).tolist()))
        it += 1
        history.append(dict(iteration=it, **entry))
        eta = (time.time() - t_start) / (it - it_started) * (end - it)
        log(f"ppo {it:>4}/{args.ppo_iterations} | reward {entry['reward']:+.3f} | KL {entry['kl']:.3f} | gold "
            f"{entry['gold']:.3f}, careless {entry['careless']:.2f} | refuses harmful "
            f"{entry['refusal_harmful']:.2f}, benign {entry['false_refusal_benign']:.2f} | loss pi "
            f"{entry['policy_loss']:+.4f} V {entry['value_loss']:.4f} | "
            f"clip {entry['clip_frac']:.3f} | gen/score/train {entry['gen_s']:.1f}/{entry['score_s']:.1f}/"
            f"{entry['train_s']:.1f}s | ETA {P.fmt_time(eta)}")
        if it % args.ppo_ckpt_every == 0 or it == end:
            save_ppo(ckpt_path, policy, value_model, opts, args, it, history, state)
    return history


@dataclass
class Run:
    """What a run's phases share, made once by main (section 6)."""
    tokenizer: tok.Tokenizer
    reward: Reward
    source: object        # the toy world (P.World), or the prompts of --prompts
    tasks: list           # held-out toy tasks of the final tables (none with --prompts)
    red_tasks: list       # held-out red-team tasks
    paths: dict           # tokenizer, init, rm_helpful, rm_safety
    frozen_dtype: torch.dtype
    rank: int
    device: torch.device
    log: object


def run_rlhf(args, run: Run, state: dict):
    """The chapter's run, as the paper's RLHF-V5: calibrate the reward on the start model, draw
    Figures 7 and 8 from it, the RS rounds, then PPO from the RS model; the held-out tables after
    each phase. state: what a resumed run has done already (it travels in rs.pt and ppo.pt).
    -> PPO's history, or None when --stop-at stopped it."""
    log, device = run.log, run.device
    rs_path, ppo_path = args.run_dir / "rs.pt", args.run_dir / "ppo.pt"
    # every sampler computes in the compute dtype, as autocast would (bf16 on a GPU: half the weights
    # of an fp32 copy, and a bf16 KV cache); training keeps fp32 weights (rs_round, PPO's policy)
    model = M.Transformer.from_pretrained(run.paths["init"], device=device, dtype=run.frozen_dtype)
    if model.args.vocab_size != run.tokenizer.n_words:
        raise UserError(f"{run.paths['init']} has a vocabulary of {model.args.vocab_size}, "
                        f"the tokenizer {run.tokenizer.n_words}")
    if "calibration" not in state:   # a resumed run keeps its calibration: a reward means the same throughout
        t0 = time.time()
        calibration = state["calibration"] = calibrate_reward(args, run.reward, model, run.tokenizer, run.source,
                                                              device)
        state["results"]["SFT"] = evaluate(args, run, model)
        log(f"reward calibrated on {calibration['samples']} samples of {run.paths['init']} in "
            f"{time.time() - t0:.0f}s: helpfulness offset {calibration['helpful_offset']:+.2f}, "
            f"safety offset {calibration['safety_offset']:+.2f} "
            f"({calibration['unsafe_answers']} unsafe answers), LOGIT({'Rc' if run.reward.combine else 'Rh'}) "
            f"mean {calibration['mean']:+.2f} "
            f"std {calibration['std']:.2f} | SFT held-out gold {held_out_gold(state['results']['SFT'])}")
    run.reward.calibration = state["calibration"]

    # Figures 7 and 8 (best of N samples of the start model), then the rejection sampling rounds.
    # Every rank draws a share of the prompts (under FSDP each call of the sharded RMs is a
    # collective that all ranks join)
    if args.fig_n and not state["figures"]:
        t0 = time.time()
        state["figures"] = best_of_n_figures(args, model, run.tokenizer, run.reward, run.source, device,
                                             (run.rank, args.world_size))
        log(f"Figures 7 and 8: {args.fig_prompts} prompts x {args.fig_n} samples at each of "
            f"{len(state['figures']['temperature'])} temperatures in {time.time() - t0:.0f}s")
    done = len(state["rs"])
    if done:
        model = M.Transformer.from_pretrained(rs_path, device=device, dtype=run.frozen_dtype)
    for rnd in range(done, args.rs_iterations):
        state["rs"].append(rs_round(args, model, rs_path if rnd else run.paths["init"], run.tokenizer, run.reward,
                                    run.source, state["pool"], rnd, run.rank, device, log))
        # the plain, trained model, from the file (under FSDP the trained one is sharded)
        model = M.Transformer.from_pretrained(rs_path, device=device, dtype=run.frozen_dtype)
        if rnd == args.rs_iterations - 1:
            state["results"]["+RS"] = evaluate(args, run, model)
            log(f"after RS: held-out gold {held_out_gold(state['results']['+RS'])}")
        if run.rank == 0:   # the round's state joins rs.pt, so --resume continues from the next round
            M.save_atomic({**M.load_checkpoint(rs_path), "rs_ppo": state, "kind": "rs"}, rs_path)

    # PPO from the RS (or SFT) model: a frozen copy is the reference; the value model starts
    # from the Helpfulness RM (common practice: it already reads answers for their worth)
    history = []
    if args.ppo_iterations > 0:
        del model   # the RS (or start) model was evaluated; PPO loads its own copies
        ppo_init = rs_path if args.rs_iterations else run.paths["init"]
        # under FSDP the models are read into host memory and fully_shard moves each rank's shards
        # to the device: no whole model on a GPU (run_ppo shards the policy and the value model)
        build = P.build_device(args, device)
        ref = M.Transformer.from_pretrained(ppo_init, device=build, dtype=run.frozen_dtype, lazy=args.fsdp)
        if args.fsdp:   # frozen, it only runs forward: 1/world_size of it a rank, as the policy
            P.shard_model(ref)
        policy = M.Transformer.from_pretrained(ppo_init, device=build).train()
        value_model = R.RewardModel.from_pretrained(run.paths["rm_helpful"], build).train()
        torch.manual_seed(args.seed)
        history = run_ppo(args, policy, value_model, ref, run.reward, run.source, run.tokenizer, state, run.rank,
                          device, log)
        del policy, ref, value_model   # the evaluation below holds ppo.pt alone
        if args.world_size > 1:
            dist.barrier()
        if args.stop_at and len(history) < args.ppo_iterations:
            log(f"stopped at PPO iteration {len(history)}; continue with --resume")
            return None
        state["results"]["+PPO"] = evaluate(args, run, M.Transformer.from_pretrained(ppo_path, device=device,
                                                                                     dtype=run.frozen_dtype))
    return history


# ========================================================================================
# 5. Evaluation and figures: the held-out tables (04's annotators), Figures 7 and 8 (best of N
#    samples of the start model), PPO's curves, rs_ppo.json.

EVAL_SAMPLES = 4          # answers per held-out prompt when the policy is evaluated as sampled


def evaluate(args, run: Run, model):
    """04's table on held-out prompts, greedy and sampled as PPO samples; and refusals of
    held-out red-team prompts. {} without toy prompts."""
    if not run.tasks:
        return {}
    # the model is whole on every rank (a sampler copy): each rank answers a share of the prompts
    chat = functools.partial(S.evaluate_chat, model, run.tokenizer, compile=args.compile_decode,
                             batch_size=args.sample_batch, part=(run.rank, args.world_size))
    red_team = chat(run.red_tasks)
    sampled = chat(run.tasks, temperature=args.ppo_temperature, samples=EVAL_SAMPLES, seed=args.seed)
    return {**chat(run.tasks),
            **{f"sampled_{k}": v for k, v in sampled.items() if k != "examples"},
            **{f"red_team_{k}": v for k, v in red_team.items() if "refusal" in k or k == "per_prompt"}}


def held_out_gold(result):
    return (f"{result['sampled_gold']:.3f} sampled ({result['sampled_careless']:.1%} careless), "
            f"{result['gold']:.3f} greedy" if result else "n/a (no toy prompts)")


def gold_of(tokenizer, prompts, samples):
    return torch.tensor([S.gold_score(p.task, tokenizer.decode(a).strip()) if p.task else float("nan")
                         for p, (_, a, _) in zip(prompts, samples)])


def rollout_stats(tokenizer, prompts, samples):
    """The toy annotator on the rollouts: gold helpfulness, careless answers, refusals of harmful
    and benign prompts."""
    graded = [(p.task, tokenizer.decode(a).strip()) for p, (_, a, _) in zip(prompts, samples) if p.task]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return dict(gold=mean([S.gold_score(t, a) for t, a in graded if t.kind != "harmful"]),
                careless=mean([S.is_careless(a) for _, a in graded]),
                refusal_harmful=mean([S.is_refusal(a) for t, a in graded if t.kind == "harmful"]),
                false_refusal_benign=mean([S.is_refusal(a) for t, a in graded if t.kind == "benign"]))


def best_of_n_curves(scores, gold=None, orders: int = 20, seed: int = 0):
    """scores (prompts, N) of N samples each -> for n = 1..N the max and the median of n samples
    (Figure 7), and the gold score of the sample the max picks: each the mean over prompts and
    over `orders` random orders of the samples (the first n of an order are a random n)."""
    g, (n_prompts, N) = torch.Generator().manual_seed(seed), scores.shape
    out = dict(n=list(range(1, N + 1)), max=[0.0] * N, median=[0.0] * N, gold_of_max=[0.0] * N)
    for _ in range(orders):
        order = torch.rand(n_prompts, N, generator=g).argsort(dim=1)
        s = scores.gather(1, order)
        for n in range(1, N + 1):
            pick = s[:, :n].argmax(1, keepdim=True)
            out["max"][n - 1] += s[:, :n].max(1).values.mean().item() / orders
            out["median"][n - 1] += s[:, :n].quantile(0.5, dim=1).mean().item() / orders
            if gold is not None:
                out["gold_of_max"][n - 1] += gold.gather(1, order)[:, :n].gather(1, pick).mean().item() / orders
    return out


def best_of_n_figures(args, model, tokenizer, reward, source, device, part=(0, 1)):
    """Figures 7 and 8 from real samples of the start model: --fig-n answers to each of
    --fig-prompts prompts at each temperature (the same random numbers at each). part=(rank,
    ranks): each rank samples and scores its share of the prompts (prompt i on rank i % ranks,
    with its own random numbers; the sharded RMs as many batches on every rank), and every rank
    gets every prompt's scores back (03's gather_shares) and the same curves."""
    rank, ranks = part
    drawn = draw_prompts(source, args.fig_prompts, args.seed * 1000 + 999, args.safety_share)
    prompts = drawn[rank::ranks]
    repeated = [p for p in prompts for _ in range(args.fig_n)]
    batches = -(-(-(-len(drawn) // ranks) * args.fig_n) // R.SCORE_BATCH)   # the largest share's
    temperatures = {float(t) for t in args.fig_temperatures.split(",") if t.strip()} | {args.rs_temperature}
    by_temperature = {}
    for t in sorted(temperatures):
        samples = sample_answers(model, tokenizer, prompts, args.fig_n, args.max_new_tokens, t,
                                 torch.Generator(device=device).manual_seed(args.seed + rank), args.sample_batch,
                                 args.compile_decode)
        scores = reward(samples, repeated, batches)["score"].view(len(prompts), args.fig_n)
        gold = gold_of(tokenizer, repeated, samples).view(len(prompts), args.fig_n) if drawn[0].task else None
        if ranks > 1:   # each prompt's row of scores (and gold) back, in the prompts' order
            gold_rows = gold.tolist() if gold is not None else [None] * len(prompts)
            rows = P.gather_shares(list(zip(scores.tolist(), gold_rows)), len(drawn))
            scores = torch.tensor([r for r, _ in rows])
            gold = torch.tensor([g for _, g in rows]) if gold is not None else None
        by_temperature[f"{t:g}"] = best_of_n_curves(scores, gold)
    return dict(best_of_n=by_temperature[f"{args.rs_temperature:g}"], temperature=by_temperature)


def plot_best_of_n(path, curves, temperature):
    plt = P.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(curves["n"], curves["max"], marker="o", label="max of N")
    ax.plot(curves["n"], curves["median"], marker="o", label="median of N")
    ax.fill_between(curves["n"], curves["median"], curves["max"], alpha=0.15, label="what RS can gain")
    ax.set(xlabel="N samples per prompt", ylabel="reward (whitened)",
           title=f"Best of N samples of the start model, T={temperature:g} (cf. Figure 7)")
    ax.legend(fontsize=8, loc="upper left")
    if any(curves["gold_of_max"]):   # does the reward's pick get better by the annotator too?
        gold = ax.twinx()
        gold.plot(curves["n"], curves["gold_of_max"], ls="--", color="grey", label="gold score of the max (right)")
        gold.set_ylabel("gold score (toy annotator)")
        gold.legend(fontsize=8, loc="lower right")
    P.save_figure(plt, fig, path)


def plot_temperatures(path, by_temperature):
    plt = P.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for t, curves in sorted(by_temperature.items(), key=lambda kv: float(kv[0])):
        ax.plot(curves["n"], curves["max"], marker="o", ms=3, label=f"T={float(t):g}")
    ax.set(xlabel="N samples per prompt", ylabel="max reward among N",
           title="Best of N against the sampling temperature (cf. Figure 8)")
    ax.legend(fontsize=8)
    P.save_figure(plt, fig, path)


def plot_ppo(path, history):
    plt = P.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    it = [h["iteration"] for h in history]
    real = lambda w: [x for x in w if not math.isnan(x)] or [math.nan]   # an iteration may have no harmful prompt
    smooth = lambda xs: [sum(real(w)) / len(real(w)) for w in (xs[max(0, i - 4):i + 1] for i in range(len(xs)))]
    for ax, keys, title in ((axes[0], ("reward",), "reward (whitened RM score)"),
                            (axes[1], ("gold", "careless", "refusal_harmful", "false_refusal_benign"),
                             "toy annotator (gold)"),
                            (axes[2], ("kl",), "KL to the reference (nats per answer)")):
        for i, key in enumerate(keys):   # each iteration's rollouts, thin; the mean of the last 5, bold
            values = [h[key] for h in history]
            ax.plot(it, values, color=f"C{i}", alpha=0.3, lw=1)
            ax.plot(it, smooth(values), color=f"C{i}", lw=2, label=key.replace("_", " "))
        ax.set(xlabel="PPO iteration", title=title)
        ax.legend(fontsize=8)
    fig.suptitle("PPO on the rollouts: reward up with gold flat would mean the RM is being gamed")
    P.save_figure(plt, fig, path)


def report(args, run: Run, state, history, t_start):
    """Rank 0: the held-out tables, the figures and rs_ppo.json."""
    results = {k: v for k, v in state["results"].items() if v}
    if results:
        S.print_table(results, title="greedy")
        S.print_table(results, "sampled_", f"sampled, T={args.ppo_temperature:g}")
        print(f"\n{'model':<18}{'red-team prompts: refuses harmful':>36}{'refuses benign':>16}")
        for name, r in results.items():
            print(f"{name:<18}{r['red_team_refusal_harmful']:>36.3f}{r['red_team_false_refusal_benign']:>16.3f}")
    figures, wrote = state["figures"], ["rs.pt"] * bool(state["rs"]) + ["ppo.pt"] * bool(history)
    if "best_of_n" in figures:
        plot_best_of_n(args.run_dir / "rs_best_of_n.png", figures["best_of_n"], args.rs_temperature)
        wrote.append("rs_best_of_n.png")
    if figures.get("temperature"):
        plot_temperatures(args.run_dir / "rs_temperature.png", figures["temperature"])
        wrote.append("rs_temperature.png")
    if history:
        plot_ppo(args.run_dir / "ppo_curves.png", history)
        wrote.append("ppo_curves.png")
    split = {k: sum(x[k] for x in state["rs"] + history) for k in ("gen_s", "score_s", "train_s")}
    tok.write_json(args.run_dir / "rs_ppo.json", dict(
        config=vars(args), calibration=state["calibration"], results=results, rs_rounds=state["rs"],
        ppo=history, figures=figures, time_split=split, wall_s=time.time() - t_start,
        overlap=S.overlap([t.prompt for t in run.tasks + run.red_tasks],
                          S.user_messages(p.dialog for p in training_prompts(args, run.source)))))
    run.log(f"\nwall {P.fmt_time(time.time() - t_start)} (RS and PPO: generating {split['gen_s']:.0f}s, scoring "
            f"{split['score_s']:.0f}s, training {split['train_s']:.0f}s) | wrote {', '.join(wrote + ['rs_ppo.json'])} "
            f"in {args.run_dir}")


# ========================================================================================
# 6. Plumbing: FSDP, DDP and compile for PPO, its optimizers, checkpoint and resume; prompts
#    files; the command line.

def shard_for_fsdp(policy, value_model, dtype, checkpointing: bool = False, device=None):
    """FSDP2: the policy and the value model train sharded, each block's weights 1/world per rank.
    -> a full copy of the policy for sampling, on `device` (default: the policy's): generation
    calls the model once per token, a different number of times on each rank, which a sharded
    forward cannot do. The copy is in the compute dtype (bf16 on a GPU: half an fp32 copy, and its
    KV cache bf16 too), as autocast would compute; PPO's log-probs come from the trained policy,
    not from this copy. It is allocated empty: refresh_rollout_policy fills it before each
    iteration's rollouts. The two models may come in host memory: fully_shard moves each rank's
    shards to the device, a block at a time, so no whole model ever sits there.
    checkpointing: --activation-checkpointing on the two trained models (before they are sharded,
    as in 03's train), not on the copy, which never computes gradients."""
    device = device or next(policy.parameters()).device
    rollout_policy = M.meta_model(policy.args).to(dtype).to_empty(device=device).eval()
    for model in (policy, value_model):
        P.checkpoint_blocks(model, checkpointing)
        P.shard_model(model)
    return rollout_policy


@torch.no_grad()
def refresh_rollout_policy(rollout_policy, policy):
    """The full copy gets the sharded policy's trained weights, one weight at a time (each
    full_tensor() is a collective: every rank calls them in the same order). A full state dict
    would gather every fp32 weight at once on every rank (27 GB at 7B); this holds one at a time."""
    sampled = dict(rollout_policy.named_parameters())
    for name, param in policy.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param   # a DTensor shard, or whole
        sampled[name].copy_(full)   # cast to the copy's dtype


def ppo_optimizers(args, policy, value_model, device):
    """03's AdamW for the policy and the value model, each at its constant LR."""
    betas = (args.beta1, args.beta2)
    opts = [P.configure_optimizer(m, lr, args.weight_decay, betas, args.adam_eps, device)
            for m, lr in ((policy, args.ppo_lr), (value_model, args.value_lr))]
    # A step at LR 0, on zero gradients, before any real one. Why: AdamW makes its state (moments,
    # step count) at its first step, and torch's checkpoint functions (save_ppo, resume_ppo) make
    # it by such a step when there is none, as for a policy still frozen by the value warm-up. A
    # run resumed from a checkpoint would then have taken one step more than a run never stopped;
    # taking it here, in every run, makes resume exact. Its cost: the step count starts at 1 with
    # zero moments, so Adam's bias correction counts a gradient of zero, and the first real update
    # is sqrt(1 + beta2) / (1 + beta1) of the usual one, 0.735 at the paper's 0.9, 0.95 (measured
    # with torch's AdamW on gradients far above eps: 0.734, then 0.85, 0.90, 0.93, 0.95 at the next
    # steps, on to 1). The weights do not move (LR 0, so no weight decay either).
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = opt.defaults["lr"]
    return opts


def wrap_for_training(args, models, device):
    """The models as their training forward is called: torch.compile'd with --compile, under DDP
    when there are ranks and no FSDP; the plain modules stay what is saved."""
    wrapped = [torch.compile(m) if args.compile else m for m in models]
    if args.world_size > 1 and not args.fsdp:
        wrapped = [torch.nn.parallel.DistributedDataParallel(w, device_ids=[device] if device.type == "cuda" else None)
                   for w in wrapped]
    return wrapped


def save_ppo(path, policy, value_model, opts, args, it, history, state):
    """03's checkpoint of the policy (ppo.pt loads as a plain model), with the value model. With
    --sharded-checkpoint each rank writes its shards of both (ppo.dcp/, ppo_value.dcp/), and ppo.pt
    holds the finished policy's weights alone."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    extra = {"kind": "ppo", "rs_ppo": state}
    if args.sharded_checkpoint:
        P.save_checkpoint(path, policy, opts[0], args, it, history, extra, finished=it == args.ppo_iterations)
        P.save_sharded(value_checkpoint(path), value_model, opts[1], {"step": it})
        return
    value_state, value_opt = get_state_dict(value_model, opts[1],
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    P.save_checkpoint(path, policy, opts[0], args, it, history,
                      extra={**extra, "value_model": value_state, "value_optimizer": value_opt})


def value_checkpoint(path) -> Path:
    """Where --sharded-checkpoint keeps the value model's shards beside the policy's: ppo_value.dcp."""
    return Path(path).with_name(Path(path).stem + "_value.dcp")


def resume_ppo(path, policy, value_model, opts, args, log):
    """save_ppo's checkpoint back: the policy and its optimizer by 03, then the value model.
    -> (iterations done, history)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    it, history = P.load_training_state(path, policy, opts[0], args)
    if args.sharded_checkpoint:
        saved = M.load_checkpoint(value_checkpoint(path) / "meta.pt").get("step")
        if saved != it:   # the save was cut off between the two models
            raise UserError(f"{value_checkpoint(path)} holds the value model of iteration {saved}, the policy's "
                            f"shards are of iteration {it}: run again without --resume")
        P.load_sharded(value_checkpoint(path), value_model, opts[1])
    else:
        ckpt = M.load_checkpoint(path)
        set_state_dict(value_model, opts[1], model_state_dict=ckpt["value_model"],
                       optim_state_dict=ckpt["value_optimizer"], options=StateDictOptions(full_state_dict=True))
    log(f"resumed at iteration {it} from {P.sharded_path(path) if args.sharded_checkpoint else path}")
    return it, history


def resumed_state(args):
    """What a resumed run has done: the state saved in ppo.pt, else in the last finished RS
    round's rs.pt, else nothing. Keys: calibration, results, rs (rounds), pool, figures."""
    ppo = args.run_dir / "ppo.pt"
    paths = (P.sharded_path(ppo) / "meta.pt" if args.sharded_checkpoint else ppo, args.run_dir / "rs.pt")
    resumed = next((M.load_checkpoint(p) for p in paths if args.resume and p.is_file()), {})
    return resumed.get("rs_ppo") or dict(results={}, rs=[], pool={}, figures={})


def read_prompts(path):
    """A prompts file: {"prompt": ..., "unsafe": true|false} a line, "unsafe" the prompt's IS_SAFETY."""
    out = []
    for where, record in S.read_jsonl(path):
        if not isinstance(record, dict) or "prompt" not in record:
            raise UserError(f"{where}: expected an object with 'prompt' (and optional 'unsafe')")
        is_safety = record.get("unsafe", False)
        if not isinstance(is_safety, bool):   # bool("no") is True: a helpful prompt would be scored for safety
            raise UserError(f"{where}: 'unsafe' must be true or false (a JSON boolean), got {is_safety!r:.40}")
        out.append(Prompt(R.read_prompt(record["prompt"], where), is_safety))
    if not out:
        raise UserError(f"{path}: no prompts in it")
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    P.add_training_args(parser, PAPER, TOY)   # 03's flags; those of the loop apply to the RS fine-tuning
    add = parser.add_argument
    show = lambda v: ", ".join(f"{k} {x:g}" for k, x in v.items()) if isinstance(v, dict) else f"{v:g}"
    for key, (paper, toy, help) in BUDGET.items():   # a count of 0 skips a phase; a rate must be positive
        flag = "--" + key.replace("_", "-")
        bound = dict(at_least=0) if key in ("rs_iterations", "ppo_iterations", "value_warmup", "kl_beta") else \
            dict(above=0) if type(toy) is float else dict(at_least=1)
        add(flag, type=tok.number_flag(flag, type(toy), **bound),
            help=f"{help} [full scale: {show(paper)}; CPU: {show(toy)}]")
    add("--init", help="chat model to start from (default RUN_DIR/sft.pt)")
    add("--rm-helpful", type=Path, help="Helpfulness RM (default RUN_DIR/rm_helpful.pt); the value model's start")
    add("--rm-safety", type=Path, help="Safety RM (default RUN_DIR/rm_safety.pt)")
    add("--tokenizer", type=Path, help="SentencePiece model (default RUN_DIR/tokenizer.model)")
    add("--prompts", type=Path, help="prompts (JSONL) instead of the toy world's; no gold score then")
    add("--reward", default="combined", choices=("combined", "helpful"),
        help="RS's and PPO's judge: the paper's Rc of both RMs (default), or the Helpfulness RM alone, "
             "to see what Rc prevents")
    add("--safety-share", type=tok.number_flag("--safety-share", float, at_least=0, at_most=1), default=0.2,
        help="toy prompts: the share of safety ones (harmful or benign)")
    add("--ppo-temperature", type=tok.number_flag("--ppo-temperature", float, above=0), default=1.0,
        help="PPO rollout temperature (the log-probs use it too)")
    add("--ppo-epochs", type=tok.number_flag("--ppo-epochs", at_least=1), default=1,
        help="passes over each iteration's rollouts (1: one step per mini-batch)")
    add("--clip-eps", type=tok.number_flag("--clip-eps", float, above=0), default=0.2,
        help="PPO's clip range (paper: 0.2)")
    add("--value-clip", type=tok.number_flag("--value-clip", float, above=0), default=0.2,
        help="clip range of the value loss")
    add("--gamma", type=tok.number_flag("--gamma", float, at_least=0, at_most=1), default=1.0, help="GAE discount")
    add("--lam", type=tok.number_flag("--lam", float, at_least=0, at_most=1), default=0.95, help="GAE lambda")
    add("--calibration-prompts", type=tok.number_flag("--calibration-prompts", at_least=2), default=256,
        help="samples of the start model that calibrate the reward")
    add("--fig-n", type=tok.number_flag("--fig-n", at_least=0), default=16,
        help="samples per prompt in Figures 7 and 8 (0 skips them)")
    add("--fig-prompts", type=tok.number_flag("--fig-prompts", at_least=1), default=40,
        help="prompts in Figures 7 and 8")
    add("--fig-temperatures", default="0.7,1.0,1.3,1.6,2.0",
        help="temperatures of Figure 8 (and --rs-temperature); wide enough that the best one lies inside")
    add("--eval-per-kind", type=tok.number_flag("--eval-per-kind", at_least=1), default=100,
        help="held-out prompts per task kind in the final tables")
    add("--no-rs", action="store_true", help="skip rejection sampling: PPO starts from --init")
    add("--world-seed", type=int, default=0)
    return parser.parse_args(argv)


def resolve_budget(args, world_size: int):
    """03's resolve_args, then BUDGET's defaults for the preset, and the batch sizes checked."""
    P.resolve_args(args, world_size)
    for key, (paper, toy, _) in BUDGET.items():
        if getattr(args, key) is None:
            value = toy if args.preset in P.CPU_PRESETS else paper
            setattr(args, key, value.get(args.preset, 0.01) if isinstance(value, dict) else value)
    if args.no_rs:
        args.rs_iterations = 0
    if args.ppo_prompts % args.ppo_mini_batch or args.ppo_mini_batch % (world_size * args.ppo_micro_batch):
        raise UserError(f"--ppo-prompts {args.ppo_prompts} must be a multiple of --ppo-mini-batch "
                        f"{args.ppo_mini_batch}, itself a multiple of ranks x --ppo-micro-batch = "
                        f"{world_size} x {args.ppo_micro_batch}")
    if args.rs_prompts % world_size:
        raise UserError(f"--rs-prompts {args.rs_prompts} must be a multiple of the {world_size} ranks")


def input_paths(args, log):
    """The four files a run starts from, each checked to exist."""
    paths = dict(tokenizer=args.tokenizer or args.run_dir / "tokenizer.model",
                 init=Path(args.init or args.run_dir / "sft.pt"),
                 rm_helpful=args.rm_helpful or args.run_dir / "rm_helpful.pt",
                 rm_safety=args.rm_safety or args.run_dir / "rm_safety.pt")
    for name, path in paths.items():
        if not Path(path).exists():
            raise UserError(f"{name.replace('_', ' ')} not found: {path} (run chapters 01-05 first, or pass "
                            f"--{name.replace('_', '-')})")
    S.check_init_preset(paths["init"], args.preset, log)   # --init gives the shape, --preset the hyper-parameters
    return paths


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    if args.plan:   # 03's planner: memory per GPU and compute, on paper (no GPU, data or checkpoint)
        return P.plan_stage(args, "rs_ppo", budget=BUDGET, reward_model=R.RewardModel)
    rank, world_size, device = P.setup_distributed(args.device)
    resolve_budget(args, world_size)
    log = print if rank == 0 else (lambda *a, **k: None)
    paths = input_paths(args, log)
    P.check_writable(args.run_dir)
    tokenizer = tok.Tokenizer(paths["tokenizer"])
    # any id would do as padding (the masks say what is real); not EOS, so it never reads as an end
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.sp_model.unk_id()
    world = P.make_world(args.world_seed)
    source = read_prompts(args.prompts) if args.prompts else world
    frozen_dtype = M.pick_dtype(args.dtype, device)   # frozen models compute as the autocast does
    rms = [R.RewardModel.from_pretrained(paths[k], P.build_device(args, device), frozen_dtype, lazy=args.fsdp)
           for k in ("rm_helpful", "rm_safety")]
    if args.fsdp:   # sharded, not whole on every rank (read a block at a time, each rank's shards
        # moved to the device); every rank then scores the same number of batches, together
        rms = [P.shard_model(rm) for rm in rms]
    reward = Reward(*rms, pad_id, tokenizer.eos_id, combine=args.reward == "combined")
    tasks = S.eval_tasks(world, args.eval_per_kind, args.seed) if not args.prompts else []
    red_tasks = red_team_tasks(world, args.eval_per_kind, args.seed) if tasks else []
    run = Run(tokenizer, reward, source, tasks, red_tasks, paths, frozen_dtype, rank, device, log)
    state = resumed_state(args)
    history = run_rlhf(args, run, state)
    if history is not None and rank == 0:
        report(args, run, state, history, t_start)
    P.end_distributed()
    return state if history is not None else None


if __name__ == "__main__":
    tok.run_cli(main)
