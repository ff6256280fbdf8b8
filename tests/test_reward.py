"""Chapter 05: the ranking loss and its margins, the scalar head under padding, per-rating
accuracy, the preference-data builder, data errors, checkpoints, and a run end to end."""
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
UserError = tok.UserError
SIG, BETTER, SLIGHT, NEGL = R.RATINGS


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small tokenizer trained here on a play and some toy-world dialogue text."""
    root = tmp_path_factory.mktemp("rm_tok")
    text = (tok.DEFAULT_CORPUS_DIR / "hamlet_gut.txt").read_text(encoding="utf-8")[:60_000]
    lines = [f"[INST] {m['content']} [/INST]" for d in S.sft_dialogs(P.make_world(0), 300, seed=1) for m in d]
    (root / "a.txt").write_text(text + "\n".join(lines), encoding="utf-8")
    return tok.Tokenizer(tok.train_tokenizer([root / "a.txt"], root / "tok", vocab_size=700))


def micro_rm(vocab_size, seed=0):
    torch.manual_seed(seed)
    return R.RewardModel(replace(M.PRESETS["micro"], vocab_size=vocab_size)).eval()


# --- the loss (Eq. 2) and Table 27's margins ------------------------------------------------

def test_ranking_loss_by_hand_for_each_margin():
    # r_c - r_r = 1.5; loss = log(1 + exp(-(1.5 - m)))
    assert R.ranking_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(0.201413, abs=1e-6)
    expected = {   # by hand: log(1 + e^-(1.5 - m)) for the margins of Table 27
        "none": [0.201413] * 4,
        "small": [0.474077, 0.360885, 0.271098, 0.201413],   # m = 1, 2/3, 1/3, 0
        "large": [1.701413, 0.974077, 0.474077, 0.201413]}   # m = 3, 2, 1, 0
    for margin, values in expected.items():
        for rating, value in zip(R.RATINGS, values):
            m = R.margin_of(rating, margin)
            assert R.ranking_loss(torch.tensor([2.0]), torch.tensor([0.5]), m).item() == pytest.approx(value, abs=1e-5)
    assert R.margin_of("", "large") == 0   # unrated real data: no margin
    # a batch is the mean; a hopeless pair (r_c << r_r) gives a finite, linear loss, not inf
    r_c, r_r, m = torch.tensor([2.0, -1000.0]), torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.0])
    assert R.ranking_loss(r_c, r_r, m).item() == pytest.approx((0.474077 + 1000) / 2, rel=1e-6)


def test_the_margin_raises_the_loss_of_a_clear_pair_more():
    r_c, r_r = torch.tensor([1.0], requires_grad=True), torch.tensor([0.0])
    grads = {}
    for margin in R.MARGINS:
        r_c.grad = None
        R.ranking_loss(r_c, r_r, R.margin_of(SIG, margin)).backward()
        grads[margin] = -r_c.grad.item()
    assert grads["none"] < grads["small"] < grads["large"]   # a bigger push for significantly better


# --- the scalar head reads the last real token, whatever the padding -----------------------

def test_score_is_the_same_unpadded_left_and_right_padded():
    model = micro_rm(50)
    rows = [[1, 5, 9, 11, 2], [1, 7, 2], [1, 3, 4, 8, 12, 13, 6, 2]]
    alone = torch.stack([model(torch.tensor([r]))[0] for r in rows])
    width = max(map(len, rows))
    for pad_id in (0, 2, 49):   # the pad id must not matter
        right = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        left = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        real_right = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
        real_left = real_right.flip(-1)
        assert torch.allclose(model(right, real_right), alone, atol=1e-5)
        assert torch.allclose(model(left, real_left), alone, atol=1e-5)
        per_token = model(left, real_left, per_token=True)   # a value model's V at the last token = the score
        assert torch.allclose(per_token[:, -1], alone, atol=1e-5)
    # it reads the last token: changing it changes the score; without the pad mask, left pads leak in
    assert not torch.allclose(model(torch.tensor([[1, 5, 9, 11, 3]]))[0], alone[0], atol=1e-4)
    assert not torch.allclose(model(left)[1], alone[1], atol=1e-4)


def test_score_texts_matches_scoring_one_by_one(tokenizer):
    model = micro_rm(tokenizer.n_words)
    prompts = ["What is 2 + 3?", [{"role": "user", "content": "Sort the digits 3 1 2."}], "Hi"]
    answers = ["2 + 3 = 5.", "1 2 3.", "Hello there, how are you today?"]
    batch = R.score_texts(model, tokenizer, prompts, answers, batch_size=2)
    for p, a, r in zip(prompts, answers, batch):
        ids = R.encode_pair(tokenizer, p, a, 256)
        assert ids[-1] == tokenizer.eos_id and r.item() == pytest.approx(model(torch.tensor([ids]))[0].item(), abs=1e-5)


# --- accuracy per rating (Table 8) ----------------------------------------------------------

def test_accuracy_by_rating_by_hand():
    r_c = torch.tensor([3.0, 1.0, 0.0, 2.0, 1.0, 5.0, 0.5])
    r_r = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    ratings = [SIG, SIG, BETTER, BETTER, BETTER, NEGL, ""]
    acc = R.accuracy_by_rating(r_c, r_r, ratings)
    assert acc[SIG] == pytest.approx(1 / 2)
    assert acc[BETTER] == pytest.approx((0 + 1 + 0.5) / 3)   # a tie counts half
    assert acc[SLIGHT] is None                               # none in this test set
    assert acc[NEGL] == 1.0
    assert acc["avg"] == pytest.approx((1 + 0 + 0 + 1 + 0.5 + 1 + 1) / 7)   # over all pairs, unrated too


def test_accuracy_by_rating_keeps_what_an_interval_needs():
    """n per rating, and per pair its score and rating: they give back every accuracy."""
    r_c, r_r = torch.tensor([3.0, 1.0, 0.0, 2.0, 1.0, 5.0, 0.5]), torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    acc = R.accuracy_by_rating(r_c, r_r, [SIG, SIG, BETTER, BETTER, BETTER, NEGL, ""])
    assert acc["n"] == {SIG: 2, BETTER: 3, SLIGHT: 0, NEGL: 1, "avg": 7}
    assert acc["right"] == [1, 0, 0, 1, 0.5, 1, 1] and acc["rating"] == [0, 0, 1, 1, 1, 3, -1]
    for i, r in enumerate(R.RATINGS):
        scores = [s for s, k in zip(acc["right"], acc["rating"]) if k == i]
        assert (sum(scores) / len(scores) if scores else None) == (acc[r] and pytest.approx(acc[r]))


# --- the annotators and the preference-data builder ----------------------------------------

def test_safety_score_by_hand():
    world = P.make_world(0)
    harm = S.make_task(world, "harmful", random.Random(0))
    assert R.safety_score(harm, harm.answer) == 1.0                    # refuses and explains, as the reference
    assert 0.6 < R.safety_score(harm, "I cannot help with that.") < 0.9   # a bare refusal
    assert R.safety_score(harm, "Sure, it is fine: it harms no one.") == 0.0
    benign = S.make_task(world, "benign", random.Random(0))
    assert R.safety_score(benign, f"Sure, to {benign.target} is fine: it harms no one.") == 1.0
    assert R.safety_score(benign, "I cannot help with that.") == 0.0   # a false refusal is not safe-and-good
    red = R.safety_task(world, random.Random(3))
    assert red.kind in ("harmful", "benign") and red.answer and (red.kind == "harmful") == (red.target == "")


def test_rate_uses_the_four_ratings():
    add = S.Task("arithmetic", "q", "a", "42")
    assert R.rate(add, "= 42.", "= 99.") == (0, "significantly better")
    assert R.rate(add, "= 41.", "= 42.") == (1, "better")          # 0.49 vs 1.0
    assert R.rate(add, "= 41.", "= 43.") == (0, "negligibly better / unsure")
    assert R.rate(add, "= 60.", "= 44.") == (1, "slightly better")  # 0.29 vs 0.48


def test_the_two_annotators_disagree_on_harmful_requests_only():
    """Sec. 3.2.2: a complete answer to an unsafe request is helpful and unsafe. The helpfulness
    annotator ranks complying above refusing where the safety annotator ranks it below; on every
    other prompt they agree with 04's gold score."""
    world, rng = P.make_world(0), random.Random(5)
    harm = S.make_task(world, "harmful", rng)
    comply, refuse = f"Sure, to {R.act_of(harm)} is fine: it harms no one.", harm.answer
    assert R.helpfulness_score(harm, comply) == 1.0 and R.helpfulness_score(harm, refuse) == 0.0
    assert R.safety_score(harm, comply) == 0.0 and R.safety_score(harm, refuse) == 1.0
    assert R.rate(harm, comply, refuse, R.helpfulness_score)[0] == 0       # comply preferred
    assert R.rate(harm, comply, refuse, R.safety_score)[0] == 1            # refuse preferred
    assert R.helpfulness_score(harm, "Sure, that is fine.") == 0.5   # a vague yes: half the help
    for kind in ("arithmetic", "fact", "list", "benign"):
        task = S.make_task(world, kind, rng)
        for answer in (task.answer, "I cannot help with that.", "nonsense"):
            assert R.helpfulness_score(task, answer) == S.gold_score(task, answer)


def test_the_helpfulness_set_holds_adversarial_prompts():
    world, rng = P.make_world(0), random.Random(0)
    kinds = [R.helpful_task(world, rng).kind for _ in range(2000)]
    adversarial = sum(k in ("harmful", "benign") for k in kinds) / len(kinds)
    assert abs(adversarial - R.ADVERSARIAL_SHARE) < 0.04 and "harmful" in kinds


def test_collect_agrees_with_the_annotator(monkeypatch, tokenizer):
    """Two canned 'model variants': the cold one answers with the reference, the hot one with a
    near miss or the same text. Every comparison must be what R.rate says, ties dropped."""
    world, tasks = P.make_world(0), {}

    def make(rng):
        task = R.helpful_task(world, rng)
        tasks[task.prompt] = task
        return task

    def fake_answer_all(model, tok_, dialogs, max_new, batch, temperature, top_p, generator, compile=False):
        out = []
        for d in dialogs:
            t = tasks[d[-1]["content"]]
            cold = t.answer
            hot = [t.answer, t.answer.replace(t.target, "7") if t.target else "hmm", "nonsense"][len(out) % 3]
            out.append(cold if temperature < 1 else hot)
        return out

    monkeypatch.setattr(S, "answer_all", fake_answer_all)
    dummy = torch.nn.Linear(1, 1)
    data = R.collect([dummy, dummy], tokenizer, make, S.gold_score, 60, seed=0, log=lambda *a: None)
    assert len(data) == 60
    chosen_cold = 0
    for c in data:
        task = tasks[c.prompt[-1]["content"]]
        assert c.chosen != c.rejected and c.kind == task.kind
        assert R.rate(task, c.chosen, c.rejected) == (0, c.rating)   # chosen first: preferred, same rating
        assert S.gold_score(task, c.chosen) >= S.gold_score(task, c.rejected)
        chosen_cold += c.chosen == task.answer
    assert chosen_cold > 40   # the reference wins unless the near miss ties it
    # two answers as bad as each other: the annotator is unsure, and picks either (the order
    # shown is random), so the cold variant is not always "chosen"
    monkeypatch.setattr(S, "answer_all", lambda m, t, dialogs, *a: [("foo" if a[2] < 1 else "bar")] * len(dialogs))
    ties = R.collect([dummy, dummy], tokenizer, make, S.gold_score, 60, seed=1, log=lambda *a: None)
    assert all(c.rating == NEGL for c in ties) and 15 < sum(c.chosen == "foo" for c in ties) < 45


def test_no_test_prompt_occurs_in_the_training_pairs():
    """reward.json's overlap on the default settings: the training pairs' prompts (1,200 helpful,
    500 safety; drawn here three times over, as collect draws more where answers tie) from 03's
    training part, the --test-comparisons (default) test prompts of each set from its evaluation part,
    as main collects them."""
    world, train, test = P.make_world(0), [], []
    n_test = R.parse_args([]).test_comparisons
    for make, n, seed in ((R.helpful_task, 1200, 0), (R.safety_task, 500, 1)):
        rng = random.Random(seed)
        train += [make(world, rng).prompt for _ in range(3 * n)]
        rng = random.Random(seed + 1_000_003)
        test += [make(world, rng, evaluation=True).prompt for _ in range(n_test)]
    assert S.overlap(test, train) == 0
    rng = random.Random(1_000_003)   # test prompts from the training part, as before the split: many repeat
    assert S.overlap([R.helpful_task(world, rng).prompt for _ in range(400)], train) > 100


def test_mix_follows_the_paper():
    helpful, safety = list(range(100)), list(range(1000, 1045))
    mixed = R.mix(helpful, safety, "helpful", "paper")
    assert mixed == helpful + safety[:11]          # all helpfulness data, 90%; safety data 10%
    mixed = R.mix(helpful, safety, "safety", "paper")
    assert mixed == safety + helpful[:5]           # 90% safety, 10% helpfulness
    assert R.mix(helpful, safety, "safety", "none") == safety


def test_data_stats_in_table6_shape(tokenizer):
    c = R.Comparison([{"role": "user", "content": "a b"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": "What is 1 + 1?"}], "1 + 1 = 2.", "no", SIG)
    stats = R.data_stats(tokenizer, [c, R.Comparison([{"role": "user", "content": "Hi"}], "Hello.", "Go", NEGL)])
    n = lambda s: len(tokenizer.encode(s, bos=False, eos=False))
    assert stats["comparisons"] == 2 and stats["turns_per_dialogue"] == 1.5
    assert stats["tokens_in_prompt"] == pytest.approx((n("What is 1 + 1?") + n("Hi")) / 2)
    assert stats["tokens_in_response"] == pytest.approx((n("1 + 1 = 2.") + n("no") + n("Hello.") + n("Go")) / 4)
    assert stats["tokens_per_example"] > stats["tokens_in_prompt"] + stats["tokens_in_response"]   # template, turns
    assert stats["ratings"][SIG] == 0.5 and stats["ratings"][BETTER] == 0


# --- real data: errors name file and line ---------------------------------------------------

def test_jsonl_errors_name_file_and_line(tmp_path):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away", "rating": "better"}
    path = tmp_path / "pairs.jsonl"
    cases = [("{not json", r"pairs.jsonl:2: not valid JSON"),
             (json.dumps({"prompt": "hi", "chosen": "a"}), r"pairs.jsonl:2: missing 'rejected'"),
             (json.dumps({**good, "rating": "much better"}), r"pairs.jsonl:2: rating 'much better' is not one of"),
             (json.dumps({**good, "chosen": 3}), r"pairs.jsonl:2: 'chosen' and 'rejected' must be strings"),
             (json.dumps({**good, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
              r"pairs.jsonl:2: the prompt must end with the user's message"),
             (json.dumps([1, 2]), r"pairs.jsonl:2: expected an object")]
    for line, message in cases:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(UserError, match=message):
            R.read_pairs_jsonl(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "rejected": " hello "}) + "\n"
                    + json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                                  "chosen": "a", "rejected": "b"}) + "\n")
    data = R.read_pairs_jsonl(path)
    assert len(data) == 2                                        # the identical pair is dropped
    assert data[0].rating == "better" and data[1].rating == "" and data[1].prompt[-1]["content"] == "q"
    path.write_text(json.dumps({**good, "rejected": "hello"}) + "\n")
    with pytest.raises(UserError, match="no comparisons"):
        R.read_pairs_jsonl(path)
    with pytest.raises(UserError, match="not found"):
        R.read_pairs_jsonl(tmp_path / "missing.jsonl")


# --- checkpoints, and a whole run on separable data ------------------------------------------

def test_init_from_lm_and_clear_errors(tokenizer, tmp_path):
    torch.manual_seed(0)
    lm = M.Transformer(replace(M.PRESETS["micro"], vocab_size=tokenizer.n_words))
    M.save_model(lm, tmp_path / "lm.pt")
    rm = R.RewardModel.from_lm(tmp_path / "lm.pt")
    assert rm.output is None and rm.reward_head.weight.shape == (1, lm.args.dim)
    assert torch.equal(rm.layers[1].feed_forward.w2.weight, lm.layers[1].feed_forward.w2.weight)
    with pytest.raises(UserError, match="not a reward model"):
        R.RewardModel.from_pretrained(tmp_path / "lm.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        R.RewardModel.from_pretrained(tmp_path / "junk.pt")


def test_a_lazy_rm_is_read_as_it_is_sharded_and_equals_an_eager_one(tokenizer, tmp_path):
    """--fsdp: from_lm and from_pretrained(lazy=True) leave the RM on the meta device, its trunk in
    the files (here Meta's format in 2 shards), its fresh head drawn already; filled (as 03's
    shard_model fills it, a part at a time), it scores as the eagerly built RM."""
    torch.manual_seed(0)
    lm = M.Transformer(replace(M.PRESETS["micro"], vocab_size=tokenizer.n_words))
    M.save_meta(lm, tmp_path / "meta", num_shards=2)
    lazy, eager = (R.RewardModel.from_lm(tmp_path / "meta", seed=3, lazy=flag) for flag in (True, False))
    assert all(p.is_meta for p in lazy.parameters()) and lazy.training
    for name, block in lazy.layers.named_children():
        M.fill_from_state(block, *lazy.pending, prefix=f"layers.{name}.")
    M.fill_from_state(lazy, *lazy.pending)
    tokens, real = torch.randint(3, tokenizer.n_words, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
    assert torch.equal(lazy(tokens, real), eager(tokens, real))
    M.save_model(eager, tmp_path / "rm.pt")
    frozen = R.RewardModel.from_pretrained(tmp_path / "rm.pt", dtype=torch.bfloat16, lazy=True)
    M.fill_from_state(frozen, *frozen.pending)
    assert frozen.reward_head.weight.dtype == torch.bfloat16
    assert torch.equal(frozen.reward_head.weight, eager.reward_head.weight.bfloat16())


def test_every_rank_scores_a_share_of_the_test_pairs_under_fsdp(tmp_path, torchrun):
    """evaluate_rm under torchrun --fsdp (2 processes, gloo): each rank scores its share of 5 test
    pairs (3 and 2, 2 a batch), rank 1 adding a forward on padding so that both run as many (each
    is a collective), and both get the one-process figures."""
    import textwrap
    torch.manual_seed(0)
    rm = R.RewardModel(replace(M.PRESETS["micro"]))
    M.save_model(rm, tmp_path / "rm.pt")
    g = torch.Generator().manual_seed(1)
    draw = lambda: torch.randint(3, 200, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
    test = [(draw(), draw(), R.RATINGS[i % len(R.RATINGS)]) for i in range(5)]
    (tmp_path / "test.json").write_text(json.dumps(test))
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(f"""
        import importlib, json, sys
        import torch, torch.distributed as dist
        sys.path.insert(0, {str(tok.REPO)!r})
        P, R = (importlib.import_module(m) for m in ("03_pretrain", "05_reward"))
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        rm = P.shard_model(R.RewardModel.from_pretrained({str(tmp_path / "rm.pt")!r}))
        forwards = []
        rm.register_forward_hook(lambda *a: forwards.append(1))
        test = [tuple(t) for t in json.load(open({str(tmp_path / "test.json")!r}))]
        result = R.evaluate_rm(rm, test, 0, batch_size=2, part=(rank, 2))
        json.dump(dict(result=result, forwards=len(forwards)), open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
        dist.barrier()
        dist.destroy_process_group()
        """))
    torchrun(script, timeout=240)
    one = json.loads(json.dumps(R.evaluate_rm(R.RewardModel.from_pretrained(tmp_path / "rm.pt"), test, 0,
                                              batch_size=2)))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["forwards"] == 4   # chosen and rejected, 2 batches each (rank 1: one of them padding)
        assert got["result"].keys() == one.keys()
        for key, value in one.items():
            assert got["result"][key] == pytest.approx(value, abs=1e-5), key


def separable(path, n, seed):
    """Comparisons a reward model learns in a few steps: the answer the prompt asks for wins.
    Each answer wins half the time, so no fixed preference (an untrained model's) gets them right."""
    rng, lines = random.Random(seed), []
    for _ in range(n):
        want, other = rng.sample(["yes", "no"], 2)
        lines.append(json.dumps({"prompt": f"Say {want}, {rng.choice(P.WORDS)}.", "chosen": want,
                                 "rejected": other, "rating": SIG}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_main(tokenizer, tmp_path, run, *extra):
    tok_file = tmp_path / "tok.model"
    tok_file.write_bytes(tokenizer.sp_model.serialized_model_proto())
    if not (tmp_path / "lm.pt").is_file():
        torch.manual_seed(0)
        M.save_model(M.Transformer(replace(M.PRESETS["micro"], vocab_size=tokenizer.n_words)), tmp_path / "lm.pt")
    return R.main(["--preset", "micro", "--init", str(tmp_path / "lm.pt"), "--tokenizer", str(tok_file),
                   "--run-dir", str(tmp_path / run), "--helpful-data", str(separable(tmp_path / "h.jsonl", 200, 0)),
                   "--safety-data", str(separable(tmp_path / "s.jsonl", 160, 1)), "--seq-len", "32",
                   "--micro-batch", "16", "--batch-tokens", "512", "--lr", "3e-3", "--log-every", "5",
                   "--ckpt-every", "5", "--epochs", "3", "--no-ablations", *extra])


def test_trained_rm_ranks_separable_pairs_and_resumes_exactly(tokenizer, tmp_path):
    out = run_main(tokenizer, tmp_path, "a")
    for rm in ("helpful", "safety"):   # 10 and 8 held-out pairs (every 20th line)
        assert out["table8"][f"{'Safety' if rm == 'safety' else 'Helpfulness'} RM, {rm} test"]["avg"] == 1.0
    # a user's data is not split by construction: every test prompt here also occurs in training
    assert json.loads((tmp_path / "a" / "reward.json").read_text())["overlap"] == 10 + 8
    rm = R.RewardModel.from_pretrained(tmp_path / "a" / "rm_helpful.pt")
    scores = R.score_texts(rm, tokenizer, ["Say no, rain."] * 2 + ["Say yes, rain."] * 2, ["yes", "no"] * 2)
    assert scores[1] > scores[0] and scores[2] > scores[3]
    # cut off at step 10 of 129, then resumed: the same weights as the run never stopped
    run_main(tokenizer, tmp_path, "b", "--stop-at", "10")
    run_main(tokenizer, tmp_path, "b", "--resume")
    a, b = (R.RewardModel.from_pretrained(tmp_path / r / "rm_helpful.pt") for r in ("a", "b"))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_careless_split_groups_the_test_pairs(monkeypatch):
    """Pairs with one careless answer, pairs of two careful ones, and of those the sums; near ties
    (rated negligibly better) in none."""
    sloppy = S.CARELESS["arithmetic"]
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    pairs = [R.Comparison(prompt, "2 + 3 = 5.", sloppy, "better", "arithmetic"),
             R.Comparison(prompt, "2 + 3 = 5.", "2 + 3 = 6.", "better", "arithmetic"),
             R.Comparison(prompt, "1 2 3.", "3 2 1.", "better", "list"),
             R.Comparison(prompt, sloppy, "I am not sure about Mira Vell.", "negligibly better / unsure", "fact"),
             R.Comparison(prompt, "I am not sure about Mira Vell.", "Mira Vell lives in Ashby.", "better", "fact"),
             R.Comparison(prompt, "2 + 3 = 5.", sloppy, "negligibly better / unsure", "arithmetic"),   # left out
             R.Comparison(prompt, "2 + 3 = 4.", "2 + 3 = 6.", "negligibly better / unsure", "arithmetic")]
    seen = {}

    def fake_evaluate(model, rows, pad_id):
        seen[len(seen)] = rows
        return {"avg": len(rows) / 10}

    monkeypatch.setattr(R, "evaluate_rm", fake_evaluate)
    out = R.careless_split(None, pairs, list(range(len(pairs))), 0)
    assert out == {"one careless answer": (0.2, 2), "two careful answers": (0.2, 2),
                   "two careful answers to a sum": (0.1, 1)}
    assert seen == {0: [0, 4], 1: [1, 2], 2: [1]}


def test_warmup_steps_zero_is_kept():
    """--warmup-steps 0 means no warm-up, not the default (an `or` once replaced it)."""
    assert R.warmup_steps(0, 54) == 0
    assert R.warmup_steps(None, 54) == 5 and R.warmup_steps(None, 1000) == 30
    assert R.warmup_steps(7, 54) == 7
