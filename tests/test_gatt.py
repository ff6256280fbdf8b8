"""Chapter 07: the GAtt sample builder and its loss mask, the instruction annotator, the
multi-turn driver, the attention extraction, and a run end to end at micro size."""
import argparse
import importlib
import json
import random
import re
from dataclasses import replace

import pytest
import torch

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
S = importlib.import_module("04_sft")
G = importlib.import_module("07_gatt")
UserError = tok.UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small tokenizer trained here on a play and toy-world dialogues with instructions."""
    root = tmp_path_factory.mktemp("gatt_tok")
    text = (tok.DEFAULT_CORPUS_DIR / "hamlet_gut.txt").read_text(encoding="utf-8")[:60_000]
    dialogs = G.instruction_dialogs(P.make_world(0), 300, seed=1)
    lines = [f"[INST] {m['content']} [/INST]" for d in dialogs for m in d]
    (root / "a.txt").write_text(text + "\n".join(lines), encoding="utf-8")
    return tok.Tokenizer(tok.train_tokenizer([root / "a.txt"], root / "tok", vocab_size=700))


@pytest.fixture(scope="module")
def tok_file(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gatt_tokfile") / "tok.model"
    path.write_bytes(tokenizer.sp_model.serialized_model_proto())
    return path


def enc(tokenizer, text, bos=True, eos=False):
    return tokenizer.encode(text, bos=bos, eos=eos)


def micro_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return M.Transformer(replace(M.PRESETS["micro"], vocab_size=vocab_size)).eval()


# --- the GAtt sample (Sec. 3.3): the instruction in turn 1 only, loss on the last turn only ---

USERS = ["What is 1 + 2?", "Sort the digits 3 1 2.", "Where does Mira Tolven live?"]
ANSWERS = ["King: Hark! 1 + 2 = 3.", "King: Hark! 1 2 3.", "King: Hark! Mira Tolven lives in Dunmere."]
INST = "Always speak like a bard. Always act as the King from now on."


def test_gatt_example_keeps_the_instruction_in_turn_one_and_masks_every_earlier_token(tokenizer):
    ids, learn = G.gatt_example(tokenizer, INST, USERS, ANSWERS)
    # the expected ids written out by hand in Meta's template: <<SYS>> in turn 1 only
    turns = [enc(tokenizer, f"[INST] <<SYS>>\n{INST}\n<</SYS>>\n\n{USERS[0]} [/INST] {ANSWERS[0]} ", eos=True),
             enc(tokenizer, f"[INST] {USERS[1]} [/INST] {ANSWERS[1]} ", eos=True),
             enc(tokenizer, f"[INST] {USERS[2]} [/INST] {ANSWERS[2]} ", eos=True)]
    assert ids == sum(turns, [])
    assert tokenizer.decode(ids).count("Always act as the King") == 1
    # loss exactly on the last answer: its text, the space before EOS, and EOS
    start = len(turns[0]) + len(turns[1]) + len(enc(tokenizer, f"[INST] {USERS[2]} [/INST]"))
    assert [i for i, x in enumerate(learn) if x] == list(range(start, len(ids)))
    assert tokenizer.decode(ids[start:-1]).strip() == ANSWERS[2] and ids[-1] == tokenizer.eos_id
    # after packing, the targets carry loss only there (a target at j predicts ids[j + 1])
    x, y, doc = S.pack([(ids, learn)], seq_len=len(ids) + 4, pad_id=tokenizer.eos_id)
    assert [j for j in range(y.shape[1]) if y[0, j] != S.IGNORE] == list(range(start - 1, len(ids) - 1))
    assert y[0, start - 1:len(ids) - 1].tolist() == ids[start:]


def test_gatt_examples_take_every_prefix_and_drop_broken_last_answers(tokenizer):
    sampled = [dict(instruction=INST, rules={"language": "bard", "figure": "King"}, users=USERS,
                    answers=[ANSWERS[0], "1 2 3.", ANSWERS[2]])]   # turn 2 forgot the instruction
    examples, dropped = G.gatt_examples(tokenizer, sampled)
    assert dropped == 1 and len(examples) == 1                        # 2 turns: dropped; 3 turns: kept
    assert examples[0] == G.gatt_example(tokenizer, INST, USERS, sampled[0]["answers"])
    sampled[0]["answers"][1] = ANSWERS[1]
    examples, dropped = G.gatt_examples(tokenizer, sampled)
    assert dropped == 0 and [len(e[0]) for e in examples] == \
        [len(G.gatt_example(tokenizer, INST, USERS[:k], ANSWERS[:k])[0]) for k in (2, 3)]


def test_plain_history_strips_the_rules_of_the_earlier_answers_only(tokenizer):
    sampled = [dict(instruction=INST, rules={"language": "bard", "figure": "King"}, users=USERS, answers=ANSWERS)]
    plain = lambda k: [G.strip_rules(a) for a in ANSWERS[:k - 1]] + [ANSWERS[k - 1]]
    examples, _ = G.gatt_examples(tokenizer, sampled, plain_history=1.0)
    assert examples == [G.gatt_example(tokenizer, INST, USERS[:k], plain(k)) for k in (2, 3)]
    assert "King: Hark! 1 + 2 = 3." not in tokenizer.decode(examples[1][0])       # turn 1's answer, plain
    assert tokenizer.decode(examples[1][0]).count("King: Hark!") == 1              # the supervised one keeps it
    assert G.gatt_examples(tokenizer, sampled, plain_history=0.0)[0] == \
        [G.gatt_example(tokenizer, INST, USERS[:k], ANSWERS[:k]) for k in (2, 3)]
    mixed = G.gatt_examples(tokenizer, sampled * 40, plain_history=0.5, seed=3)[0]
    assert 0 < sum(e in examples for e in mixed) < len(mixed)                      # some of each


def test_a_long_gatt_sample_loses_its_middle_turns_but_not_the_instruction_or_the_last(tokenizer):
    full = G.gatt_example(tokenizer, INST, USERS, ANSWERS)[0]
    short = G.gatt_example(tokenizer, INST, USERS[::2], ANSWERS[::2])               # turns 1 and 3
    assert G.gatt_example(tokenizer, INST, USERS, ANSWERS, max_len=len(full)) == \
        G.gatt_example(tokenizer, INST, USERS, ANSWERS)
    assert G.gatt_example(tokenizer, INST, USERS, ANSWERS, max_len=len(full) - 1) == short
    assert G.gatt_example(tokenizer, INST, USERS, ANSWERS, max_len=5) == short      # never fewer than 2 turns


def test_copy_control_teacher_forces_plain_answers_and_scores_each_turn(tokenizer, monkeypatch):
    tasks = [S.Task("arithmetic", f"What is {i} + 1?", f"{i} + 1 = {i + 1}.", str(i + 1)) for i in range(3)]
    dialogs = [("Figure: King", {"figure": "King"}, tasks), ("Hobby: wine", {"hobby": "wine"}, tasks)]
    seen, turn, fit = [], [], G.fit

    def spy_fit(tok_, dialog, budget):   # each prompt, as a dialogue, before it is answered
        turn.append(list(dialog))
        return fit(tok_, dialog, budget)

    def fake_generate(model, prompts, *args, **kwargs):   # follows the rule in its first two turns
        seen.extend(turn)
        answers = [("King: I enjoy wine. " if sum(m["role"] == "user" for m in p) <= 2 else "") + "3." for p in turn]
        turn.clear()
        return [tokenizer.encode(a, bos=False, eos=False) for a in answers]
    monkeypatch.setattr(G, "fit", spy_fit)
    monkeypatch.setattr(M, "generate", fake_generate)
    r = G.adherence_given_plain_history(micro_model(tokenizer.n_words), tokenizer, dialogs)
    assert r["by_turn"] == [1.0, 1.0, 0.0] and r["followed"] == [[True, True, False]] * 2
    assert len(seen) == 6
    for p in seen:   # the instruction as the system message; earlier turns: 04's reference answers, plain
        assert p[0] == {"role": "system", "content": p[0]["content"]} and p[-1]["role"] == "user"
        assert [m["content"] for m in p if m["role"] == "assistant"] == [t.answer for t in tasks[:len(p) // 2 - 1]]


# --- the annotator ---------------------------------------------------------------------------

def test_follows_on_hand_made_answers():
    rules = {"language": "pirate", "figure": "King", "hobby": "music"}
    assert G.follows(rules, "King: Arr! I enjoy music. 1 + 2 = 3.") == dict.fromkeys(rules, True)
    assert G.follows(rules, "  King: Arr! 3. I like music ") == dict.fromkeys(rules, True)   # any mention
    assert G.follows(rules, "1 + 2 = 3.") == dict.fromkeys(rules, False)
    assert G.follows(rules, "Queen: Hark! I enjoy wine. 3.") == dict.fromkeys(rules, False)
    assert G.follows(rules, "Arr! King: 3.") == {"language": True, "figure": False, "hobby": False}   # label first
    assert G.follows(rules, "3. King: Arr!") == {"language": False, "figure": False, "hobby": False}  # it opens
    assert G.follows({"language": "pirate"}, "Duke: Arr! 3.") == {"language": True}   # after any speaker
    assert G.follows({"figure": "King"}, "Kingdom: 3.") == {"figure": False}
    assert G.follows({"hobby": "dance"}, "I enjoy dancer.") == {"hobby": False}        # the word, whole


def test_adherence_by_turn_on_hand_made_answers(tokenizer, monkeypatch):
    tasks = [S.Task("arithmetic", "What is 1 + 2?", "1 + 2 = 3.", "3")] * 3
    dialogs = [("Figure: King", {"figure": "King"}, tasks),
               ("Language: pirate; Hobby: wine", {"language": "pirate", "hobby": "wine"}, tasks)]
    scripted = [["King: 1 + 2 = 3.", "King: 1 + 2 = 3.", "1 + 2 = 3."],             # forgets at turn 3
                ["Arr! I enjoy wine. 1 + 2 = 3.", "Arr! 1 + 2 = 4.", "Hark! I enjoy wine. 3."]]

    def fake_converse(model, tok_, instructions, users, every_turn, *args, **kwargs):
        assert not every_turn and instructions == [d[0] for d in dialogs]
        return [[{"role": "system", "content": inst}] + [{"role": r, "content": c} for u, a in zip(us, answers)
                                                         for r, c in (("user", u), ("assistant", a))]
                for inst, us, answers in zip(instructions, users, scripted)], scripted
    monkeypatch.setattr(G, "converse", fake_converse)
    r = G.adherence(micro_model(tokenizer.n_words), tokenizer, dialogs)
    assert r["by_turn"] == [1.0, 0.5, 0.0]
    assert r["by_family"] == {"language": [1.0, 1.0, 0.0], "figure": [1.0, 1.0, 0.0], "hobby": [1.0, 0.0, 1.0]}
    assert r["gold"] == pytest.approx((1 + 1 + 1 + 1 + 0.5 * (1 - 1 / 10) + 1) / 6)   # "1 + 2 = 4." is close
    assert r["window_from"] is None                                                # short: nothing dropped


def test_rules_applied_then_stripped_give_back_the_answer_and_its_gold():
    world, rng = P.make_world(0), random.Random(0)
    for _ in range(200):
        text, rules = G.random_instruction(rng)
        assert 1 <= len(rules) <= 2 and all(v in G.FAMILIES[f] for f, v in rules.items())
        assert all(v in text for v in rules.values())
        task = G.task_turn(world, rng)
        answer = G.apply_rules(rules, task.answer)
        assert all(G.follows(rules, answer).values())
        assert G.strip_rules(answer) == task.answer and S.gold_score(task, G.strip_rules(answer)) == 1.0


def test_gatts_instructions_take_every_training_rule_set_as_often_as_the_others():
    """balanced_instructions: half of one family, half of two; within each half every rule set of
    the training part comes as often as the others, to one; no held-out pair; both forms."""
    singles, pairs = G.rule_sets()
    held = G.rule_sets(evaluation=True)[1]
    assert len(singles) == 11 and len(pairs) == 30 and len(held) == 10
    assert not {tuple(r.items()) for r in pairs} & {tuple(r.items()) for r in held}
    rng = random.Random(0)
    drawn_pairs = {tuple(r.items()) for r in (G.random_instruction(rng)[1] for _ in range(1000)) if len(r) == 2}
    assert drawn_pairs == {tuple(r.items()) for r in pairs}      # random_instruction's training part
    for n in (96, 7):
        drawn = G.balanced_instructions(random.Random(n), n)
        assert len(drawn) == n and sum(len(r) == 2 for _, r in drawn) == n // 2
        for group in (singles, pairs):
            counts = [sum(r == g for _, r in drawn) for g in group]
            assert max(counts) - min(counts) <= 1, counts
        for text, rules in drawn:
            assert all(v in text for v in rules.values())
    short = sum(t.startswith(("Language:", "Figure:", "Hobby:")) for t, _ in G.balanced_instructions(random.Random(0), 400))
    assert 150 < short < 250


def test_instructions_come_in_long_and_short_forms():
    rng = random.Random(0)
    texts = [G.random_instruction(rng)[0] for _ in range(400)]
    short = sum(t.startswith(("Language:", "Figure:", "Hobby:")) for t in texts)
    assert 150 < short < 250                                   # half the time (Sec. 3.3)
    assert any(";" in t for t in texts)                        # combined


def test_two_family_instructions_are_split_and_single_ones_shared():
    rng = random.Random(0)
    drawn = {part: [G.random_instruction(rng, evaluation=part)[1] for _ in range(600)] for part in (False, True)}
    pairs = {part: {tuple(r.items()) for r in rules if len(r) == 2} for part, rules in drawn.items()}
    singles = {part: {tuple(r.items()) for r in rules if len(r) == 1} for part, rules in drawn.items()}
    assert pairs[False] and pairs[True] and not pairs[False] & pairs[True]
    assert singles[False] == singles[True] and len(singles[True]) == sum(map(len, G.FAMILIES.values()))
    assert all(200 < sum(len(r) == 2 for r in rules) < 400 for rules in drawn.values())   # half combine two
    assert all(any(v in dict(p).values() for p in pairs[False]) for vs in G.FAMILIES.values() for v in vs)
    # a quarter held out, and no value held out with more than one value of another family: each
    # value is trained with all but at most one partner of each other family
    assert len(pairs[True]) == 10 and len(pairs[False]) == 30
    for (f1, v1), (f2, v2) in pairs[True]:
        for f, v, other in ((f1, v1, f2), (f2, v2, f1)):
            held = [p for p in pairs[True] if (f, v) in p and other in dict(p)]
            trained = [p for p in pairs[False] if (f, v) in p and other in dict(p)]
            assert len(held) == 1 and len(trained) == len(G.FAMILIES[other]) - 1


def test_held_out_pair_is_a_diagonal():
    assert [(i, j) for i in range(3) for j in range(4) if P.held_out_pair(i, j, 4)] == [(0, 0), (1, 3), (2, 2)]
    assert sum(P.held_out_pair(i, j, 4) for i in range(4) for j in range(4)) == 4


def test_no_evaluation_prompt_occurs_in_the_training_dialogues(tokenizer, monkeypatch):
    """gatt.json's overlap on the default settings: the adherence dialogues (32 x 20 turns), the
    16 attention dialogues and 04's 40 prompts a kind, against step 1's 4,000 dialogues, the 96
    GAtt dialogues of 8 turns and the replayed step-1 dialogues (one per GAtt sample: 672)."""
    world = P.make_world(0)
    monkeypatch.setattr(G, "converse", lambda model, tok_, instructions, users, *a, **k: (
        [[{"role": "user", "content": u} for u in us] for us in users], [[] for _ in users]))   # no model
    sampled = G.sample_gatt_dialogs(torch.nn.Linear(1, 1), tokenizer, world, 96, 8, 0, 0.7)
    args = argparse.Namespace(seed=0, inst_examples=4000)
    dialogs = G.eval_dialogs(world, 32, 20, 0)
    evaluation = G.evaluation_texts(dialogs, G.attention_dialogs(tokenizer, world, 16, 0, 512),
                                    S.eval_tasks(world, 40, 0))
    assert any(len(rules) == 2 for _, rules, _ in dialogs) and len(evaluation) > 32 * 20 + 5 * 40
    assert S.overlap(evaluation, G.training_texts(world, args, sampled, 96 * 7)) == 0


# --- talking to the model turn by turn ----------------------------------------------------------

def test_converse_places_the_instruction_as_sec_3_3_says(tokenizer, monkeypatch):
    seen, turn, fit = [], [], G.fit

    def spy_fit(tok_, dialog, budget):   # each prompt of a turn, as a dialogue, before it is answered
        turn.append(list(dialog))
        return fit(tok_, dialog, budget)

    def fake_generate(model, prompts, *args, session=None, **kwargs):
        seen.append(list(turn))
        turn.clear()
        return [tokenizer.encode(f"answer {len(d)}", bos=False, eos=False) for d in seen[-1]]
    monkeypatch.setattr(G, "fit", spy_fit)
    monkeypatch.setattr(M, "generate", fake_generate)
    model = micro_model(tokenizer.n_words)
    users = [["u1", "u2", "u3"], ["v1", "v2"]]
    talks, answers = G.converse(model, tokenizer, ["INST A", "INST B"], users, every_turn=True)
    assert answers == [["answer 1", "answer 3", "answer 5"], ["answer 1", "answer 3"]]
    assistant = lambda talk: [m["content"] for m in talk if m["role"] == "assistant"]
    assert [assistant(t) for t in talks] == answers
    assert len(seen) == 3 and [len(batch) for batch in seen] == [2, 2, 1]
    last = seen[-1][0]                                             # sampling: in every user message
    assert [m["content"] for m in last if m["role"] == "user"] == ["INST A\nu1", "INST A\nu2", "INST A\nu3"]
    seen.clear()
    talks, answers = G.converse(model, tokenizer, ["INST A", "INST B"], users, every_turn=False,
                                written=[["w1", "w2", "w3"], ["x1", "x2"]])
    last = seen[-1][0]                                             # evaluation: a system message, turn 1
    assert last[0] == {"role": "system", "content": "INST A"}
    assert [m["content"] for m in last if m["role"] == "user"] == ["u1", "u2", "u3"]
    # the copy control: the given answers written back, the model's returned
    assert [m["content"] for m in last if m["role"] == "assistant"] == ["w1", "w2"]
    assert assistant(talks[1]) == ["x1", "x2"] and answers[1] == ["answer 2", "answer 4"]


def test_converse_keeps_the_cache_yet_answers_as_fresh_generation(tokenizer):
    """converse reads each turn through 02's Session, dropping finished dialogues from the batch:
    the same answers as generating each turn's fitted dialogue afresh (a context of 128 tokens,
    so later turns drop earlier ones; float64, so rounding cannot flip a greedy token)."""
    model = M.Transformer(replace(M.PRESETS["micro"], vocab_size=tokenizer.n_words, max_seq_len=128)).double().eval()
    users = [[f"What is {i} + {t}?" for t in range(n)] for i, n in enumerate((7, 4, 7))]
    talks, answers = G.converse(model, tokenizer, ["Hobby: music", "Figure: King", "Language: bard"], users,
                                every_turn=False, max_new_tokens=12, batch_size=2)
    for talk, own in zip(talks, answers):
        for t in range(len(own)):
            prompt = G.fit(tokenizer, talk[:2 + 2 * t], 128 - 12)
            fresh = M.generate(model, [S.encode_dialog(tokenizer, prompt)[0]], 12, 0.0, eos_id=tokenizer.eos_id)[0]
            assert own[t] == tokenizer.decode(fresh).strip()
    assert len(S.encode_dialog(tokenizer, talks[0][:-1])[0]) > 128   # some turns were dropped


def test_fit_drops_the_oldest_turns_but_keeps_the_first(tokenizer):
    dialog = [{"role": "system", "content": INST}]
    for i in range(12):
        dialog += [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}."}]
    dialog.append({"role": "user", "content": "Last?"})
    assert G.fit(tokenizer, dialog, 10_000) == dialog
    cut = G.fit(tokenizer, dialog, 150)
    assert len(S.encode_dialog(tokenizer, cut)[0]) <= 150
    assert cut[:3] == dialog[:3] and cut[-3:] == dialog[-3:] and len(cut) < len(dialog)


# --- attention maps -------------------------------------------------------------------------------

def test_attention_rows_sum_to_one_and_reproduce_each_layers_output():
    model = micro_model(300)
    tokens = torch.randint(0, 300, (2, 37))
    maps = G.attention_maps(model, tokens)
    assert len(maps) == model.args.n_layers
    # reduce: each layer's map reduced as computed (what system_attention keeps), the same numbers
    reduced = G.attention_maps(model, tokens, reduce=lambda p: p[:, :, -1])
    assert len(reduced) == len(maps) and all(torch.equal(r, m[:, :, -1]) for r, m in zip(reduced, maps))
    h = model.tok_embeddings(tokens)
    freqs = model.freqs_cis[:, :37]
    for layer, probs in zip(model.layers, maps):
        assert probs.shape == (2, model.args.n_heads, 37, 37)
        assert torch.allclose(probs.sum(-1), torch.ones(2, model.args.n_heads, 37), atol=1e-5)
        assert (probs.triu(1) == 0).all()                                   # causal: no look ahead
        a = layer.attention
        v = M.repeat_kv(a.wv(layer.attention_norm(h)).view(2, 37, a.n_kv_heads, a.head_dim), a.n_rep)
        mixed = (probs @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 37, -1)
        with torch.no_grad():
            reference = a(layer.attention_norm(h), 0, freqs, None)          # 02's SDPA path
            assert torch.allclose(a.wo(mixed), reference, atol=1e-5)
            h = layer(h, 0, freqs, None)


def test_system_attention_is_a_share_per_layer_and_turn(tokenizer):
    model = micro_model(tokenizer.n_words)
    dialogs = G.attention_dialogs(tokenizer, P.make_world(0), 3, seed=0, max_len=200)
    assert all(len(S.encode_dialog(tokenizer, d)[0]) <= 200 for d in dialogs)
    n_turns = [(len(d) - 1) // 2 for d in dialogs]
    rows = G.system_attention(model, tokenizer, dialogs)
    assert len(rows) == model.args.n_layers and all(len(r) == max(n_turns) for r in rows)
    assert all(0 < x <= 1 for r in rows for x in r)
    # the system block: from after "[INST]" to the user's text
    ids = S.encode_dialog(tokenizer, dialogs[0])[0]
    start, end = G.system_span(tokenizer, dialogs[0][0]["content"])
    assert tokenizer.decode(ids[start:end]).strip() == f"<<SYS>>\n{dialogs[0][0]['content']}\n<</SYS>>"
    # one dialogue: exactly the attention of its turn-opening positions, most attentive head
    maps = G.attention_maps(model, torch.tensor([ids]))
    one = G.system_attention(model, tokenizer, dialogs[:1])
    is_answer = S.encode_dialog(tokenizer, dialogs[0])[1]
    opens = [i - 1 for i in range(1, len(ids)) if is_answer[i] and not is_answer[i - 1]]
    assert len(opens) == n_turns[0]
    for layer, probs in enumerate(maps):
        expected = [max(probs[0, h, p, start:end].sum().item() for h in range(model.args.n_heads)) for p in opens]
        assert one[layer] == pytest.approx(expected, abs=1e-6)


# --- the whole chapter, at micro size ------------------------------------------------------------

def micro_gatt(tok_file, init, run_dir, *extra):
    return G.main(["--preset", "micro", "--init", str(init), "--tokenizer", str(tok_file),
                   "--run-dir", str(run_dir), "--inst-examples", "60", "--inst-steps", "2", "--steps", "2",
                   "--dialogues", "6", "--train-turns", "3", "--eval-dialogues", "3", "--eval-turns", "3",
                   "--eval-per-kind", "1", "--seq-len", "256", "--micro-batch", "2", "--batch-tokens", "512",
                   "--warmup-steps", "1", "--log-every", "1", *extra])


@pytest.fixture
def following(monkeypatch):
    """A micro model follows no instruction: its sampled answers are rewritten to follow
    theirs, so GAtt has data (the sampling itself still runs)."""
    sample = G.sample_gatt_dialogs

    def sample_following(*args, **kwargs):
        out = sample(*args, **kwargs)
        for s in out:
            s["answers"] = [G.apply_rules(s["rules"], a) for a in s["answers"]]
        return out
    monkeypatch.setattr(G, "sample_gatt_dialogs", sample_following)


def test_step1_trains_another_round_while_its_samples_do_not_follow(tokenizer, tok_file, tmp_path, monkeypatch):
    """The micro model follows nothing: its first samples are left as they are (none follows), the
    next ones rewritten to follow. So step 1 runs a second round, on new dialogues, from the
    first round's model; GAtt starts from the second round's model and trains on its samples; the
    held-out check counts the second round's dialogues too."""
    sample, calls = G.sample_gatt_dialogs, []

    def sample_following_later(model, *args, **kwargs):
        out = sample(model, *args, **kwargs)
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        for s in out if len(calls) > 1 else []:
            s["answers"] = [G.apply_rules(s["rules"], a) for a in s["answers"]]
        return out
    monkeypatch.setattr(G, "sample_gatt_dialogs", sample_following_later)
    torch.manual_seed(0)
    M.save_model(micro_model(tokenizer.n_words), tmp_path / "start.pt")
    micro_gatt(tok_file, tmp_path / "start.pt", tmp_path / "run")
    run = tmp_path / "run"
    data = json.loads((run / "gatt.json").read_text())
    assert len(calls) == 2 and data["gatt_data"]["step1_rounds"] == 2
    assert data["gatt_data"]["answers_following_by_round"][0] < G.STEP1_FOLLOWING
    assert data["gatt_data"]["answers_following_by_round"][1] == 1.0
    assert {"step1", "step1_round2", "gatt"} <= set(data["histories"]) and data["histories"]["step1_round2"]
    assert (run / "gatt_samples_2.jsonl").is_file() and data["overlap"] == 0
    first, second = (M.load_checkpoint(run / f)["model"] for f in ("gatt_before.pt", "gatt_before_2.pt"))
    assert all(torch.equal(first[k], calls[0][k]) for k in first)     # round 1 sampled from round 1's model
    assert all(torch.equal(second[k], calls[1][k]) for k in second)   # round 2 from round 2's
    assert any(not torch.equal(first[k], second[k]) for k in first)   # which trained on
    args = argparse.Namespace(seed=0, inst_examples=60)
    assert set(G.training_texts(P.make_world(0), args, [], 0, 2)) > set(G.training_texts(P.make_world(0), args, [], 0))


def test_gatt_end_to_end_then_chat(tokenizer, tok_file, tmp_path, following):
    torch.manual_seed(0)
    M.save_model(micro_model(tokenizer.n_words), tmp_path / "start.pt")
    results = micro_gatt(tok_file, tmp_path / "start.pt", tmp_path / "run")
    for name in ("gatt.pt", "gatt_before.pt", "gatt.json", "gatt_adherence.png", "gatt_attention.png",
                 "gatt_samples.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    report = json.loads((tmp_path / "run" / "gatt.json").read_text())
    assert report["gatt_data"]["samples"] == 2 * 6 * 2            # 6 dialogues x turns 2-3, plus as many replayed
    assert report["overlap"] == 0
    # step 1 takes its own batch (07's TOY_INST_BATCH_TOKENS on the CPU presets), GAtt --batch-tokens
    assert report["histories"]["step1"][-1]["tokens"] == 2 * G.TOY_INST_BATCH_TOKENS
    assert report["histories"]["gatt"][-1]["tokens"] == 2 * 512
    for name in ("before GAtt", "after GAtt"):
        assert len(report["adherence"][name]["by_turn"]) == 3
        assert len(report["attention"]["by_layer_and_turn"][name]) == 2      # micro: 2 layers
    assert set(S.COLUMNS) <= set(results["chat"]["after GAtt"])
    # 04's chat REPL talks to the GAtt model, with the instruction as its system prompt
    lines = iter(["What is 1 + 1?", "And 2 + 2?", ""])
    dialog = S.chat(["--ckpt", str(tmp_path / "run" / "gatt.pt"), "--tokenizer", str(tok_file),
                     "--system", "Figure: King", "--max-new-tokens", "4"], input_fn=lambda _: next(lines))
    assert [m["role"] for m in dialog] == ["system", "user", "assistant", "user", "assistant"]


def test_gatt_stopped_and_resumed_gives_the_same_models(tokenizer, tok_file, tmp_path, following):
    torch.manual_seed(0)
    M.save_model(micro_model(tokenizer.n_words), tmp_path / "start.pt")
    micro_gatt(tok_file, tmp_path / "start.pt", tmp_path / "a")
    assert micro_gatt(tok_file, tmp_path / "start.pt", tmp_path / "b", "--stop-at", "1") is None
    assert (tmp_path / "b" / "gatt_before.pt").is_file() and not (tmp_path / "b" / "gatt.pt").exists()
    micro_gatt(tok_file, tmp_path / "start.pt", tmp_path / "b", "--resume")
    for name in ("gatt_before.pt", "gatt.pt"):
        a, b = (M.Transformer.from_pretrained(tmp_path / run / name) for run in "ab")
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters())), name
    assert (tmp_path / "a" / "gatt_samples.jsonl").read_text() == (tmp_path / "b" / "gatt_samples.jsonl").read_text()


def test_missing_start_model_and_bad_flags_are_one_line_errors(tokenizer, tok_file, tmp_path):
    with pytest.raises(UserError, match="run 06_rs_ppo.py first"):
        G.main(["--run-dir", str(tmp_path), "--tokenizer", str(tok_file)])
    with pytest.raises(UserError, match="--train-turns must be at least 2"):
        micro_gatt(tok_file, tok_file, tmp_path, "--train-turns", "1")
    with pytest.raises(UserError, match="--inst-batch-tokens 300 is not a multiple"):
        micro_gatt(tok_file, tok_file, tmp_path, "--inst-batch-tokens", "300")
    torch.manual_seed(0)
    M.save_model(micro_model(tokenizer.n_words), tmp_path / "start.pt")
    with pytest.raises(UserError, match="step 1 did not teach the rules"):   # a random model follows nothing
        micro_gatt(tok_file, tmp_path / "start.pt", tmp_path / "run")


def test_every_rank_samples_its_share_of_the_gatt_dialogues(tokenizer, tok_file, tmp_path, torchrun):
    """07 under torchrun --fsdp (2 processes, gloo): each rank samples its share of GAtt's
    dialogues and rank 0 writes them back in the dialogues' order, the same instructions and users
    as one process draws; the chapter then runs to its end."""
    torch.manual_seed(0)
    M.save_model(micro_model(tokenizer.n_words), tmp_path / "start.pt")
    flags = ["--preset", "micro", "--init", str(tmp_path / "start.pt"), "--tokenizer", str(tok_file),
             "--device", "cpu", "--inst-examples", "60", "--inst-steps", "2", "--steps", "2", "--dialogues", "6",
             "--train-turns", "3", "--eval-dialogues", "3", "--eval-turns", "3", "--eval-per-kind", "1",
             "--seq-len", "256", "--micro-batch", "1", "--batch-tokens", "512", "--warmup-steps", "1",
             "--rules-by-program"]
    G.main(flags + ["--run-dir", str(tmp_path / "one")])
    out = torchrun(tok.REPO / "07_gatt.py", *flags, "--run-dir", tmp_path / "two", "--fsdp", timeout=300)
    assert "2 ranks a share each" in out.stdout
    drawn = lambda run: [(s["instruction"], s["users"]) for s in map(
        json.loads, (tmp_path / run / "gatt_samples.jsonl").read_text().splitlines())]
    assert len(drawn("two")) == 6 and drawn("two") == drawn("one")
    two = json.loads((tmp_path / "two" / "gatt.json").read_text())
    assert two["gatt_data"]["dialogues"] == 6
    # the evaluation played a share of the 3 dialogues on each rank (2 and 1): all of them came back
    for model in ("before GAtt", "after GAtt"):
        for result in (two["adherence"][model], two["adherence"][model]["control"]):
            assert len(result["followed"]) == 3 and all(len(f) == 3 for f in result["followed"])
    assert len(two["chat"]["after GAtt"]["per_prompt"]["gold"]) == len(
        json.loads((tmp_path / "one" / "gatt.json").read_text())["chat"]["after GAtt"]["per_prompt"]["gold"])
    assert len(re.findall(r"^model +gold", out.stdout, flags=re.M)) == 1   # 04's table printed once, by rank 0
