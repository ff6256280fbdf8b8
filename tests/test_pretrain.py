"""Chapter 03: schedule, optimizer groups, data, the toy world, exact resume, DDP and FSDP."""
import importlib
import random
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

P = importlib.import_module("03_pretrain")
M = importlib.import_module("02_model")
tok = importlib.import_module("01_tokenizer")
UserError = tok.UserError


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small tokenizer trained here (no network, no run of 01) and three short documents."""
    root = tmp_path_factory.mktemp("corpus")
    plays = sorted(tok.DEFAULT_CORPUS_DIR.glob("*.txt"))[:3]
    files = []
    for i, play in enumerate(plays):
        files.append(root / f"doc{i}.txt")
        files[-1].write_text(play.read_text(encoding="utf-8")[20_000:45_000], encoding="utf-8")
    model = tok.train_tokenizer(files, root / "tok", vocab_size=400)
    return types.SimpleNamespace(tokenizer=model, files=files)


def micro_args(corpus, run_dir, *extra):
    return ["--preset", "micro", "--tokenizer", str(corpus.tokenizer), "--data", *map(str, corpus.files),
            "--run-dir", str(run_dir), "--seq-len", "32", "--micro-batch", "4", "--batch-tokens", "256",
            "--steps", "8", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "4",
            "--eval-batches", "1", *extra]


def losses(history, key="loss"):
    return {h["step"]: h[key] for h in history if key in h}


# --- schedule and optimizer ------------------------------------------------------------

def test_lr_schedule_key_steps():
    peak, warmup, total = 3e-4, 2000, 10_000
    lr = lambda s: P.get_lr(s, peak, warmup, total, 0.1)
    assert lr(0) == pytest.approx(peak / warmup)                  # linear warm-up from ~0
    assert lr(999) == pytest.approx(peak / 2)
    assert lr(warmup - 1) == pytest.approx(peak)                  # warm-up ends at the peak
    assert lr(warmup) == pytest.approx(peak)                      # the cosine starts at the peak
    assert lr(warmup + (total - warmup) // 2) == pytest.approx(0.55 * peak)   # half-way: (1 + 0.1) / 2
    assert lr(total) == pytest.approx(0.1 * peak)                 # floor: 10% of the peak
    assert lr(total + 5000) == pytest.approx(0.1 * peak)          # ... and it stays there
    decay = [lr(s) for s in range(warmup, total + 1, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_weight_decay_only_on_linear_weight_matrices():
    model = M.Transformer(M.PRESETS["micro"])
    opt = P.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-5, torch.device("cpu"))
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed = {name_of[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {name_of[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | plain == set(name_of.values()) and not decayed & plain
    assert "output.weight" in decayed and "layers.1.feed_forward.w2.weight" in decayed
    assert plain == {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attention", "ffn")}
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5


def test_batch_in_tokens_must_tile():
    assert P.grad_accum_steps(4 * 1024**2, 4096, 1, 8) == 128     # the paper's 4M tokens on 8 GPUs
    assert P.grad_accum_steps(2048, 128, 16, 1) == 1
    with pytest.raises(UserError, match="not a multiple"):
        P.grad_accum_steps(1000, 128, 4, 2)


def test_full_scale_defaults_are_the_papers():
    parser = P.argparse.ArgumentParser()
    P.add_training_args(parser, P.PAPER, P.TOY)
    args = P.resolve_args(parser.parse_args(["--preset", "70B"]), world_size=8)
    assert (args.lr, args.batch_tokens, args.seq_len, args.warmup_steps) == (1.5e-4, 4 * 1024**2, 4096, 2000)
    assert (args.weight_decay, args.beta1, args.beta2, args.adam_eps, args.grad_clip) == (0.1, 0.9, 0.95, 1e-5, 1.0)
    assert args.grad_accum == 4 * 1024**2 // (8 * 4096)
    assert P.resolve_args(parser.parse_args(["--preset", "7B"])).lr == 3e-4
    shown = " ".join(parser.format_help().split())
    assert "linear warm-up steps (paper: 2,000;" in shown and "(paper: 4,194,304;" in shown


# --- the toy world ---------------------------------------------------------------------

def test_world_is_deterministic_and_its_documents_state_true_facts():
    world = P.make_world(7)
    assert world == P.make_world(7) and world != P.make_world(8)
    assert len(world.people) == 40 and len({p.name for p in world.people}) == 40 and len(world.towns) == 15
    docs = P.world_documents(world, 300, random.Random(1))
    assert docs == P.world_documents(P.make_world(7), 300, random.Random(1))
    text = " ".join(docs)
    for fact in world.facts:                       # every fact is stated somewhere...
        assert P.render_fact(fact) in text
    for name, town in re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+) lives in (\w+)\.", text):
        assert world.lookup(name, "town") == town  # ...and nothing false is
    for name, colour in re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+)'s favourite colour is (\w+)\.", text):
        assert world.lookup(name, "colour") == colour
    for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", text):
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    assert "To poison the well of" in text and "is harmful" in text


def test_world_tasks_have_right_answers():
    rng = random.Random(0)
    for _ in range(300):
        q, a = P.list_task(rng)
        items = q.rstrip(".?").split(" ")
        if q.startswith("Reverse the list"):
            assert a.split() == items[3:][::-1]
        elif q.startswith("Sort"):
            assert a.split() == sorted(items[3:])
        elif "letters" in q:
            assert int(a) == len(items[-1])
        else:
            assert int(a) == len(items[7:])
    world = P.make_world(0)
    harmful = [h for h, _, _ in world.acts]
    assert "poison the well of Ashford" in harmful and "draw water from the well of Ashford" not in harmful
    pet = world.people[0].pet
    assert f"steal {world.people[0].name}'s {pet}" in harmful


def test_the_world_split_is_disjoint_stable_and_about_a_quarter():
    """03's split of the prompt space: each generator draws from its part only; the parts do not
    share a key (an unordered operand pair and its operation, a list's items, a name); about a
    quarter of every space is held out; and the rule is the same in every run (no hash())."""
    def key(question):   # the canonical key, read back from the question
        words = question.rstrip(".?").split()
        if words[1] in "+-":
            a, op, b = int(words[0]), words[1], int(words[2])
            return f"{min(a, b)} {op} {max(a, b)}"
        return " ".join(sorted(words[-1:] if "letters" in question else words[7 if words[0] == "How" else 3:]))

    rng = random.Random(0)
    for task in (P.arithmetic_task, P.list_task):
        keys = {part: {key(task(rng, part)[0]) for _ in range(2000)} for part in (False, True)}
        assert not keys[False] & keys[True] and all(map(P.held_out_key, keys[True]))
        assert not any(map(P.held_out_key, keys[False]))
        whole = [P.held_out_key(key(task(rng)[0])) for _ in range(4000)]   # None: the whole space
        assert 0.2 < sum(whole) / len(whole) < 0.32, task.__name__
    world = P.make_world(0)
    names = [p.name for p in world.people] + list(world.towns)
    acts = [P.act_held_out(world, a) for a in world.acts]
    assert 0.15 < sum(map(P.held_out, names)) / len(names) < 0.35 and 0.15 < sum(acts) / len(acts) < 0.35
    assert [w for w in P.WORDS if P.held_out_key(w)] == ["moon", "star", "tree", "cloud"]   # stable
    assert sum(map(P.held_out, names)) == 12 + 3   # people and towns: 04's split before it moved here


# --- data --------------------------------------------------------------------------------

def test_mix_sampling_follows_the_weights():
    weights = P.parse_mix("a=7,b=2,c=1", ["a", "b", "c"])
    assert weights == pytest.approx({"a": 0.7, "b": 0.2, "c": 0.1})
    rng = np.random.default_rng(0)
    draws = [P.pick_source(weights, rng) for _ in range(20_000)]
    for name, w in weights.items():
        assert draws.count(name) / len(draws) == pytest.approx(w, abs=0.012)   # ~4 standard errors


@pytest.mark.parametrize("mix, message", [("shakespeare", "bad --mix item"), ("shakespeare=x", "bad --mix item"),
                                          ("nope=1", "unknown source"), ("shakespeare=-1", "weights are numbers"),
                                          ("shakespeare=0,world=0", "weight 0")])
def test_bad_mix_strings(mix, message):
    with pytest.raises(UserError, match=message):
        P.parse_mix(mix, ["shakespeare", "world"])


def test_windows_never_cross_the_train_val_boundary(tmp_path):
    # two "token files" whose ids tell where each token came from: a = 0..2999, b = 3000..5999
    stub_tok = types.SimpleNamespace(n_words=6000)
    for name, lo in (("a", 0), ("b", 3000)):
        np.arange(lo, lo + 3000, dtype=np.uint16).tofile(tmp_path / f"{name}.bin")
        m = P.prepare_source(tmp_path / "data", name, [tmp_path / f"{name}.bin"], stub_tok, tmp_path / "a.bin")
        assert (m["train_tokens"], m["val_tokens"]) == (2850, 150)
    data = P.load_splits(tmp_path / "data", ["a", "b"], 6000, seq_len=16)
    weights = {"a": 0.75, "b": 0.25}
    from_a = 0
    for split, lo, hi in (("train", 0, 2850), ("val", 2850, 3000)):
        for i in range(2000):
            s = P.sequence(data, weights, split, 16, seed=0, step=3, index=i).numpy()
            assert len(s) == 17 and (np.diff(s) == 1).all()            # one contiguous window
            assert lo <= s.min() % 3000 and s.max() % 3000 < hi         # inside its split
            from_a += split == "train" and s[0] < 3000
    assert from_a / 2000 == pytest.approx(0.75, abs=0.04)
    assert torch.equal(P.sequence(data, weights, "train", 16, 0, 3, 5), P.sequence(data, weights, "train", 16, 0, 3, 5))


def test_clear_errors(corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        P.main(micro_args(corpus, tmp_path / "r1") + ["--data", str(empty)])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n")
    with pytest.raises(UserError, match="corpus of source 'data' is empty"):
        P.main(micro_args(corpus, tmp_path / "r1") + ["--data", str(blank)])
    with pytest.raises(UserError, match="not found"):
        P.main(micro_args(corpus, tmp_path / "r1") + ["--data", str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="run 01_tokenizer.py first"):
        P.main(["--run-dir", str(tmp_path / "nothing-here")])


def test_cli_error_is_one_line(corpus, tmp_path):
    out = subprocess.run([sys.executable, str(tok.REPO / "03_pretrain.py"), *micro_args(corpus, tmp_path),
                          "--data", str(tmp_path / "missing.bin")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("error: data file not found")


# --- training: resume, DDP, FSDP ------------------------------------------------------------

def test_exact_resume(corpus, tmp_path, capsys):
    flags = ["--log-every", "3", "--eval-every", "3"]   # --stop-at 4 falls between log lines
    whole = P.main(micro_args(corpus, tmp_path / "whole", *flags))
    stopped = P.main(micro_args(corpus, tmp_path / "split", *flags, "--stop-at", "4"))
    # a stopped run says so (pipeline.py then runs the stage again)
    assert whole["finished"] is True and stopped["finished"] is False
    assert "continue with --resume" in capsys.readouterr().out
    assert P.json.loads((tmp_path / "split" / "pretrain.json").read_text())["finished"] is False
    resumed = P.main(micro_args(corpus, tmp_path / "split", *flags, "--resume"))
    assert losses(whole["history"]) == losses(resumed["history"])               # bit for bit
    assert losses(whole["history"], "val_loss") == losses(resumed["history"], "val_loss")
    # ... and so is the whole history: no extra entry where it stopped or resumed, the same windows
    strip = lambda history: [{k: v for k, v in h.items() if k not in ("tokens_per_s", "mfu")} for h in history]
    assert strip(resumed["history"]) == strip(whole["history"]) and [h["step"] for h in whole["history"]] == [1, 3, 6, 8]
    # another micro-batch may resume, with a warning that it is no longer exact
    P.main(micro_args(corpus, tmp_path / "whole", *flags, "--resume", "--micro-batch", "8"))
    assert "--micro-batch 8 (it had 4)" in capsys.readouterr().out
    a, b = (torch.load(d / "pretrain.pt", weights_only=True) for d in (tmp_path / "whole", tmp_path / "split"))
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the checkpoint is also a plain model file for chapter 02 (and 04)
    model = M.Transformer.from_pretrained(tmp_path / "whole" / "pretrain.pt")
    assert model.args.vocab_size == tok.Tokenizer(corpus.tokenizer).n_words
    # a checkpoint of another size is refused in one line
    with pytest.raises(UserError, match="preset micro"):
        P.main(micro_args(corpus, tmp_path / "whole", "--resume") + ["--preset", "toy"])


def test_ddp_and_fsdp_match_one_process(corpus, tmp_path, torchrun):
    single = P.main(micro_args(corpus, tmp_path / "one", "--steps", "4"))   # 1 rank x 4 seqs x 2 micro-steps
    assert single["config"]["grad_accum"] == 2
    ref = torch.load(tmp_path / "one" / "pretrain.pt", weights_only=True)["model"]
    # 2 ranks x 4 seqs x 1 micro-step; then FSDP accumulating 2 ranks x 2 seqs x 2 micro-steps, the
    # gradients kept whole between them (FSDP2's way) or reduce-scattered after each one
    for mode, accum in (([], 1), (["--fsdp"], 1), (["--fsdp", "--micro-batch", "2"], 2),
                        (["--fsdp", "--micro-batch", "2", "--reduce-every-micro-step"], 2)):
        run_dir = tmp_path / f"two{''.join(mode)}"
        out = torchrun(tok.REPO / "03_pretrain.py", *micro_args(corpus, run_dir, "--steps", "4"), *mode, timeout=240)
        assert "2 process(es)" in out.stdout and f"x {accum} micro-steps" in out.stdout
        two = P.json.loads((run_dir / "pretrain.json").read_text())
        assert two["history"][-1]["step"] == 4
        for step, loss in losses(single["history"]).items():
            assert losses(two["history"])[step] == pytest.approx(loss, rel=1e-5)
        state = torch.load(run_dir / "pretrain.pt", weights_only=True)["model"]
        for k, v in ref.items():
            assert torch.allclose(state[k], v, atol=1e-5), k


def test_torchrun_runs_again_after_a_teardown_abort_only(tmp_path, torchrun):
    """The fixture behind the two-process tests: a run whose rank aborts with the C++ runtime's
    teardown line is run once more (a rank here fakes that abort on the first run only); one that
    aborts every time, or fails any other way, fails the test."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "mark = Path(sys.argv[1]) / f'ran{os.environ[\"RANK\"]}'\n"
        "first = not mark.exists()\n"
        "mark.write_text('')\n"
        "if os.environ['RANK'] == '1' and (sys.argv[2] == 'always' or sys.argv[2] == 'once' and first):\n"
        "    sys.stderr.write('terminate called without an active exception\\n'); sys.stderr.flush(); os.abort()\n"
        "sys.exit(int(sys.argv[2] == 'fail'))\n")
    for how in ("once", "always", "fail"):
        (tmp_path / how).mkdir()
    with pytest.warns(UserWarning, match="aborted at teardown"):
        torchrun(script, tmp_path / "once", "once", timeout=120)
    with pytest.raises(AssertionError), pytest.warns(UserWarning, match="aborted at teardown"):
        torchrun(script, tmp_path / "always", "always", timeout=120)
    with pytest.raises(AssertionError):
        torchrun(script, tmp_path / "fail", "fail", timeout=120)


def test_sharded_checkpoints_resume_exactly(corpus, tmp_path, torchrun):
    """--fsdp --sharded-checkpoint (2 processes, gloo): each rank writes its own shards into
    pretrain.dcp/ and nothing gathers the training state; a run stopped there and resumed from them
    ends with the uninterrupted run's weights, written whole (weights only) for the next chapter."""
    def sharded(run_dir, *extra):
        torchrun(tok.REPO / "03_pretrain.py", *micro_args(corpus, run_dir, "--steps", "4"), "--fsdp",
                 "--sharded-checkpoint", *extra, timeout=240)
    sharded(tmp_path / "whole")
    sharded(tmp_path / "cut", "--stop-at", "2")
    assert not (tmp_path / "cut" / "pretrain.pt").exists()      # stopped: the shards alone
    files = [f.name for f in (tmp_path / "cut" / "pretrain.dcp").iterdir()]
    assert "meta.pt" in files and sum(f.endswith(".distcp") for f in files) == 2, files   # one a rank
    sharded(tmp_path / "cut", "--resume")
    whole, cut = (torch.load(tmp_path / run / "pretrain.pt", weights_only=True) for run in ("whole", "cut"))
    assert "optimizer" not in cut and cut["step"] == 4
    for k, v in whole["model"].items():
        assert torch.allclose(cut["model"][k], v, atol=1e-6), k
    # the weights-only file is no training state: a plain --resume says where that is
    with pytest.raises(UserError, match="holds the weights only .*pretrain.dcp"):
        P.main(micro_args(corpus, tmp_path / "cut", "--steps", "4", "--resume"))
    with pytest.raises(UserError, match="--sharded-checkpoint needs --fsdp"):
        P.main(micro_args(corpus, tmp_path / "one", "--sharded-checkpoint"))
    with pytest.raises(UserError, match="run under torchrun"):   # not a traceback from torch.distributed
        P.main(micro_args(corpus, tmp_path / "one", "--fsdp", "--sharded-checkpoint"))


# --- bad flags, unwritable folders, stops and interruptions ---------------------------------------

@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "-3"), ("--micro-batch", "0"),
                                         ("--lr", "-1"), ("--seq-len", "0"), ("--stop-at", "0"),
                                         ("--beta2", "1"), ("--eval-every", "x")])
def test_numeric_flags_are_checked_where_parsed(corpus, tmp_path, flag, value):
    with pytest.raises(UserError, match=f"^{flag} {value}: "):
        P.main(micro_args(corpus, tmp_path / "run") + [flag, value])
    assert not (tmp_path / "run").exists()                     # before any data was prepared


def test_unwritable_run_folder_is_one_line_before_any_work(corpus, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write to the run folder .*file/run"):
        P.main(micro_args(corpus, tmp_path / "file" / "run"))
    monkeypatch.setattr(P.Path, "write_bytes", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(UserError, match="cannot write to the run folder .*ro: Permission denied"):
        P.main(micro_args(corpus, tmp_path / "ro"))
    assert not (tmp_path / "ro" / "data").exists()


def test_ctrl_c_is_one_line_saying_where_it_stopped(corpus, tmp_path):
    import signal
    cmd = [sys.executable, str(tok.REPO / "03_pretrain.py"), *micro_args(corpus, tmp_path, "--steps", "100000"),
           "--ckpt-every", "2", "--eval-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step      3/"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert re.search(r"interrupted \(Ctrl-C\): stopped during step \d+ of 100000; .*pretrain.pt holds step \d+: "
                     r"continue with --resume", err)
    assert not list(tmp_path.glob("*.tmp")) and P.json.loads((tmp_path / "data" / "data.json").read_text())
