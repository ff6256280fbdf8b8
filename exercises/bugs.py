"""Bug hunts: each function is a copy of a chapter's function with ONE planted bug, a bug that
public issue trackers of RLHF code keep reporting (or one of ../shared/PAPER.md's pitfalls).
Find it, fix it here, and the checker's test for that function passes:
    python exercises/check.py bug_sft_learns_prompt
The docstring says what the function should do and what the bug does to a run; the checker's
failure message shows where the output first differs from the chapter's. Each name is
bug_<what goes wrong>; the chapter function it copies is named in the checker's list. What the bug
does to a short run, measured with the chapter's function and with the copy side by side:
    python exercises/effects.py bug_sft_learns_prompt
"""
import importlib
import time

import torch
import torch.nn.functional as F

import _setup  # noqa: F401

S = importlib.import_module("04_sft")
R = importlib.import_module("05_reward")
RL = importlib.import_module("06_rs_ppo")


def bug_sft_learns_prompt(tokenizer, dialog):
    """04's encode_dialog: (ids, is_answer), is_answer True on the answers' tokens only.
    In a run: the SFT loss also trains the model to write the user's prompts, the [INST] markers
    included; the answers get a smaller share of the gradient and the loss curve is not comparable
    with the chapter's (Sec. 3.1 zeroes the loss on the prompt)."""
    S.check_dialog(dialog, answers_too=False)
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": S.B_SYS + dialog[0]["content"] + S.E_SYS + dialog[1]["content"]},
                  *dialog[2:]]
    ids, is_answer = [], []
    for i in range(0, len(dialog), 2):
        prompt = f"{S.B_INST} {dialog[i]['content'].strip()} {S.E_INST}"
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        if i + 1 == len(dialog):
            turn = prompt_ids
            is_answer += [False] * len(turn)
        else:
            turn = tokenizer.encode(f"{prompt} {dialog[i + 1]['content'].strip()} ", bos=True, eos=True)
            is_answer += [True] * len(turn)
        ids += turn
    return ids, is_answer


def bug_loss_diluted_by_padding(logits, targets):
    """04's masked_lm_loss: the mean NLL over the answer tokens.
    In a run that computes every position's logits (04's sft_loss computes the answers' only, which
    hides this bug): the loss is smaller the more prompt and padding a batch holds, so its scale, and
    in effect the learning rate, changes from batch to batch; a packed batch of short answers learns
    slowest."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    learn = targets != S.IGNORE
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (nll * learn).sum() / learn.numel()


def bug_margin_sign(r_chosen, r_rejected, margin=0.0):
    """05's ranking_loss with a margin (Eq. 2).
    In a run: the margin helps instead of demanding: the clearly better pairs are the ones the
    RM is asked to separate least, and the margin ablation (Table 28) turns upside down."""
    return -F.logsigmoid(r_chosen - r_rejected + margin).mean()


def bug_kl_sign(logp, ref_logp, score, mask, beta: float):
    """06's kl_rewards: -beta * KL at each answer token, the score at each row's EOS.
    In a run: the policy is paid for moving away from the reference, the KL climbs every
    iteration and the answers drift into text the reward model was never trained on."""
    kl = (logp - ref_logp) * mask
    rewards = beta * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(rewards)), last] += score
    return rewards, kl.sum(1)


def bug_score_on_pad(logp, ref_logp, score, mask, beta: float):
    """06's kl_rewards: -beta * KL at each answer token, the score at each row's EOS.
    In a run: every answer shorter than the longest in its batch gets its reward on a pad
    column that the mask zeroes, so it learns nothing from the reward model but the KL."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    rewards[:, -1] += score
    return rewards, kl.sum(1)


def bug_kl_against_the_sampler(args, policy, value_model, ref, reward, rollout_policy, tokenizer, prompts, seed, opts,
                               wrapped, amp, train_policy=True):
    """06's ppo_step: one PPO iteration: rollouts, their rewards (the score, and the KL penalty
    against ref, the frozen SFT model) and advantages, then one gradient step per mini-batch.
    In a run: the KL is taken against the wrong policy, so it is exactly 0 at every token: the
    log reads KL 0.000 at every iteration while the policy drifts from the SFT model unchecked,
    and the penalty that keeps it where the reward model is trustworthy (Sec. 3.2.3) does nothing."""
    wrapped_policy, wrapped_value = wrapped
    t0, device = time.time(), next(policy.parameters()).device
    rollout_policy.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = RL.sample_answers(rollout_policy, tokenizer, prompts, 1, args.max_new_tokens, args.ppo_temperature,
                                generator, args.sample_batch, args.compile_decode)
    t_gen = time.time() - t0

    # Score and evaluate the old policy, the reference and the values, in the micro-batches the
    # first update will use (same rows, same shapes): its ratio is then exactly 1.
    judged = reward(samples, prompts)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    samples, prompts = [samples[i] for i in order], [prompts[i] for i in order]
    score = judged["score"][order].to(device)
    tokens, real, mask, start = RL.rollout_batch(samples, reward.pad_id, device)
    chunks = [slice(i, i + args.ppo_micro_batch) for i in range(0, len(samples), args.ppo_micro_batch)]
    T = args.ppo_temperature
    with torch.no_grad(), amp():
        old_logp = torch.cat([RL.answer_logprobs(wrapped_policy, tokens[c], real[c], start, T) for c in chunks])
        ref_logp = torch.cat([RL.answer_logprobs(rollout_policy, tokens[c], real[c], start, T) for c in chunks])
        old_values = torch.cat([RL.answer_values(wrapped_value, tokens[c], real[c], start).float() for c in chunks])
    rewards, kl = RL.kl_rewards(old_logp, ref_logp, score, mask, args.kl_beta)
    advantages, returns = RL.gae(rewards, old_values, mask, args.gamma, args.lam)
    advantages = RL.masked_whiten(advantages, mask)   # over the batch's valid tokens
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
                    logp = RL.answer_logprobs(wrapped_policy, tokens[c], real[c], start, T)
                    pg_loss, stats = RL.ppo_policy_loss(logp, old_logp[c], advantages[c], mask[c], args.clip_eps)
                    values = RL.answer_values(wrapped_value, tokens[c], real[c], start).float()
                    v_loss = RL.value_loss(values, old_values[c], returns[c], mask[c], args.value_clip)
                if train_policy:
                    (pg_loss / len(group)).backward()
                (v_loss / len(group)).backward()
                logs.append(dict(policy_loss=pg_loss.item(), value_loss=v_loss.item(), **stats))
            if train_policy:
                RL.clip_and_step(policy, opts[0], args.grad_clip)
            RL.clip_and_step(value_model, opts[1], args.grad_clip)
    mean = lambda key: sum(x[key] for x in logs) / len(logs)
    return dict(reward=score.mean().item(), rc=judged["rc"].mean().item(), kl=kl.mean().item(),
                **RL.rollout_stats(tokenizer, prompts, samples),
                answer_len=mask.sum(1).mean().item(), finished=sum(f for *_, f in samples) / len(samples),
                **{k: mean(k) for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "ratio")},
                **{f"first_{k}": logs[0][k] for k in ("ratio", "approx_kl", "max_log_ratio")},
                gen_s=t_gen, score_s=t_score, train_s=time.time() - t0 - t_gen - t_score)


def bug_gae_past_eos(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """06's gae: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, zero past the EOS.
    In a run: the value model's output on the padding after a short answer leaks into its EOS's
    advantage: the short answers get noise the length of the batch decides."""
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t], next_value = next_advantage, values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values * mask


def bug_logprobs_without_temperature(model, tokens, real, start: int, temperature: float):
    """06's answer_logprobs: log pi of each answer token under the distribution sampled from.
    In a run: the rollouts come from softmax(logits / T) but the ratio and the KL are computed
    on softmax(logits): at the first mini-batch the ratio is not 1 against the sampler, and the
    KL is that of another distribution (PAPER.md's pitfall)."""
    logits = model(tokens, mask=R.pad_attention_mask(real))[:, start - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, start:, None]).squeeze(-1)


def bug_pad_is_eos(samples, pad_id: int, device):
    """06's rollout_batch: tokens, real, mask (answer tokens up to and including EOS), width_p.
    In a run with pad_id == eos_id (Llama has no pad piece): the EOS is taken for padding, so no
    answer is rewarded for ending, the score lands on the token before the EOS, and the policy
    stops learning to stop."""
    width_p = max(len(p) for p, _, _ in samples)
    width_a = max(len(a) for _, a, _ in samples)
    tokens = torch.full((len(samples), width_p + width_a), pad_id, dtype=torch.long)
    for i, (p, a, _) in enumerate(samples):
        tokens[i, width_p - len(p):width_p + len(a)] = torch.tensor(p + a)
    real = tokens != pad_id
    return tokens.to(device), real.to(device), real[:, width_p:].float().to(device), width_p


def bug_gatt_learns_every_answer(tokenizer, instruction: str, users, answers, max_len: int = None):
    """07's gatt_example: the instruction in turn 1 only, loss on the last answer only.
    In a run: the earlier answers, sampled with the instruction in their own user message, are
    learned in a context that no longer shows it: the model is taught to follow rules it cannot
    see, which Sec. 3.3 warns "could hurt the training"."""
    dialog = [{"role": "system", "content": instruction}]
    for user, answer in zip(users, answers):
        dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    while max_len and len(S.encode_dialog(tokenizer, dialog)[0]) > max_len and len(dialog) > 5:
        del dialog[3:5]
    return S.encode_dialog(tokenizer, dialog)


def bug_rope_rotates_halves(x, freqs_cis):
    """02's apply_rotary_emb: rotate the interleaved channel pairs (2i, 2i+1).
    In a run: Meta's weights expect interleaved pairs; rotating (i, i + d/2) instead (Hugging
    Face's layout, without its permuted q/k rows) makes a loaded Llama 2 produce gibberish, while
    a model trained from scratch would not notice."""
    cos, sin = freqs_cis
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.type_as(x)


def bug_mask_without_cache_offset(seqlen: int, start_pos: int, device):
    """02's causal_mask: query i sits at position start_pos + i.
    In a run: a prompt prefilled into the KV cache and then continued in chunks (speculative or
    chunked decoding) hides from each new token the tokens of its own chunk, or shows it the
    future, and generation quietly differs from the full forward."""
    q_pos = torch.arange(seqlen, device=device)[:, None]
    k_pos = torch.arange(start_pos + seqlen, device=device)[None, :]
    return k_pos <= q_pos
