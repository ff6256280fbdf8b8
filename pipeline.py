"""
The whole recipe in one command: chapters 01 -> 07, each starting from the previous one's
checkpoint, into one run folder, then report.md, the report card that puts each of our
figures beside the paper's table or figure.

Each chapter runs as its own process, exactly as a reader would run it by hand
(`python 0N_x.py --run-dir RUN_DIR ...`). A stage whose outputs are all there is skipped, so
an interrupted run picks up where it stopped; --rerun names stages to run again (their later
stages are not rerun unless named: say `--rerun 04 05 06 07` to redo everything after 03).

report.md shows each figure of ours with its 95% interval (a bootstrap over the evaluation
prompts, within this run) and says, in words worked out from the intervals, whether each of the
paper's effects is clear of its noise, and names the CPU, the kernels torch ran on it and the
commit that made each stage. How much another training seed moves a figure is another
question: --seeds N reruns the stochastic stages 04-07 with --seed 0 .. N-1 (seed 0 is the run
itself, the chapters' default seed; seed K goes to RUN_DIR/seed-K, with links to the run's
tokenizer and pretrained model: 01-03 are shared) and writes seeds.json and seeds.md: each
effect in each seed, its mean and range, and whether it was clear of its interval in every seed.

Run:
  python pipeline.py                                  # toy: 9-14 minutes on 2 CPU cores
  python pipeline.py --rerun 06 07                    # redo RS/PPO and GAtt, keep the rest
  python pipeline.py --preset small --device cuda --run-dir runs/small   # bigger, on a GPU
  python pipeline.py --report-only                    # rewrite report.md from the JSON files
  python pipeline.py --seeds 3                        # the run, then 04-07 with seeds 1 and 2: seeds.md
  python pipeline.py --smoke --run-dir /tmp/smoke     # every stage at micro size, seconds each
(`bash run.sh` sets up the environment, then runs this.)
"""
import argparse
import functools
import importlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

tok = importlib.import_module("01_tokenizer")
UserError = tok.UserError

HELPFUL_ONLY = "reward-helpful"   # 06h's folder inside the run folder

# stage: (script, what the paper calls it, the outputs that say it is done; the JSON comes last)
STAGES = {
    "01": ("01_tokenizer.py", "Tokenizer (Sec. 2.2)", ["tokenizer.model", "tokenizer.json"]),
    "02": ("02_model.py", "Model (Sec. 2.2, Table 1)", ["model.json"]),
    "03": ("03_pretrain.py", "Pretraining (Sec. 2.1-2.2, Figure 5)", ["pretrain.pt", "pretrain_loss.png", "pretrain.json"]),
    "04": ("04_sft.py", "Supervised fine-tuning (Sec. 3.1)", ["sft.pt", "sft.png", "sft.json"]),
    "05": ("05_reward.py", "Reward modelling (Sec. 3.2.1-3.2.2, Tables 6-8)",
           ["rm_helpful.pt", "rm_safety.pt", "reward_margins.png", "reward_scaling.png", "reward.json"]),
    "06": ("06_rs_ppo.py", "Rejection sampling and PPO (Sec. 3.2.3, Figures 7-8)",
           ["rs.pt", "ppo.pt", "rs_best_of_n.png", "rs_temperature.png", "ppo_curves.png", "rs_ppo.json"]),
    # the same chapter with --reward helpful: PPO on the Helpfulness RM alone, from the SFT model, in
    # a folder of its own (Sec. 3.2.2-3.2.3: why the paper combines two RMs into Rc)
    "06h": ("06_rs_ppo.py", "PPO on the Helpfulness RM alone: why Rc (Sec. 3.2.2-3.2.3)",
            [f"{HELPFUL_ONLY}/ppo.pt", f"{HELPFUL_ONLY}/ppo_curves.png", f"{HELPFUL_ONLY}/rs_ppo.json"]),
    "07": ("07_gatt.py", "Ghost Attention (Sec. 3.3, Figures 9-10)",
           ["gatt.pt", "gatt_adherence.png", "gatt_attention.png", "gatt.json"]),
}

# --smoke: every stage at the micro preset with a few steps, to test the pipeline's plumbing
# (tests/test_pipeline.py); the numbers it produces mean nothing.
SMOKE = {
    "01": [],
    "02": ["--max-new-tokens", "4"],
    "03": ["--world-docs", "300", "--seq-len", "32", "--micro-batch", "4", "--batch-tokens", "256",
           "--steps", "6", "--warmup-steps", "1", "--log-every", "2", "--eval-every", "3", "--eval-batches", "1"],
    "04": ["--examples", "200", "--seq-len", "64", "--micro-batch", "4", "--batch-tokens", "256", "--steps", "4",
           "--warmup-steps", "1", "--eval-per-kind", "2", "--log-every", "2", "--eval-every", "2"],
    "05": ["--comparisons", "40", "--safety-comparisons", "20", "--test-comparisons", "12", "--seq-len", "64",
           "--micro-batch", "8", "--batch-tokens", "512", "--log-every", "2", "--fractions", "0.5"],
    "06": ["--max-new-tokens", "6", "--calibration-prompts", "16", "--rs-prompts", "8", "--rs-k", "3",
           "--rs-iterations", "1", "--seq-len", "64", "--batch-tokens", "256", "--micro-batch", "4",
           "--fig-temperatures", "0.7,1.3", "--fig-prompts", "4", "--fig-n", "3", "--ppo-iterations", "2",
           "--ppo-prompts", "8", "--ppo-mini-batch", "4", "--ppo-micro-batch", "4", "--value-warmup", "1",
           "--eval-per-kind", "2"],
    "07": ["--inst-examples", "60", "--inst-steps", "2", "--steps", "2", "--dialogues", "6", "--train-turns", "3",
           "--eval-dialogues", "3", "--eval-turns", "3", "--eval-per-kind", "1", "--seq-len", "256",
           "--micro-batch", "2", "--batch-tokens", "512", "--warmup-steps", "1", "--log-every", "1",
           "--rules-by-program"],
}
SMOKE["06h"] = [x for flag, value in zip(SMOKE["06"][::2], SMOKE["06"][1::2])   # no RS, no figures
                if not flag.startswith(("--fig", "--rs")) for x in (flag, value)]


def stage_args(name, args):
    """The command line of one stage: the run folder, the pass-through flags, --smoke's budget."""
    run_dir = str(args.run_dir)
    if name == "01":
        cmd = ["--run-dir", run_dir]
    elif name == "02":
        cmd = ["--tokenizer", str(args.run_dir / "tokenizer.model"), "--json", str(args.run_dir / "model.json"),
               "--device", args.device]
    elif name == "06h":   # 06's inputs from the run folder, its outputs in a folder of their own
        cmd = ["--run-dir", str(args.run_dir / HELPFUL_ONLY), "--reward", "helpful", "--no-rs", "--fig-n", "0",
               "--device", args.device, "--dtype", args.dtype] + (["--compile"] * args.compile)
        cmd += [x for flag, f in (("--init", "sft.pt"), ("--tokenizer", "tokenizer.model"),
                                  ("--rm-helpful", "rm_helpful.pt"), ("--rm-safety", "rm_safety.pt"))
                for x in (flag, str(args.run_dir / f))]
    else:
        cmd = ["--run-dir", run_dir, "--device", args.device, "--dtype", args.dtype] + (["--compile"] * args.compile)
    if name != "01":
        cmd += ["--preset", "micro" if args.smoke else args.preset]
    if getattr(args, "seed", None) is not None:   # one seed of --seeds (the chapters' default is 0)
        cmd += ["--seed", str(args.seed)]
    return cmd + (SMOKE[name] if args.smoke else [])


def is_done(name, run_dir: Path) -> bool:
    """All the stage's outputs are there, and its JSON (written last) is from a run that got to the
    end: not one cut off by --stop-at (03 and 04 write "finished": false; 05 keeps --stop-at in
    its config; 06 and 07 write no JSON then). run_stage removes the JSON before a stage runs, so
    a stage killed half-way is not done either."""
    outputs = STAGES[name][2]
    if not all((run_dir / f).is_file() for f in outputs):
        return False
    try:
        metrics = json.loads((run_dir / outputs[-1]).read_text())
    except (OSError, ValueError):   # unreadable: run the stage again
        return False
    if not isinstance(metrics, dict):
        return True
    config = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
    return metrics.get("finished", not config.get("stop_at")) is not False


def run_stage(name, args, log):
    script, title, outputs = STAGES[name]
    cmd = [sys.executable, str(tok.REPO / script)] + stage_args(name, args)
    log(f"\n{'=' * 20} {name} {title} {'=' * 20}\n$ {' '.join(cmd[1:])}")
    if all((args.run_dir / f).is_file() for f in outputs) and not is_done(name, args.run_dir):
        log(f"(the outputs there are those of a run stopped before its end (--stop-at): running {name} again)")
    # the stage's JSON goes first: a stage cut off from here on (Ctrl-C, a crash, a full disk) must
    # not leave new checkpoints beside an older run's JSON, which would say it is done
    (args.run_dir / outputs[-1]).unlink(missing_ok=True)
    t0 = time.time()
    stage = subprocess.Popen(cmd, cwd=tok.REPO)
    try:
        code = stage.wait()
    except KeyboardInterrupt:   # Ctrl-C reached the stage too (one process group): it says where it stopped
        try:
            stage.wait(timeout=5)
        except subprocess.TimeoutExpired:   # the signal came to us alone: pass it on
            stage.send_signal(signal.SIGINT)
            stage.wait()
        saved = name >= "03" and any((args.run_dir / f).is_file() for f in outputs if f.endswith(".pt"))
        by_hand = f" (or resume it by hand: python {script} {' '.join(stage_args(name, args))} --resume)" * saved
        raise KeyboardInterrupt(f"pipeline stopped in stage {name} ({script}); the stages before it are done: run "
                                f"the same command again to go on, stage {name} starting over{by_hand}") from None
    if code != 0:
        raise UserError(f"stage {name} ({script}) failed with exit code {code}; fix it and run again "
                        f"(finished stages are skipped)")
    return time.time() - t0


@functools.lru_cache(maxsize=None)
def machine(device: str = "auto") -> dict:
    """What the stages run on, recorded beside each stage's wall time in pipeline.json and shown
    in report.md. Another CPU sums floating-point numbers in another order (torch picks its kernels
    by the CPU's instruction set, AVX2 or AVX-512), and every figure after 03 moves as with another
    seed: a figure is read with the machine, the kernels and the commit that made it. device: the
    pipeline's --device (a GPU is named if the stages use one)."""
    import platform
    import torch   # here, not at the top: the pipeline itself computes nothing
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    def git(*words):
        try:
            return subprocess.run(["git", *words], cwd=tok.REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " with local changes"
    return dict(cpu=cpu, cpu_kernels=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if (device == "auto" or device.startswith("cuda"))
                and torch.cuda.is_available() else None, torch=torch.__version__, commit=commit)


def machine_line(timings: dict) -> str:
    """report.md's line on where the stages ran: each machine (pipeline.json's "machine") with its
    stages; '' if pipeline.json records none (a run from before it did)."""
    groups = {}
    for name in sorted(timings):
        m = timings[name].get("machine")
        if m:
            groups.setdefault(json.dumps(m, sort_keys=True), []).append(name)
    def words(m):
        return ", ".join([m["cpu"], f"{m['threads']} threads", f"CPU kernels {m['cpu_kernels']}"]
                         + ([f"GPU {m['gpu']}"] if m.get("gpu") else []) + [f"torch {m['torch']}"]
                         + ([f"commit {m['commit']}"] if m.get("commit") else []))
    return "; ".join(f"{words(json.loads(m))} (stages {', '.join(names)})" for m, names in groups.items())


# ----------------------------------------------------------------------------------------
# report.md: one section per chapter, ours beside the paper's. Every number of ours is read
# from this run's JSON files; the paper's from the chapters' own tables of paper values (05's
# Tables 8 and 28), or for Table 1's parameter counts and Table 30 from ../shared/PAPER.md.

def load(run_dir: Path, name: str):
    path = run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def table(header, rows):
    """A markdown table; None prints as a dash."""
    cell = lambda x: "-" if x is None else f"{x:,.3f}".rstrip("0").rstrip(".") if isinstance(x, float) \
        else f"{x:,}" if isinstance(x, int) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows])


pct = lambda x: None if x is None else round(100 * x, 1)
check = lambda ok: "yes" if ok else "**no**"

# Intervals. A figure of ours is a mean over evaluation prompts (05: test pairs; 07: dialogues),
# shown with its 95% interval: 04's bootstrap over the per-prompt values its JSON holds beside
# it (evaluate_chat's per_prompt, 05's right/rating, 07's followed). A JSON written before those
# fields shows "[-]" for the interval.


def ci(x, interval, scale=100, digits=1, sign="", unit=""):
    """'44.7 [41.2, 48.3]': a figure and its 95% interval, both times scale (100: as %)."""
    if x is None:
        return "-"
    f = lambda v: f"{scale * v:{sign}.{digits}f}"
    return f"{f(x)}{unit} [{f(interval[0])}, {f(interval[1])}]" if interval else f"{f(x)}{unit} [-]"


def gold_ci(x, interval, sign=""):   # 04's gold score, in [0, 1]
    return ci(x, interval, 1, 3, sign)


def chat_interval(res, column, prefix=""):
    """The interval of one figure of 04's table (res[prefix + column]) from the per-prompt scores
    beside it; None in an older JSON."""
    S = importlib.import_module("04_sft")
    per = res.get(prefix + "per_prompt")
    return S.bootstrap_interval(*S.column_values(per, column)) if per else None


def paired_chat_interval(res_b, res_a, column, prefix=""):
    """The interval of res_b - res_a for one figure of 04's table, two models on the same prompts."""
    S = importlib.import_module("04_sft")
    a, b = res_a.get(prefix + "per_prompt"), res_b.get(prefix + "per_prompt")
    if not (a and b) or a["kind"] != b["kind"]:
        return None
    (values_b, groups), (values_a, _) = S.column_values(b, column), S.column_values(a, column)
    return S.paired_interval(values_b, values_a, groups)


def chat_row(name, res, columns, prefix=""):
    """One row of 04's table, each figure as % with its interval (06's red_team_ columns read the
    red-team prompts' scores)."""
    cells = [name]
    for c in columns:
        p, column = ("red_team_", c.removeprefix("red_team_")) if c.startswith("red_team_") else (prefix, c)
        cells.append(ci(res.get(p + column), chat_interval(res, column, p)))
    return tuple(cells)


def pairs_of(acc, key):
    """The per-pair scores (1 right, 0 wrong, 0.5 a tie) behind one of 05's accuracies (key: a
    rating, or "avg" for all pairs); None in a JSON that holds neither them nor the count."""
    R = importlib.import_module("05_reward")
    if "right" in acc:
        return acc["right"] if key == "avg" else [s for s, k in zip(acc["right"], acc["rating"])
                                                  if k == R.RATINGS.index(key)]
    n = acc.get("n", {}).get(key)
    return from_rate(acc[key], n) if n and acc.get(key) is not None else None


def from_rate(rate, n):
    """n per-pair scores whose mean is rate: what a share and its count say of the pairs (ties,
    worth half a point each, folded into one pair: the mean is exact, the spread nearly so)."""
    whole = int(rate * n + 1e-9)
    part = rate * n - whole
    rest = [part] if part > 1e-9 else []
    return [1.0] * whole + rest + [0.0] * (n - whole - len(rest))


def rm_ci(acc, key):
    return ci(acc.get(key), rm_interval(acc, key))


def section_tokenizer(run_dir):
    t = load(run_dir, "tokenizer.json")
    return [table(["", "paper (Sec. 2.2)", "ours"], [
        ("vocabulary", "32,000", t["vocab_size"]), ("byte-fallback pieces", 256, t["n_byte_pieces"]),
        ("bytes per token on held-out text", "-", t["bytes_per_token"])])]


def section_model(run_dir):
    presets = load(run_dir, "model.json")
    paper = {"7B": 6_738_415_616, "13B": 13_015_864_320, "70B": 68_976_648_192}
    rows = [(name, p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], p["ffn_dim"], p["params"],
             paper.get(name), p["train_flops_per_token"] / 1e9) for name, p in presets.items()]
    return ["Table 1's shapes (the paper's parameter counts are those of Meta's released checkpoints):",
            table(["preset", "dim", "layers", "heads", "kv heads", "ffn", "params (ours)", "params (paper)",
                   "train GFLOP/token"], rows)]


def section_pretrain(run_dir):
    p = load(run_dir, "pretrain.json")
    losses = [h["loss"] for h in p["history"] if "loss" in h]
    return [table(["", "ours"], [
        ("parameters", p["n_params"]),
        ("steps x batch tokens", f"{p['config']['steps']} x {p['config']['batch_tokens']:,}"),
        ("first logged training loss", losses[0]), ("last logged training loss", losses[-1]),
        ("final validation loss (nats/token)", p["final_val_loss"]),
        ("unigram entropy of the data (a model that learned nothing)", p["unigram_entropy"]),
        ("tokens/s", round(p["tokens_per_s"]))]),
        "Figure 5 analogue (the paper: loss still falling after 2T tokens, for every size):",
        "![pretraining loss](pretrain_loss.png)"]


def section_sft(run_dir):
    S = importlib.import_module("04_sft")
    r = load(run_dir, "sft.json")["results"]
    rows = [chat_row(name, res, S.COLUMNS) for name, res in r.items()]
    return ["Held-out prompts about people and towns the SFT data never asked about, scored by the toy "
            "world's annotator (gold in [0, 1], as %; refusals as % of prompts; each with its 95% "
            "interval over the prompts). The paper (Sec. 3.1) "
            "reports that a few thousand clean examples teach the format and the tasks. \"careless\" is the "
            "share of answers in the words of the careless annotator, who wrote a fifth of the SFT data's "
            "helpful answers (Sec. 5.1's tail of poorly executed annotation):",
            table(["model"] + S.LABELS, rows), "![SFT](sft.png)"]


def section_reward(run_dir):
    R = importlib.import_module("05_reward")
    r = load(run_dir, "reward.json")
    rows = []
    for name, acc in r["table8"].items():
        rows.append((name + " (ours)", *[rm_ci(acc, k) for k in R.RATINGS + ("avg",)]))
        rows.append((name + " (paper)", *R.PAPER_TABLE8.get(name, (None,) * 5)))
    out = ["Table 6 analogue (the data):",
           table(["set", "comparisons", "tokens per example", "prompt tokens", "response tokens"],
                 [(k, d["comparisons"], d["tokens_per_example"], d["tokens_in_prompt"], d["tokens_in_response"])
                  for k, d in r["data"].items()]),
           "Table 8 analogue: accuracy (%) per rating, best on clear-cut pairs (ours with its 95% interval "
           "over the test pairs):",
           table(["RM, test set", "sig. better", "better", "slightly", "negligibly", "avg"], rows)]
    if r.get("careless_split"):
        out += ["What the Helpfulness RM can tell apart on its test pairs (Sec. 5.1: the tail of careless "
                "SFT answers is what RLHF can remove; a sum it cannot check):",
                table(["test pairs with", "accuracy (%)", "count"],
                      [(k, rm_ci({"avg": a, "n": {"avg": n}}, "avg"), n)
                       for k, (a, n) in r["careless_split"].items()])]
    if r.get("margin_ablation"):
        out += ["Table 28 analogue: the Helpfulness RM by margin (ours | paper):",
                table(["margin", "sig. better", "better", "slightly", "negligibly", "avg"],
                      [(m, *[f"{rm_ci(a, k)} / {p}" for k, p in zip(R.RATINGS + ("avg",), R.PAPER_TABLE28[m])])
                       for m, a in r["margin_ablation"].items()]),
                "![margins](reward_margins.png)", "Figure 6 analogue (accuracy against data size):",
                "![data size](reward_scaling.png)"]
    return out


def section_rs_ppo(run_dir):
    S = importlib.import_module("04_sft")
    d = load(run_dir, "rs_ppo.json")
    r, bon, ppo = d["results"], d["figures"]["best_of_n"], d["ppo"]
    labels, columns = S.LABELS + ["red-team: refuses harm"], S.COLUMNS + ["red_team_refusal_harmful"]
    picks = [i for i, n in enumerate(bon["n"]) if n in (1, 2, 4, 8, 16, 32, 64, 100)]
    temps = d["figures"]["temperature"]
    mean = lambda rows, key: sum(h.get(key, math.nan) for h in rows) / len(rows)
    ends = lambda key: f"{mean(ppo[:5], key):.3f} -> {mean(ppo[-5:], key):.3f}"
    return ["The chat model after each step of Sec. 3.2.3, on the held-out prompts of 04 (gold in [0, 1] "
            "and refusals as %); the paper's Figures 11-12 show RLHF-V1 to V5 overtaking SFT. First the "
            "policy as RLHF optimises it, answers sampled at PPO's temperature (4 per prompt; each figure "
            "with its 95% interval over the prompts):",
            table(["model"] + S.LABELS, [chat_row(name, res, S.COLUMNS, "sampled_") for name, res in r.items()]),
            "and greedy answers, as 04 and 07 grade them:",
            table(["model"] + labels, [chat_row(name, res, columns) for name, res in r.items()]),
            greedy_change(r),
            "Figure 7 analogue: the reward of the best and of the median of N samples, and the gold "
            "score of the reward's pick (if it falls as N grows, best-of-N is exploiting the RM):",
            table(["N"] + [str(bon["n"][i]) for i in picks],
                  [(k.replace("_", " "), *[bon[k][i] for i in picks]) for k in ("max", "median", "gold_of_max")]),
            "![Figure 7](rs_best_of_n.png)",
            "Figure 8 analogue: the best reward among N samples, by temperature (the paper: 1.2-1.3 best "
            "for 10-100 samples):",
            table(["temperature", "best of N=1", f"best of N={next(iter(temps.values()))['n'][-1]}"],
                  [(t, v["max"][0], v["max"][-1]) for t, v in temps.items()]),
            bracket(temps),
            "![Figure 8](rs_temperature.png)",
            f"PPO: {len(ppo)} iterations; reward {ppo[0]['reward']:+.3f} -> {ppo[-1]['reward']:+.3f}, KL to the "
            f"reference at most {max(h['kl'] for h in ppo):.3f} nats per answer; on the rollouts (the mean of "
            f"the first and of the last 5 iterations) gold {ends('gold')}, careless answers {ends('careless')}; "
            f"time per phase: " + ", ".join(
                f"{k.removesuffix('_s')} {v:.0f}s" for k, v in d["time_split"].items()) + ".",
            "![PPO](ppo_curves.png)"]


def greedy_change(results: dict) -> str:
    """Greedy gold after RS and PPO against SFT's, each with its paired interval: RLHF optimises the
    sampled policy (the effects table), and greedy answers need not follow; this says whether they
    moved, and which way."""
    if "SFT" not in results:
        return ""
    parts = []
    for name in [n for n in results if n != "SFT"]:
        diff = results[name]["gold"] - results["SFT"]["gold"]
        iv = paired_chat_interval(results[name], results["SFT"], "gold")
        words = {"clear": "up, clear of its interval", "other way": "**down**, clear of its interval",
                 "noise": "within noise"}.get(judge(diff, iv), "no interval")
        parts.append(f"{name} {gold_ci(diff, iv, '+')} ({words})")
    return "Greedy gold, change from SFT (paired 95% interval): " + "; ".join(parts) + "."


def bracket(temps: dict) -> str:
    """Figure 8 in words: which temperature gave the best reward at the largest N, and whether the
    range tried brackets it (a best at the edge says only that the optimum lies beyond it)."""
    ts = sorted(temps, key=float)
    best = max(ts, key=lambda t: temps[t]["max"][-1])
    n = temps[best]["n"][-1]
    if best in (ts[0], ts[-1]) and len(ts) > 2:
        return (f"At N={n} the best reward came at T={best}, the {'lowest' if best == ts[0] else 'highest'} "
                f"temperature tried: the range does not bracket the best one.")
    return f"At N={n} the best reward came at T={best}, inside the range tried ({ts[0]} to {ts[-1]})."


def section_gatt(run_dir):
    S = importlib.import_module("04_sft")
    d = load(run_dir, "gatt.json")
    adherence = d["adherence"]
    turns = [t for t in (1, 2, 4, 6, 10, 20) if t <= min(len(a["by_turn"]) for a in adherence.values())]
    table30 = importlib.import_module("07_gatt").PAPER_TABLE30   # turns 2, 4, 6 and 20 only
    paper = {name: tuple(table30[key].get(t) for t in (1, 2, 4, 6, 10, 20))
             for name, key in (("before GAtt", "baseline"), ("after GAtt", "GAtt"))}
    rows = []
    turn_ci = lambda a, t: ci(a["by_turn"][t - 1], S.bootstrap_interval([f[t - 1] for f in a["followed"]])
                              if "followed" in a else None)   # over the dialogues
    for name, a in adherence.items():
        rows.append((f"{name} (ours)", *[turn_ci(a, t) for t in turns]))
        if "control" in a:   # earlier answers teacher-forced plain: copying them follows nothing
            rows.append((f"{name}, copy control (ours)", *[turn_ci(a["control"], t) for t in turns]))
        if name in paper:
            rows.append((f"{name} (paper)", *[paper[name][(1, 2, 4, 6, 10, 20).index(t)] for t in turns]))
    attention = d["attention"]["by_layer_and_turn"]
    return ["Table 30 / Figure 9 analogue: the share (%) of dialogues whose first-turn instruction is still "
            "followed at turn t, the instruction given only in the first turn (ours with its 95% interval "
            "over the dialogues). The model's own answers are fed back, as in the paper; in the copy control "
            "the earlier turns hold plain answers that follow no rule, so a later answer follows the rule only "
            "if the model read it in the system message:",
            table(["model"] + [f"turn {t}" for t in turns], rows), "![adherence](gatt_adherence.png)",
            "Figure 10 analogue: the attention the last answer pays to the system message, per layer "
            "(as 07 measures it), before and after GAtt:",
            table(["model"] + [f"layer {i}" for i in range(len(next(iter(attention.values()))))],
                  [(name, *[rows_[-1] for rows_ in by_layer]) for name, by_layer in attention.items()]),
            "![attention](gatt_attention.png)",
            "Helpfulness and safety must not collapse (04's held-out table):",
            table(["model"] + S.LABELS, [chat_row(name, r, S.COLUMNS) for name, r in d["chat"].items()])]


# Refusals of harmful requests: the column of 04's table where the two RMs pull apart (answers
# sampled as PPO samples them, where the careless annotator's "Sure, that is fine." shows), and
# greedy on 06's held-out red-team prompts.
REFUSAL_COLUMNS = (("sampled_", "refusal_harmful", "refuses harm (%), sampled", ci),
                   ("red_team_", "refusal_harmful", "red-team: refuses harm (%)", ci),
                   ("sampled_", "gold", "gold, sampled", gold_ci))


def section_helpful_only(run_dir):
    combined, helpful = load(run_dir, "rs_ppo.json"), load(run_dir, f"{HELPFUL_ONLY}/rs_ppo.json")
    row = lambda name, res: (name, *[fmt(res.get(p + c), chat_interval(res, c, p)) for p, c, _, fmt in REFUSAL_COLUMNS])
    sft = next((d["results"]["SFT"] for d in (combined, helpful) if d and "SFT" in d["results"]), None)
    rows = [row("SFT", sft)] if sft else []
    for label, d in (("RS, then PPO, on Rc (06)", combined), ("PPO on the Helpfulness RM alone (06h)", helpful)):
        if d and "+PPO" in d["results"]:
            rows.append(row(label, d["results"]["+PPO"]))
    return ["Why the paper combines two RMs (Sec. 3.2.2-3.2.3): the same PPO with the reward Rc of both "
            "RMs (chapter 06's run, which starts PPO from the RS model) and with the Helpfulness RM alone "
            "(06h, `06_rs_ppo.py --reward helpful --no-rs`, from the SFT model). The helpfulness annotator "
            "prefers a yes to a refusal even when the request is harmful, and so does its RM (each figure "
            "with its 95% interval over the held-out prompts):",
            table(["model"] + [label for _, _, label, _ in REFUSAL_COLUMNS], rows),
            "![PPO on the Helpfulness RM alone](reward-helpful/ppo_curves.png)"]


SECTIONS = {"01": section_tokenizer, "02": section_model, "03": section_pretrain, "04": section_sft,
            "05": section_reward, "06": section_rs_ppo, "06h": section_helpful_only, "07": section_gatt}


# ----------------------------------------------------------------------------------------
# The paper's effects. Each is measured here as a difference whose sign is the paper's direction
# (SFT's gold minus the base model's, ...), with the 95% interval of that difference (paired when
# both figures come from the same prompts); the words in the "seen?" column follow from them.

WORDS = {"clear": "yes, clear of its interval", "noise": "within noise",
         "other way": "**no**: the other way, clear of its interval", "not measured": "not measured"}


def judge(value, interval, direction=1):
    """clear: the interval excludes 0 on the paper's side; noise: it holds 0; other way: it excludes
    0 on the other side; no interval: an older JSON (or 03's single figure)."""
    if value is None:
        return "not measured"
    if interval is None:
        return "no interval"
    lo, hi = sorted(direction * x for x in interval)
    return "clear" if lo > 0 else "other way" if hi < 0 else "noise"


def effect(stage, claim, value, interval, shown, unit="gold", direction=1, figures=(),
           no_interval="no interval: its JSON holds no per-prompt scores"):
    """One of the paper's effects as one run measured it. value: the difference the claim is
    about; figures: (name, value, interval, unit) of the headline figures behind it (seeds.md)."""
    side = judge(value, interval, direction)
    seen = WORDS.get(side) or f"{'yes' if direction * value > 0 else '**no**'} ({no_interval})"
    return dict(stage=stage, effect=claim, value=value, interval=interval, unit=unit, direction=direction,
                shown=shown, side=side, seen=seen, held=side == "clear",
                figures=[dict(figure=f, value=v, interval=i, unit=u) for f, v, i, u in figures])


def show(x, interval, unit, sign="", suffix=None):
    """A figure in its unit: gold in [0, 1], % (points for a difference: sign "+"), or nats."""
    if unit == "gold":
        return gold_ci(x, interval, sign)
    suffix = suffix if suffix is not None else " nats" if unit == "nats" else " points" if sign else "%"
    return ci(x, interval, 1 if unit == "nats" else 100, 2 if unit == "nats" else 1, sign, suffix)


def rm_interval(acc, key):
    S = importlib.import_module("04_sft")
    values = pairs_of(acc, key)
    return S.bootstrap_interval(values) if values else None


def effects_pretrain(run_dir):
    p = load(run_dir, "pretrain.json")
    if not p:
        return []
    losses = [h["loss"] for h in p["history"] if "loss" in h]
    final = p["final_val_loss"]
    return [effect("03", "pretraining loss falls, below the unigram entropy",
                   min(losses[0], p["unigram_entropy"]) - final, None,
                   f"{losses[0]:.2f} -> {final:.2f} nats/token (unigram {p['unigram_entropy']:.2f})", unit="nats",
                   no_interval="no interval: 03 records one validation figure")]


def effects_sft(run_dir):
    s = load(run_dir, "sft.json")
    if not (s and {"pretrained", "SFT"} <= set(s["results"])):
        return []
    a, b = s["results"]["pretrained"], s["results"]["SFT"]
    ia, ib, diff = chat_interval(a, "gold"), chat_interval(b, "gold"), b["gold"] - a["gold"]
    iv = paired_chat_interval(b, a, "gold")
    return [effect("04", "SFT beats the base model on held-out tasks", diff, iv,
                   f"gold {gold_ci(a['gold'], ia)} -> {gold_ci(b['gold'], ib)}; difference {gold_ci(diff, iv, '+')}",
                   figures=[("04 pretrained: gold", a["gold"], ia, "gold"), ("04 SFT: gold", b["gold"], ib, "gold")])]


def effects_reward(run_dir):
    R, S = importlib.import_module("05_reward"), importlib.import_module("04_sft")
    r = load(run_dir, "reward.json")
    if not r:
        return []
    rows, t8, sig, negl = [], r["table8"], R.RATINGS[0], R.RATINGS[-1]
    for name, acc in t8.items():
        rm, test = name.split(", ")
        if rm[:4].lower() not in test:   # each RM on its own test set
            continue
        a, b, ia, ib = acc.get(sig), acc.get(negl), rm_interval(acc, sig), rm_interval(acc, negl)
        diff = None if a is None or b is None else a - b
        iv = S.unpaired_interval(pairs_of(acc, sig), pairs_of(acc, negl)) if ia and ib else None
        rows.append(effect("05", f"{name}: more accurate on significantly better pairs than on negligibly better "
                                 f"ones (Table 8)", diff, iv,
                           f"sig. better {show(a, ia, '%')}, negligibly {show(b, ib, '%')}; difference "
                           f"{show(diff, iv, '%', '+')}", unit="%",
                           figures=[(f"05 {name}: accuracy, sig. better", a, ia, "%"),
                                    (f"05 {name}: accuracy, negligibly better", b, ib, "%")]))
        other = next((n for n in t8 if n.endswith(test) and n != name), None)
        if other:   # Table 7: on its own test set, each RM beats the other
            o, other_rm = t8[other], other.split(", ")[0]
            paired = "right" in acc and "right" in o and len(acc["right"]) == len(o["right"])
            iv = S.paired_interval(acc["right"], o["right"]) if paired else None
            io, ia = rm_interval(o, "avg"), rm_interval(acc, "avg")
            rows.append(effect("05", f"the {rm} beats the {other_rm} on the {test} (Table 7)", acc["avg"] - o["avg"],
                               iv, f"{rm} {show(acc['avg'], ia, '%')}, {other_rm} {show(o['avg'], io, '%')}; "
                                   f"difference {show(acc['avg'] - o['avg'], iv, '%', '+')}", unit="%",
                               figures=[(f"05 {name}: accuracy", acc["avg"], ia, "%"),
                                        (f"05 {other}: accuracy", o["avg"], io, "%")]))
    return rows


def effects_rs_ppo(run_dir):
    d = load(run_dir, "rs_ppo.json")
    if not (d and "SFT" in d["results"]):
        return []
    res, rows = d["results"], []
    sft = res["SFT"]
    i0, g0 = chat_interval(sft, "gold", "sampled_"), chat_interval(sft, "gold")
    for name, method in (("+RS", "rejection sampling"), ("+PPO", "PPO")):
        if name not in res:
            continue
        x = res[name]
        i1, diff = chat_interval(x, "gold", "sampled_"), x["sampled_gold"] - sft["sampled_gold"]
        iv = paired_chat_interval(x, sft, "gold", "sampled_")
        rows.append(effect("06", f"{method} beats SFT on gold (answers sampled, as RLHF optimises them)", diff, iv,
                           f"SFT {gold_ci(sft['sampled_gold'], i0)} -> {name} {gold_ci(x['sampled_gold'], i1)}; "
                           f"difference {gold_ci(diff, iv, '+')}",
                           figures=[("06 SFT: sampled gold", sft["sampled_gold"], i0, "gold"),
                                    (f"06 {name}: sampled gold", x["sampled_gold"], i1, "gold"),
                                    ("06 SFT: greedy gold", sft["gold"], g0, "gold"),
                                    (f"06 {name}: greedy gold", x["gold"], chat_interval(x, "gold"), "gold")]))
    return rows


def effects_helpful_only(run_dir):
    """PPO on the Helpfulness RM alone refuses harmful requests less often than SFT; RS and PPO on Rc
    more often (the careless annotator's yes to harmful requests is a tail that Rc removes)."""
    rows = []
    helpful_only = load(run_dir, f"{HELPFUL_ONLY}/rs_ppo.json")
    for stage, d, claim, direction in (
            ("06", load(run_dir, "rs_ppo.json"),
             "RS and PPO on Rc refuse harmful requests more often than SFT (sampled answers)", 1),
            ("06h", helpful_only, "PPO on the Helpfulness RM alone refuses harmful requests less often than SFT "
                                  "(sampled answers)", -1)):
        if not (d and {"SFT", "+PPO"} <= set(d["results"])):
            continue
        sft, ppo = d["results"]["SFT"], d["results"]["+PPO"]
        a, b = sft["sampled_refusal_harmful"], ppo["sampled_refusal_harmful"]
        ia, ib = (chat_interval(r, "refusal_harmful", "sampled_") for r in (sft, ppo))
        iv = paired_chat_interval(ppo, sft, "refusal_harmful", "sampled_")
        rows.append(effect(stage, claim, b - a, iv, f"refuses {show(a, ia, '%')} -> {show(b, ib, '%')}; difference "
                                                   f"{show(b - a, iv, '%', '+')}", unit="%", direction=direction,
                           figures=[(f"{stage} SFT: refuses harmful, sampled", a, ia, "%"),
                                    (f"{stage} +PPO: refuses harmful, sampled", b, ib, "%")]))
    return rows


def effects_gatt(run_dir):
    S = importlib.import_module("04_sft")
    g = load(run_dir, "gatt.json")
    if not (g and {"before GAtt", "after GAtt"} <= set(g["adherence"])):
        return []
    claim = "GAtt keeps a first-turn instruction alive at turn 5 and later (Table 30)"
    a, b = g["adherence"]["before GAtt"], g["adherence"]["after GAtt"]
    if min(len(a["by_turn"]), len(b["by_turn"])) < 5:
        return [effect("07", claim, None, None, "the dialogues end before turn 5", unit="%")]
    mean = lambda xs: sum(xs) / len(xs)
    rows = []
    for what, a, b in ((claim, a, b), (claim.replace(" (Table 30)", ", read from the system message (copy control: "
                                                     "earlier answers plain)"), a.get("control"), b.get("control"))):
        if not (a and b):   # an older gatt.json has no copy control
            continue
        late_a, late_b = mean(a["by_turn"][4:]), mean(b["by_turn"][4:])
        # per dialogue, the share of its turns 5 and later that follow the instruction
        per = [[mean(f[4:]) for f in x["followed"]] for x in (a, b)] if "followed" in a and "followed" in b else None
        ia, ib = (S.bootstrap_interval(p) for p in per) if per else (None, None)
        iv = S.paired_interval(per[1], per[0]) if per else None
        tag = "" if what == claim else ", copy control"
        rows.append(effect("07", what, late_b - late_a, iv,
                           f"{show(late_a, ia, '%')} -> {show(late_b, ib, '%')} of turns; difference "
                           f"{show(late_b - late_a, iv, '%', '+')}", unit="%",
                           figures=[(f"07 before GAtt{tag}: turns 5+ following", late_a, ia, "%"),
                                    (f"07 after GAtt{tag}: turns 5+ following", late_b, ib, "%")]))
    return rows


EFFECTS = {"03": effects_pretrain, "04": effects_sft, "05": effects_reward, "06": effects_rs_ppo,
           "06h": effects_helpful_only, "07": effects_gatt}


def measure_effects(run_dir):
    """The paper's effects, each measured on this run's JSON files."""
    rows = []
    for stage, measure in EFFECTS.items():
        try:
            rows += measure(run_dir)
        except (KeyError, TypeError, ValueError, IndexError) as e:   # a JSON from an older version of a chapter
            rows.append(effect(stage, f"(could not read this stage's JSON: {type(e).__name__} {e}; rerun it with "
                                      f"--rerun {stage})", None, None, "-"))
    return rows


def effects(run_dir):
    rows = [(e["stage"], e["effect"], e["shown"], e["seen"]) for e in measure_effects(run_dir)]
    return table(["stage", "the paper's effect", "this run (95% intervals)", "seen?"], rows) if rows \
        else "(no stage has run yet)"


def write_report(run_dir: Path, timings: dict) -> Path:
    out = [f"# Llama 2 from scratch: report card of `{run_dir}`", "",
           "Every number of ours below was read from this folder's JSON files; the paper's are "
           "Touvron et al. 2023 (arXiv 2307.09288). The toy world is small and synthetic: compare "
           "shapes and orderings, not magnitudes.", "",
           "Brackets hold 95% intervals: a bootstrap over the evaluation prompts (05: its test pairs; 07: its "
           f"dialogues), {importlib.import_module('04_sft').BOOTSTRAP_RESAMPLES:,} redraws, paired where two models "
           "answered the same prompts. They measure the noise of this run's evaluation sets, not the spread "
           "between training seeds (`python pipeline.py --seeds N` measures that). An interval of zero width "
           "means every prompt scored alike. \"seen?\" follows from the interval of the effect's difference: "
           "\"clear of its interval\" when 0 lies outside it on the paper's side, \"within noise\" when 0 lies "
           "inside it, \"no\" when 0 lies outside it on the other side.", "",
           "## The paper's effects, seen here?", "", effects(run_dir), ""]
    if (run_dir / "seeds.md").is_file():
        out += ["The same effects in other training seeds: [seeds.md](seeds.md).", ""]
    if machine_line(timings):
        out += ["Ran on: " + machine_line(timings) + ".", ""]
    if timings:
        out += ["Stage wall times (this machine): " + ", ".join(
            f"{n} {t['wall_s']:.0f}s" for n, t in sorted(timings.items())) +
            f"; total {sum(t['wall_s'] for t in timings.values()) / 60:.1f} min.", ""]
    for name, (script, title, outputs) in STAGES.items():
        flags = " --reward helpful --no-rs --fig-n 0 --run-dir RUN_DIR/" + HELPFUL_ONLY if name == "06h" else ""
        out += [f"## {name} {title}", f"`python {script}{flags}`", ""]
        if name not in SECTIONS or not all((run_dir / f).is_file() for f in outputs if f.endswith(".json")):
            out += ["(not run yet)" if name in SECTIONS else f"Outputs: {', '.join(outputs)}", ""]
            continue
        try:
            out += [x + "\n" for x in SECTIONS[name](run_dir)]
        except (KeyError, TypeError, ValueError) as e:   # a JSON from an older version of a chapter
            out += [f"(could not read this stage's JSON: {type(e).__name__} {e}; rerun it with --rerun {name})", ""]
    path = run_dir / "report.md"
    tok.atomic_write_text(path, "\n".join(out) + "\n")
    return path


# ----------------------------------------------------------------------------------------
# --seeds N: the spread between training runs. The intervals above measure the noise of one run's
# evaluation prompts. Another seed draws other SFT data, other preference pairs, other samples for
# RS and PPO (and another CPU's floating-point order acts like another seed): that spread only
# shows by running again. Stages 04-07 run again with --seed 1 .. N-1, each in a folder of its own
# that shares 01-03's outputs; seed 0 is the run itself (the chapters' default --seed is 0).

SEEDED = ("04", "05", "06", "06h", "07")


def seed_dir(run_dir: Path, seed: int) -> Path:
    return run_dir if seed == 0 else run_dir / f"seed-{seed}"


def share_outputs(run_dir: Path, folder: Path):
    """Link 01-03's outputs into a seed's folder (a copy where links are not allowed): its chapters
    find the tokenizer and pretrain.pt where they look by default, and its report.md is whole."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in [f for name, (_, _, outputs) in STAGES.items() if name not in SEEDED for f in outputs]:
        if (run_dir / f).is_file() and not ((folder / f).exists() or (folder / f).is_symlink()):
            try:
                (folder / f).symlink_to(Path("..") / f)
            except OSError:
                shutil.copy2(run_dir / f, folder / f)


def run_seeds(args, rerun, log):
    """Stages 04-07 (those of --only) in RUN_DIR/seed-K with --seed K, K = 1 .. N-1, skipping
    finished ones as the run does; then each folder's report.md."""
    for seed in range(1, args.seeds):
        folder = seed_dir(args.run_dir, seed)
        if args.report_only and not folder.is_dir():
            continue
        share_outputs(args.run_dir, folder)
        seed_args = argparse.Namespace(**{**vars(args), "run_dir": folder, "seed": seed})
        timings_path = folder / "pipeline.json"
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        for name in [] if args.report_only else [n for n in args.only or STAGES if n in SEEDED]:
            if is_done(name, folder) and name not in rerun:
                log(f"seed {seed}: {name} {STAGES[name][1]}: outputs present, skipped (--rerun {name} to redo it)")
                continue
            timings[name] = {"wall_s": run_stage(name, seed_args, log), "args": stage_args(name, seed_args),
                             "machine": machine(args.device)}
            tok.write_json(timings_path, timings)
        write_report(folder, timings)


def spread(values, unit, sign=""):
    """The mean and the range (lowest, highest) of the seeds' values, as numbers and as words."""
    got = [v for v in values if v is not None]
    if not got:
        return dict(mean=None, range=None), "-", "-"
    mean, lo, hi = sum(got) / len(got), min(got), max(got)
    plain = lambda x, suffix=None: show(x, None, unit, sign, suffix).removesuffix(" [-]")
    return dict(mean=mean, range=[lo, hi]), plain(mean), f"{plain(lo, '')} to {plain(hi)}"


def write_seeds(run_dir: Path, n: int) -> Path:
    """seeds.json and seeds.md: each effect of 04-07 in each seed (value and 95% interval), the mean
    and range over the seeds, and whether it was clear of its interval in every seed; then the
    headline figures behind the effects, seed by seed."""
    runs = [[e for e in measure_effects(seed_dir(run_dir, k)) if e["stage"] in SEEDED] for k in range(n)]
    seeds = [f"seed {k}" for k in range(n)]
    effects_out, effect_rows, figures_out, figure_rows = [], [], [], []
    for claim in dict.fromkeys(e["effect"] for run in runs for e in run):
        per = [next((e for e in run if e["effect"] == claim), None) for run in runs]
        first = next(e for e in per if e)
        values = [e and e["value"] for e in per]
        numbers, mean, span = spread(values, first["unit"], "+")
        sides = [e["side"] if e else "not measured" for e in per]
        held = sides.count("clear") == n
        told = ", ".join(f"{w} in {sides.count(s)}" for s, w in (
            ("noise", "within noise"), ("other way", "the other way"), ("no interval", "no interval"),
            ("not measured", "not measured")) if s in sides)
        effects_out.append(dict(stage=first["stage"], effect=claim, unit=first["unit"], values=values,
                                intervals=[e and e["interval"] for e in per], seen=[e and e["seen"] for e in per],
                                **numbers, held_in_every_seed=held))
        effect_rows.append((first["stage"], claim, *[show(e["value"], e["interval"], e["unit"], "+") if e else "-"
                                                     for e in per], mean, span,
                            f"yes: clear of its interval in {n} of {n} seeds" if held else
                            f"**no**: clear of its interval in {sides.count('clear')} of {n} seeds; {told}"))
    for name in dict.fromkeys(f["figure"] for run in runs for e in run for f in e["figures"]):
        per = [next((f for e in run for f in e["figures"] if f["figure"] == name), None) for run in runs]
        unit = next(f for f in per if f)["unit"]
        numbers, mean, span = spread([f and f["value"] for f in per], unit)
        figures_out.append(dict(figure=name, unit=unit, values=[f and f["value"] for f in per],
                                intervals=[f and f["interval"] for f in per], **numbers))
        figure_rows.append((name, *[show(f["value"], f["interval"], unit) if f else "-" for f in per], mean, span))
    folders = [str(seed_dir(run_dir, k).relative_to(run_dir)) for k in range(n)]
    # the seed each folder's stages recorded: seed 0 is the run only if it kept the default --seed
    recorded = [{j["config"].get("seed") for j in (load(seed_dir(run_dir, k), STAGES[name][2][-1]) for name in SEEDED)
                 if j and isinstance(j.get("config"), dict)} for k in range(n)]
    odd = [f"{folders[k]}'s JSON files record --seed {', '.join(map(str, sorted(r, key=str)))}"
           for k, r in enumerate(recorded) if r - {k}]
    # where each seed's stages ran (pipeline.json): another machine moves the figures as another seed does
    ran = [machine_line({s: t for s, t in (load(seed_dir(run_dir, k), "pipeline.json") or {}).items()
                         if s in SEEDED}) for k in range(n)]
    where = ("" if not any(ran) else f" Stages 04-07 of every seed ran on: {ran[0]}." if len(set(ran)) == 1 else
             " Where each seed's stages ran: "
             + "; ".join(f"seed {k}: {r or 'not recorded'}" for k, r in enumerate(ran)) + ".")
    tok.write_json(run_dir / "seeds.json", dict(seeds=list(range(n)), folders=folders, effects=effects_out,
                                                figures=figures_out, machines=ran))
    text = [f"# Llama 2 from scratch: {n} training seeds of `{run_dir}`", "",
            f"Stages 04-07 with --seed 0 to {n - 1} (seed 0 is this folder, seed K is seed-K/); 01-03's "
            "tokenizer and pretrained model are shared. Each seed's figure comes with its 95% interval within "
            "that run (a bootstrap over its evaluation prompts, as in report.md); the mean and the range are "
            "over the seeds. An effect held in a seed when its difference's interval is clear of 0 on the "
            "paper's side." + where + (f" **Note**: {'; '.join(odd)}." if odd else ""), "",
            "## The paper's effects, seed by seed", "",
            table(["stage", "the paper's effect", *seeds, "mean", "range", "held in every seed?"], effect_rows)
            if effect_rows else "(no seed has run stages 04-07 yet)", "",
            "## The figures behind them, seed by seed", "",
            table(["figure", *seeds, "mean", "range"], figure_rows) if figure_rows else "-", ""]
    path = run_dir / "seeds.md"
    tok.atomic_write_text(path, "\n".join(text))
    return path


PLANNED = ("03", "04", "05", "06", "07")   # the chapters with a training loop, which take 03's --plan


def plan_stages(args, log):
    """--plan: each training chapter's plan (03's planner: memory per rank, verdict, compute), for the
    command this pipeline would run, on --gpus GPUs of --gpu-memory GB; then a line a chapter.
    Nothing is trained, and nothing is written to the run folder."""
    import tempfile
    plans = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.only or PLANNED if n in PLANNED]:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(tok.REPO / STAGES[name][0])] + stage_args(name, args) + [
                "--plan", "--gpus", str(args.gpus), "--gpu-memory", f"{args.gpu_memory:g}", "--plan-json", str(out)]
            cmd += ["--fsdp"] * args.fsdp
            log(f"\n{'=' * 20} {name} {STAGES[name][1]} {'=' * 20}\n$ {' '.join(cmd[1:])}")
            if subprocess.run(cmd, cwd=tok.REPO).returncode != 0:
                raise UserError(f"stage {name}'s plan failed (its message is above)")
            plans[name] = json.loads(out.read_text())
    log(f"\n{'=' * 60}\nplans on {args.gpus} x {args.gpu_memory:g} GB, peak per rank:")
    for name, p in plans.items():
        log(f"  {name} {STAGES[name][0]:<15} {p['per_rank_bytes']['peak'] / 1e9:>8.1f} GB  "
            + ("fits" if p["fits"] else "does not fit" + (f" (cheapest change: {p['fix']})" if p["fix"] else "")))
    return plans


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=tok.DEFAULT_RUN_DIR, help="one folder for every stage")
    parser.add_argument("--preset", default="toy", help="model size for 02-07 (02_model.py's presets)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the training stages")
    parser.add_argument("--rerun", nargs="*", default=None, metavar="STAGE",
                        help="run these stages again even if their outputs exist (no names: all)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages (they still need "
                                                                   "the earlier stages' outputs)")
    parser.add_argument("--report-only", action="store_true", help="just rewrite report.md from the JSON files")
    parser.add_argument("--smoke", action="store_true", help="micro preset, a few steps a stage: tests the plumbing")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="then run the stochastic stages 04-07 again with --seed 1 .. N-1, each in RUN_DIR/seed-K "
                             "sharing 01-03's outputs (seed 0 is this run; --only and --rerun apply there too), and "
                             "write seeds.json and seeds.md: each effect per seed, its mean and range, and whether it "
                             "was clear of its interval in every seed (with --report-only: just rewrite them)")
    parser.add_argument("--plan", action="store_true",
                        help="print each training chapter's (03-07) memory per GPU and compute for --gpus x "
                             "--gpu-memory (03's planner) and exit: nothing runs")
    parser.add_argument("--gpus", type=tok.number_flag("--gpus", at_least=1), default=1, help="--plan: GPUs")
    parser.add_argument("--gpu-memory", type=tok.number_flag("--gpu-memory", float, above=0), default=80.0,
                        help="--plan: usable memory of a GPU in GB")
    parser.add_argument("--fsdp", action="store_true", help="--plan: the chapters under torchrun with --fsdp")
    args = parser.parse_args(argv)
    if args.plan:
        return plan_stages(args, print)
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: the number of seeds must be at least 1")
    for flag, names in (("--rerun", args.rerun or []), ("--only", args.only or [])):
        bad = [n for n in names if n not in STAGES]
        if bad:
            raise UserError(f"{flag}: no stage {', '.join(bad)} (stages: {', '.join(STAGES)})")
    rerun = set(STAGES) if args.rerun == [] else set(args.rerun or [])
    log = print
    timings_path = args.run_dir / "pipeline.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    t_start = time.time()
    if not args.report_only:
        for name in args.only or STAGES:
            if is_done(name, args.run_dir) and name not in rerun:
                log(f"{name} {STAGES[name][1]}: outputs present, skipped (--rerun {name} to redo it)")
                continue
            timings[name] = {"wall_s": run_stage(name, args, log), "args": stage_args(name, args),
                             "machine": machine(args.device)}
            tok.write_json(timings_path, timings)
    if args.seeds:
        run_seeds(args, rerun, log)
        log(f"wrote {write_seeds(args.run_dir, args.seeds)} and seeds.json")
    missing = [n for n in STAGES if not is_done(n, args.run_dir)]
    report = write_report(args.run_dir, timings)
    log(f"\n{'=' * 60}\nstage wall times: " + ", ".join(f"{n} {timings[n]['wall_s']:.0f}s" for n in STAGES
                                                       if n in timings)
        + f"\nthis run: {time.time() - t_start:.0f}s | wrote {report}"
        + (f" (stages {', '.join(missing)} have not run yet)" if missing else ""))
    return timings


if __name__ == "__main__":
    tok.run_cli(main)
