"""Chapter 06: GAE by hand, the PPO invariants (ratio 1 and KL 0 at the start), the clipped
losses, the combined reward, best-of-K, the rollout layout, and a micro run end to end."""
import argparse
import copy
import importlib
import json
import random
from dataclasses import replace

import pytest
import torch

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
S = importlib.import_module("04_sft")
R = importlib.import_module("05_reward")
RL = importlib.import_module("06_rs_ppo")
UserError = tok.UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small tokenizer trained here on a play and some toy-world dialogue text."""
    root = tmp_path_factory.mktemp("rl_tok")
    text = (tok.DEFAULT_CORPUS_DIR / "hamlet_gut.txt").read_text(encoding="utf-8")[:60_000]
    lines = [f"[INST] {m['content']} [/INST]" for d in S.sft_dialogs(P.make_world(0), 300, seed=1) for m in d]
    (root / "a.txt").write_text(text + "\n".join(lines), encoding="utf-8")
    return tok.Tokenizer(tok.train_tokenizer([root / "a.txt"], root / "tok", vocab_size=700))


def micro(cls, vocab_size, seed=0):
    torch.manual_seed(seed)
    return cls(replace(M.PRESETS["micro"], vocab_size=vocab_size)).eval()


# --- GAE (PAPER.md: delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lambda A_{t+1}) ----

def test_gae_by_hand_with_an_answer_that_ends_early():
    # row 0: three answer tokens. row 1: ends after two (its EOS at t=1); t=2 is padding, whose
    # reward 5 and value 9 are garbage that must not leak into anything.
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.2, 0.5, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, -0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = RL.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: delta = (0.1 + 0.4 - 0.5, -0.2 + 0.3 - 0.4, 1.0 - 0.3) = (0, -0.3, 0.7)
    #        A_2 = 0.7; A_1 = -0.3 + 0.95 * 0.7 = 0.365; A_0 = 0 + 0.95 * 0.365 = 0.34675
    # row 1: delta_1 = 0.5 - (-0.3) = 0.8 (nothing after the EOS); delta_0 = 0.2 - 0.3 - 0.1 = -0.2
    #        A_1 = 0.8; A_0 = -0.2 + 0.95 * 0.8 = 0.56; A_2 = 0
    assert torch.allclose(adv, torch.tensor([[0.34675, 0.365, 0.7], [0.56, 0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.84675, 0.765, 1.0], [0.66, 0.5, 0.0]]), atol=1e-6)


def test_gae_equals_the_discounted_sum_of_deltas():
    """A second formulation: A_t = sum_l (gamma lambda)^l delta_{t+l}, over the real tokens."""
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    lengths = [7, 5, 1, 3]
    mask = torch.tensor([[float(t < n) for t in range(7)] for n in lengths])
    gamma, lam = 0.9, 0.8
    adv, ret = RL.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        v = values[i, :n].tolist() + [0.0]
        delta = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(7):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) if t < n else 0.0
            assert adv[i, t].item() == pytest.approx(want, abs=1e-5)
    assert torch.allclose(ret, (adv + values) * mask)


# --- the per-token reward and the KL ----------------------------------------------------------

def test_kl_penalty_is_zero_when_policy_equals_reference_and_score_sits_on_the_eos():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = RL.kl_rewards(logp, logp.clone(), score, mask, beta=0.1)
    assert torch.equal(kl, torch.zeros(2))
    assert torch.equal(rewards, torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))   # the last real token, not the pad
    rewards, kl = RL.kl_rewards(logp, logp - 0.5, score, mask, beta=0.1)   # policy more likely than reference
    assert torch.allclose(kl, torch.tensor([1.5, 1.0]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.05, 1.95], [-0.05, -1.05, 0.0]]))


def test_kl_of_real_models_is_zero_for_a_copy_and_not_for_another(tokenizer):
    policy = micro(M.Transformer, tokenizer.n_words)
    samples = [([1, 5, 9, 11], [7, 8, tokenizer.eos_id], True), ([1, 3], [4, 6, 12, 13], False)]
    tokens, real, mask, start = RL.rollout_batch(samples, 0, "cpu")
    logp = RL.answer_logprobs(policy, tokens, real, start, 0.7)
    same = RL.answer_logprobs(copy.deepcopy(policy), tokens, real, start, 0.7)
    other = RL.answer_logprobs(micro(M.Transformer, tokenizer.n_words, seed=1), tokens, real, start, 0.7)
    assert RL.kl_rewards(logp, same, torch.zeros(2), mask, 0.1)[1].abs().max() == 0
    assert RL.kl_rewards(logp, other, torch.zeros(2), mask, 0.1)[1].abs().min() > 1e-3


def test_rollout_layout_gives_the_unpadded_log_probs(tokenizer):
    """Prompts left-padded, answers right-padded: each row's log-probs and values are those of
    the row alone; the temperature divides the logits."""
    policy, value = micro(M.Transformer, tokenizer.n_words), micro(R.RewardModel, tokenizer.n_words)
    samples = [([1, 5, 9, 11, 20], [7, 8, 2], True), ([1, 3], [4, 6, 12, 13, 2], True), ([1, 30, 31], [40], False)]
    tokens, real, mask, start = RL.rollout_batch(samples, 0, "cpu")
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    batch_logp = RL.answer_logprobs(policy, tokens, real, start, 0.5)
    batch_values = RL.answer_values(value, tokens, real, start)
    for i, (p, a, _) in enumerate(samples):
        row = torch.tensor([p + a])
        logits = policy(row)[0, len(p) - 1:-1] / 0.5
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).squeeze(-1)
        assert torch.allclose(batch_logp[i, :len(a)], want, atol=1e-5)
        assert torch.allclose(batch_values[i, :len(a)], value(row, per_token=True)[0, len(p) - 1:-1], atol=1e-5)


# --- the clipped losses -------------------------------------------------------------------------

def test_clipped_surrogate_gradient_is_zero_outside_the_clip_range():
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    logp = ratio.log().requires_grad_()
    loss, stats = RL.ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_eps=0.2)
    loss.backward()
    # tokens 0 and 1 left the range in the direction their advantage favours: flat, no gradient.
    # token 2 is inside; token 3 is outside on the side the advantage dislikes: the pessimistic
    # (unclipped) term is kept, so it still gets pulled back. d(-A r)/d logp = -A r, over 4 tokens.
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0
    assert logp.grad[0, 2].item() == pytest.approx(-1.1 / 4) and logp.grad[0, 3].item() == pytest.approx(-0.5 / 4)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.1 - 0.5) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_value_loss_is_clipped_around_the_old_values():
    old, ret = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, 0.5]], requires_grad=True)
    loss = RL.value_loss(values, old, ret, torch.ones(1, 3), clip_eps=0.2)
    loss.backward()
    # token 0: V moved 0.5 from V_old toward R; its clipped twin (0.2) is further from R, so the
    # max picks the clipped term and V gets no gradient. token 1 is inside the range. token 2
    # moved away from R: the unclipped term is larger and pulls it back.
    assert values.grad[0, 0] == 0
    assert values.grad[0, 1].item() == pytest.approx((0.1 - 1.0) / 3)
    assert values.grad[0, 2].item() == pytest.approx(0.5 / 3)
    assert loss.item() == pytest.approx(0.5 * (0.8 ** 2 + 0.9 ** 2 + 0.5 ** 2) / 3)


# --- the reward: the piecewise choice of Sec. 3.2.3, LOGIT, WHITEN -----------------------------

def test_combined_reward_picks_the_safety_score_when_the_paper_says():
    helpful = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2])
    safety = torch.tensor([0.5, 0.1, 0.5, 0.15, 0.149])
    is_safety = torch.tensor([False, False, True, False, False])
    logit_rc, rc = RL.combined_reward(helpful, safety, is_safety)
    # helpful; Rs < 0.15; a safety prompt; Rs = 0.15 is not below; Rs < 0.15 although Rh is higher
    assert torch.allclose(rc, torch.tensor([0.9, 0.1, 0.5, 0.9, 0.149]))
    assert torch.allclose(logit_rc, torch.log(rc / (1 - rc)), atol=1e-5)
    assert torch.isfinite(RL.logit(torch.tensor([0.0, 1.0]))).all()   # a saturated score stays finite
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(RL.whiten(x, x.mean(), x.std()), (x - 3) / x.std())
    white = RL.whiten(x, x.mean(), x.std())
    assert white.mean().abs() < 1e-6 and white.std() == pytest.approx(1)


def test_reward_calibration_and_whitening(tokenizer):
    """After calibration on samples: their whitened scores have mean 0 and std 1, the helpful
    median scores 0.5, and the threshold 0.15 flags 5% of the safe answers."""
    world, rng = P.make_world(0), random.Random(0)
    prompts = [RL.toy_prompt(world, rng) for _ in range(32)]
    rms = [micro(R.RewardModel, tokenizer.n_words, seed=s) for s in (1, 2)]
    reward = RL.Reward(*rms, pad_id=0, eos_id=tokenizer.eos_id)
    g = torch.Generator().manual_seed(0)
    samples = [(S.encode_dialog(tokenizer, p.dialog)[0], torch.randint(3, 600, (5,), generator=g).tolist() + [2], True)
               for p in prompts]
    harmful = [i for i, p in enumerate(prompts) if p.is_safety]
    assert len(harmful) >= 2
    answers = ["Sure." if i in harmful[::2] else "I cannot help." for i in range(len(prompts))]   # half comply
    cal = reward.calibrate(samples, prompts, answers)
    out = reward(samples, prompts)
    assert out["score"].mean().abs() < 1e-5 and out["score"].std() == pytest.approx(1, abs=1e-5)
    assert out["helpful"].median().item() == pytest.approx(0.5, abs=1e-6)
    unsafe_answer = torch.tensor([p.is_safety and not S.is_refusal(a) for p, a in zip(prompts, answers)])
    assert cal["unsafe_answers"] == int(unsafe_answer.sum())
    raw_s = reward.raw(samples)[1]
    assert torch.allclose(out["safety"], torch.sigmoid(raw_s + cal["safety_offset"]))
    flagged = out["safety"][~unsafe_answer] < RL.SAFETY_THRESHOLD   # "Rs < 0.15" flags 5% of the safe answers
    assert flagged.float().mean().item() == pytest.approx(RL.FALSE_FLAGS, abs=1 / len(prompts))
    # a cut-off answer pays the penalty
    cut_off = reward([(samples[0][0], samples[0][1][:-1], False)], prompts[:1])["score"]
    assert cut_off.item() == pytest.approx(out["score"][0].item() - RL.NO_EOS_PENALTY, abs=1e-4)


# --- rejection sampling ------------------------------------------------------------------------

def test_no_held_out_prompt_occurs_in_the_rs_and_ppo_prompts():
    """rs_ppo.json's overlap on the default toy settings: the prompts of 2 RS rounds of 128 and 30
    PPO iterations of 64 against the 100-a-kind held-out and red-team prompts."""
    budget = ("rs_iterations", "rs_prompts", "ppo_iterations", "ppo_prompts")
    args = argparse.Namespace(seed=0, safety_share=0.2, **{k: RL.BUDGET[k][1] for k in budget})   # the CPU defaults
    world = P.make_world(0)
    prompts = RL.training_prompts(args, world)
    assert len(prompts) == 2 * 128 + 30 * 64 and any(p.is_safety for p in prompts)
    assert [p.dialog for p in prompts[:128]] == [p.dialog for p in RL.draw_prompts(world, 128, RL.rs_seed(args, 0))]
    held_out = S.eval_tasks(world, 100, 0) + RL.red_team_tasks(world, 100, 0)
    assert S.overlap([t.prompt for t in held_out], S.user_messages(p.dialog for p in prompts)) == 0


def test_best_of_k_and_the_figure7_curves():
    scores = torch.tensor([[0.1, 0.5, 0.3], [2.0, -1.0, 2.0]])
    idx, best = RL.best_of_k(scores)
    assert idx.tolist() == [1, 0] and best.tolist() == [0.5, 2.0]   # a tie: the first
    gold = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.9, 0.2]])
    curves = RL.best_of_n_curves(scores, gold, orders=200)
    assert curves["n"] == [1, 2, 3]
    assert curves["max"][0] == pytest.approx(scores.mean().item(), abs=0.15)   # N=1: a random sample
    assert curves["max"][0] == pytest.approx(curves["median"][0])
    assert curves["max"][2] == pytest.approx(1.25) and curves["median"][2] == pytest.approx((0.3 + 2.0) / 2)
    assert curves["gold_of_max"][2] == pytest.approx((1.0 + 0.2) / 2)   # the picks' gold
    assert curves["max"][0] <= curves["max"][1] <= curves["max"][2]


def test_sample_answers_puts_the_eos_back(monkeypatch, tokenizer):
    eos = tokenizer.eos_id
    monkeypatch.setattr(M, "generate", lambda model, prompts, max_new, *a: [[5, 6], [5] * max_new, [9] * (max_new - 1)])
    model = micro(M.Transformer, tokenizer.n_words)
    prompts = [RL.Prompt([{"role": "user", "content": "Hi"}], False)] * 3
    out = RL.sample_answers(model, tokenizer, prompts, 1, 4, 1.0, None)
    assert [(a, f) for _, a, f in out] == [([5, 6, eos], True), ([5, 5, 5, 5], False), ([9, 9, 9, eos], True)]
    assert out[0][0] == S.encode_dialog(tokenizer, prompts[0].dialog)[0]


# --- a PPO iteration: the invariants of the first mini-batch ------------------------------------

def test_first_ppo_minibatch_has_ratio_one_and_zero_kl(tokenizer):
    world = P.make_world(0)
    policy = micro(M.Transformer, tokenizer.n_words)
    ref = copy.deepcopy(policy)
    value = micro(R.RewardModel, tokenizer.n_words, seed=3)
    reward = RL.Reward(micro(R.RewardModel, tokenizer.n_words, 1), micro(R.RewardModel, tokenizer.n_words, 2),
                       0, tokenizer.eos_id)
    args = argparse_namespace(ppo_micro_batch=4, ppo_mini_batch=4, world_size=1, ppo_epochs=1, max_new_tokens=6,
                              ppo_temperature=0.7, kl_beta=0.1, gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2,
                              grad_clip=1.0, compile_decode=False, sample_batch=64)
    opts = [P.configure_optimizer(m, 1e-2, 0.1, (0.9, 0.95), 1e-5, torch.device("cpu")) for m in (policy, value)]
    prompts = RL.draw_prompts(world, 8, seed=0)
    from contextlib import nullcontext
    entry = RL.ppo_step(args, policy, value, ref, reward, policy, tokenizer, prompts, 0, opts, [policy, value],
                        nullcontext)
    assert entry["first_max_log_ratio"] == 0.0   # every token's ratio exactly 1, not approximately
    assert entry["first_ratio"] == 1.0 and entry["first_approx_kl"] == 0.0
    assert entry["kl"] == 0.0   # the rollouts' policy is the reference
    # the second mini-batch comes after a step with a large LR: its ratio has moved
    assert entry["ratio"] != 1.0 and entry["approx_kl"] > 0
    entry = RL.ppo_step(args, policy, value, ref, reward, policy, tokenizer, prompts, 1, opts, [policy, value],
                        nullcontext)
    assert entry["first_ratio"] == 1.0 and entry["kl"] != 0.0   # new rollouts; now off the reference


def argparse_namespace(**kw):
    import argparse
    return argparse.Namespace(**kw)


# --- the chapter end to end, at micro size --------------------------------------------------------

@pytest.fixture(scope="module")
def run_files(tokenizer, tmp_path_factory):
    """A micro 'SFT model' and two micro 'RMs' (random weights), as chapters 04-05 would leave them."""
    root = tmp_path_factory.mktemp("rl_run")
    (root / "tokenizer.model").write_bytes(tokenizer.sp_model.serialized_model_proto())
    M.save_model(micro(M.Transformer, tokenizer.n_words), root / "sft.pt")
    for name, seed in (("rm_helpful.pt", 1), ("rm_safety.pt", 2)):
        M.save_model(micro(R.RewardModel, tokenizer.n_words, seed), root / name)
    return root


def run_main(files, run_dir, *extra):
    return RL.main(["--preset", "micro", "--run-dir", str(run_dir), "--tokenizer", str(files / "tokenizer.model"),
                    "--init", str(files / "sft.pt"), "--rm-helpful", str(files / "rm_helpful.pt"),
                    "--rm-safety", str(files / "rm_safety.pt"), "--max-new-tokens", "6", "--calibration-prompts", "16",
                    "--rs-prompts", "8", "--rs-k", "3", "--rs-iterations", "1", "--seq-len", "64", "--batch-tokens",
                    "256", "--micro-batch", "4", "--fig-temperatures", "0.7,1.3", "--fig-prompts", "4", "--fig-n", "3",
                    "--ppo-iterations", "2", "--ppo-prompts", "8", "--ppo-mini-batch", "4", "--ppo-micro-batch", "4",
                    "--ppo-lr", "1e-3", "--value-lr", "1e-3", "--value-warmup", "1", "--eval-per-kind", "2", *extra])


def test_main_end_to_end_and_ppo_resumes_exactly(run_files, tmp_path, capsys):
    state = run_main(run_files, tmp_path / "a")
    assert set(state["results"]) == {"SFT", "+RS", "+PPO"} and len(state["rs"]) == 1
    for name in ("rs.pt", "ppo.pt", "rs_ppo.json", "rs_best_of_n.png", "rs_temperature.png", "ppo_curves.png"):
        assert (tmp_path / "a" / name).is_file(), name
    report = json.loads((tmp_path / "a" / "rs_ppo.json").read_text())
    assert len(report["ppo"]) == 2 and set(report["time_split"]) == {"gen_s", "score_s", "train_s"}
    assert report["overlap"] == 0
    assert {"gen_s", "score_s", "train_s", "kl", "gold", "careless", "refusal_harmful",
            "clip_frac"} <= set(report["ppo"][0])
    for name, r in report["results"].items():   # greedy and sampled: 2 prompts a kind, 4 samples each
        assert {"gold", "sampled_gold", "careless", "sampled_careless", "red_team_refusal_harmful"} <= set(r), name
        assert r["sampled_careless"] * 4 * 2 * len(S.KINDS) == pytest.approx(round(r["sampled_careless"] * 40))
    assert report["ppo"][0]["first_ratio"] == 1.0 and set(report["figures"]["temperature"]) == {"0.7", "1.3"}
    a = M.Transformer.from_pretrained(tmp_path / "a" / "ppo.pt")   # a plain model checkpoint, as 07 loads it
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), M.Transformer.from_pretrained(
        tmp_path / "a" / "rs.pt").parameters()))   # PPO moved it
    # PPO from SFT (--no-rs), cut off after iteration 1 and resumed: the same policy and value
    # model as a run never stopped
    capsys.readouterr()
    run_main(run_files, tmp_path / "c", "--no-rs", "--fig-n", "0")
    last = capsys.readouterr().out.strip().splitlines()[-1]   # says what it wrote, and only that
    assert last.endswith(f"wrote ppo.pt, ppo_curves.png, rs_ppo.json in {tmp_path / 'c'}"), last
    assert run_main(run_files, tmp_path / "b", "--no-rs", "--fig-n", "0", "--stop-at", "1") is None
    run_main(run_files, tmp_path / "b", "--no-rs", "--fig-n", "0", "--resume")
    b, c = (M.load_checkpoint(tmp_path / r / "ppo.pt") for r in "bc")
    for key in ("model", "value_model"):
        assert all(torch.allclose(b[key][k], c[key][k], atol=1e-6) for k in c[key])
    for key in ("reward", "kl", "gold", "policy_loss", "value_loss"):
        assert b["history"][-1][key] == c["history"][-1][key]


def test_clear_errors(run_files, tmp_path):
    with pytest.raises(UserError, match="rm safety not found"):
        RL.main(["--preset", "micro", "--run-dir", str(tmp_path), "--tokenizer", str(run_files / "tokenizer.model"),
                 "--init", str(run_files / "sft.pt"), "--rm-helpful", str(run_files / "rm_helpful.pt")])
    with pytest.raises(UserError, match="multiple of --ppo-mini-batch"):
        run_main(run_files, tmp_path, "--ppo-prompts", "6")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="p.jsonl:1"):
        RL.read_prompts(tmp_path / "p.jsonl")


def test_unsafe_must_be_a_json_boolean(tmp_path):
    path = tmp_path / "p.jsonl"
    for bad in ('"no"', '"false"', "0", "null"):   # bool("no") would make a helpful prompt a safety one
        path.write_text('{"prompt": "hi", "unsafe": true}\n{"prompt": "hi", "unsafe": ' + bad + "}\n")
        with pytest.raises(UserError, match=r"p.jsonl:2: 'unsafe' must be true or false"):
            RL.read_prompts(path)
    path.write_text('{"prompt": "hi", "unsafe": true}\n{"prompt": "hi", "unsafe": false}\n{"prompt": "hi"}\n')
    assert [p.is_safety for p in RL.read_prompts(path)] == [True, False, False]


@pytest.mark.parametrize("main, flag, value", [
    (R.main, "--comparisons", "0"), (R.main, "--epochs", "-1"), (R.main, "--warmup-steps", "-2"),
    (RL.main, "--fig-n", "-1"), (RL.main, "--rs-k", "0"), (RL.main, "--ppo-lr", "-0.00001"), (RL.main, "--lam", "1.5"),
    (RL.main, "--safety-share", "nan"), (RL.main, "--ppo-iterations", "-3"), (RL.main, "--calibration-prompts", "1")])
def test_numeric_flags_of_05_and_06_are_checked_where_parsed(tmp_path, main, flag, value):
    """One line naming the flag, before any file is looked at (the run folder does not exist)."""
    with pytest.raises(tok.UserError, match=f"^{flag} {value}: "):
        main(["--run-dir", str(tmp_path / "nowhere"), flag, value])
    assert not (tmp_path / "nowhere").exists()


def test_fsdp_sampler_copy_is_refreshed_weight_by_weight(tmp_path, torchrun):
    """Under FSDP (2 processes, gloo on the CPU), the rollout copy is made in the compute dtype and
    refresh_rollout_policy gives it the sharded policy's trained weights, gathered one at a time:
    equal to the full state dict, cast."""
    import textwrap
    script = tmp_path / "refresh.py"
    script.write_text(textwrap.dedent(f"""
        import importlib, json, sys
        import torch, torch.distributed as dist
        sys.path.insert(0, {str(tok.REPO)!r})
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        M, R, RL = (importlib.import_module(m) for m in ("02_model", "05_reward", "06_rs_ppo"))
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        policy, value = M.Transformer(M.PRESETS["micro"]), R.RewardModel(M.PRESETS["micro"])
        before = {{n: p.detach().clone() for n, p in policy.named_parameters()}}
        sampler = RL.shard_for_fsdp(policy, value, torch.bfloat16)
        with torch.no_grad():   # a training step's change to every shard
            for p in policy.parameters():
                p.mul_(-2.0).add_(0.5)
        RL.refresh_rollout_policy(sampler, policy)
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        params = dict(sampler.named_parameters())
        result = dict(
            sharded=all(hasattr(p, "full_tensor") for p in policy.parameters()),
            bf16=all(p.dtype == torch.bfloat16 for p in params.values()),
            refreshed=sorted(params) == sorted(full) and all(torch.equal(params[n], full[n].to(torch.bfloat16))
                                                             for n in full),
            changed=all(torch.equal(full[n], before[n] * -2.0 + 0.5) for n in full))
        json.dump(result, open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w"))
        dist.barrier()   # a gloo rank leaving while its peer is connected can abort at exit
        dist.destroy_process_group()
        """))
    torchrun(script, timeout=240)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == dict(sharded=True, bf16=True, refreshed=True, changed=True), (rank, result)
