"""
The whole recipe in one command: chapters 01 -> 07, each starting from the previous one's
checkpoint, into one run folder, then report.md, the report card that puts each of our
figures beside the paper's table or figure.

Each chapter runs as its own process, exactly as a reader would run it by hand
(`python 0N_x.py --run-dir RUN_DIR ...`). A stage whose outputs are all there is skipped, so
an interrupted run picks up where it stopped; --rerun names stages to run again (their later
stages are not rerun unless named: say `--rerun 04 05 06 07` to redo everything after 03).

Run:
  python pipeline.py                                  # toy: ~12 minutes on 2 CPU cores
  python pipeline.py --rerun 06 07                    # redo RS/PPO and GAtt, keep the rest
  python pipeline.py --preset small --device cuda --run-dir runs/small   # bigger, on a GPU
  python pipeline.py --report-only                    # rewrite report.md from the JSON files
  python pipeline.py --smoke --run-dir /tmp/smoke     # every stage at micro size, seconds each
(`bash run.sh` sets up the environment, then runs this.)
"""
import argparse
import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

tok = importlib.import_module("01_tokenizer")
UserError = tok.UserError

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


def stage_args(name, args):
    """The command line of one stage: the run folder, the pass-through flags, --smoke's budget."""
    run_dir = str(args.run_dir)
    if name == "01":
        cmd = ["--run-dir", run_dir]
    elif name == "02":
        cmd = ["--tokenizer", str(args.run_dir / "tokenizer.model"), "--json", str(args.run_dir / "model.json"),
               "--device", args.device]
    else:
        cmd = ["--run-dir", run_dir, "--device", args.device, "--dtype", args.dtype] + (["--compile"] * args.compile)
    if name != "01":
        cmd += ["--preset", "micro" if args.smoke else args.preset]
    return cmd + (SMOKE[name] if args.smoke else [])


def is_done(name, run_dir: Path) -> bool:
    return all((run_dir / f).is_file() for f in STAGES[name][2])


def run_stage(name, args, log):
    script, title, _ = STAGES[name]
    cmd = [sys.executable, str(tok.REPO / script)] + stage_args(name, args)
    log(f"\n{'=' * 20} {name} {title} {'=' * 20}\n$ {' '.join(cmd[1:])}")
    t0 = time.time()
    code = subprocess.call(cmd, cwd=tok.REPO)
    if code != 0:
        raise UserError(f"stage {name} ({script}) failed with exit code {code}; fix it and run again "
                        f"(finished stages are skipped)")
    return time.time() - t0

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
        ("parameters", p["n_params"]), ("steps x batch tokens", f"{p['config']['steps']} x {p['config']['batch_tokens']:,}"),
        ("first logged training loss", losses[0]), ("last logged training loss", losses[-1]),
        ("final validation loss (nats/token)", p["final_val_loss"]),
        ("unigram entropy of the data (a model that learned nothing)", p["unigram_entropy"]),
        ("tokens/s", round(p["tokens_per_s"]))]),
        "Figure 5 analogue (the paper: loss still falling after 2T tokens, for every size):",
        "![pretraining loss](pretrain_loss.png)"]


def section_sft(run_dir):
    S = importlib.import_module("04_sft")
    r = load(run_dir, "sft.json")["results"]
    rows = [(name, *[pct(res.get(c)) for c in S.COLUMNS]) for name, res in r.items()]
    return ["Held-out prompts about people and towns the SFT data never asked about, scored by the toy "
            "world's annotator (gold in [0, 1], as %; refusals as % of prompts). The paper (Sec. 3.1) "
            "reports that a few thousand clean examples teach the format and the tasks. \"careless\" is the "
            "share of answers in the words of the careless annotator, who wrote a fifth of the SFT data's "
            "helpful answers (Sec. 5.1's tail of poorly executed annotation):",
            table(["model"] + S.LABELS, rows), "![SFT](sft.png)"]


def section_reward(run_dir):
    R = importlib.import_module("05_reward")
    r = load(run_dir, "reward.json")
    rows = []
    for name, acc in r["table8"].items():
        rows.append((name + " (ours)", *[pct(acc.get(k)) for k in R.RATINGS + ("avg",)]))
        rows.append((name + " (paper)", *R.PAPER_TABLE8.get(name, (None,) * 5)))
    out = ["Table 6 analogue (the data):",
           table(["set", "comparisons", "tokens per example", "prompt tokens", "response tokens"],
                 [(k, d["comparisons"], d["tokens_per_example"], d["tokens_in_prompt"], d["tokens_in_response"])
                  for k, d in r["data"].items()]),
           "Table 8 analogue: accuracy (%) per rating, best on clear-cut pairs:",
           table(["RM, test set", "sig. better", "better", "slightly", "negligibly", "avg"], rows)]
    if r.get("careless_split"):
        out += ["What the Helpfulness RM can tell apart on its test pairs (Sec. 5.1: the tail of careless "
                "SFT answers is what RLHF can remove; a sum it cannot check):",
                table(["test pairs with", "accuracy (%)", "count"],
                      [(k, pct(a), n) for k, (a, n) in r["careless_split"].items()])]
    if r.get("margin_ablation"):
        out += ["Table 28 analogue: the Helpfulness RM by margin (ours | paper):",
                table(["margin", "sig. better", "better", "slightly", "negligibly", "avg"],
                      [(m, *[f"{pct(a.get(k))} / {p}" for k, p in zip(R.RATINGS + ("avg",), R.PAPER_TABLE28[m])])
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
            "policy as RLHF optimises it, answers sampled at PPO's temperature (4 per prompt):",
            table(["model"] + S.LABELS, [(name, *[pct(res.get("sampled_" + c)) for c in S.COLUMNS])
                                         for name, res in r.items()]),
            "and greedy answers, as 04 and 07 grade them:",
            table(["model"] + labels, [(name, *[pct(res.get(c)) for c in columns]) for name, res in r.items()]),
            "Figure 7 analogue: the reward of the best and of the median of N samples, and the gold "
            "score of the reward's pick (if it falls as N grows, best-of-N is exploiting the RM):",
            table(["N"] + [str(bon["n"][i]) for i in picks],
                  [(k.replace("_", " "), *[bon[k][i] for i in picks]) for k in ("max", "median", "gold_of_max")]),
            "![Figure 7](rs_best_of_n.png)",
            "Figure 8 analogue: the best reward among N samples, by temperature (the paper: 1.2-1.3 best "
            "for 10-100 samples):",
            table(["temperature", "best of N=1", f"best of N={next(iter(temps.values()))['n'][-1]}"],
                  [(t, v["max"][0], v["max"][-1]) for t, v in temps.items()]),
            "![Figure 8](rs_temperature.png)",
            f"PPO: {len(ppo)} iterations; reward {ppo[0]['reward']:+.3f} -> {ppo[-1]['reward']:+.3f}, KL to the "
            f"reference at most {max(h['kl'] for h in ppo):.3f} nats per answer; on the rollouts (the mean of "
            f"the first and of the last 5 iterations) gold {ends('gold')}, careless answers {ends('careless')}; "
            f"time per phase: " + ", ".join(
                f"{k.removesuffix('_s')} {v:.0f}s" for k, v in d["time_split"].items()) + ".",
            "![PPO](ppo_curves.png)"]


def section_gatt(run_dir):
    S = importlib.import_module("04_sft")
    d = load(run_dir, "gatt.json")
    adherence = d["adherence"]
    turns = [t for t in (1, 2, 4, 6, 10, 20) if t <= min(len(a["by_turn"]) for a in adherence.values())]
    paper = {"before GAtt": (100, 10, 0, 0, None, 0), "after GAtt": (100, 100, 100, 100, None, 100)}   # Table 30
    rows = []
    for name, a in adherence.items():
        rows.append((f"{name} (ours)", *[pct(a["by_turn"][t - 1]) for t in turns]))
        if name in paper:
            rows.append((f"{name} (paper)", *[paper[name][(1, 2, 4, 6, 10, 20).index(t)] for t in turns]))
    attention = d["attention"]["by_layer_and_turn"]
    return ["Table 30 / Figure 9 analogue: the share (%) of dialogues whose first-turn instruction is still "
            "followed at turn t, the instruction given only in the first turn:",
            table(["model"] + [f"turn {t}" for t in turns], rows), "![adherence](gatt_adherence.png)",
            "Figure 10 analogue: the attention the last answer pays to the system message, per layer "
            "(as 07 measures it), before and after GAtt:",
            table(["model"] + [f"layer {i}" for i in range(len(next(iter(attention.values()))))],
                  [(name, *[rows_[-1] for rows_ in by_layer]) for name, by_layer in attention.items()]),
            "![attention](gatt_attention.png)",
            "Helpfulness and safety must not collapse (04's held-out table):",
            table(["model"] + S.LABELS, [(name, *[pct(r.get(c)) for c in S.COLUMNS]) for name, r in d["chat"].items()])]


SECTIONS = {"01": section_tokenizer, "02": section_model, "03": section_pretrain, "04": section_sft,
            "05": section_reward, "06": section_rs_ppo, "07": section_gatt}


def effects(run_dir):
    """The effects the paper reports, each checked on this run's numbers."""
    rows = []
    p = load(run_dir, "pretrain.json")
    if p:
        losses = [h["loss"] for h in p["history"] if "loss" in h]
        rows.append(("03", "pretraining loss falls, below the unigram entropy",
                     f"{losses[0]:.2f} -> {p['final_val_loss']:.2f} (unigram {p['unigram_entropy']:.2f})",
                     check(p["final_val_loss"] < min(losses[0], p["unigram_entropy"]))))
    s = load(run_dir, "sft.json")
    if s and "pretrained" in s["results"]:
        a, b = s["results"]["pretrained"]["gold"], s["results"]["SFT"]["gold"]
        rows.append(("04", "SFT beats the base model on held-out tasks", f"gold {a:.3f} -> {b:.3f}", check(b > a)))
    r = load(run_dir, "reward.json")
    if r:
        for name, acc in r["table8"].items():
            if name.split(",")[0][:4].lower() in name.split(",")[1]:   # each RM on its own test set
                R = importlib.import_module("05_reward")
                accs = [acc[k] for k in R.RATINGS if acc.get(k) is not None]
                rows.append(("05", f"{name}: most accurate on clear-cut pairs, 10+ points less on negligible ones",
                             " / ".join(f"{100 * x:.0f}" for x in accs) + " (sig. / better / slightly / negl.)",
                             check(accs[0] == max(accs) and accs[-1] < accs[0] - 0.1)))
    d = load(run_dir, "rs_ppo.json")
    if d:
        g = {k: v["sampled_gold"] for k, v in d["results"].items()}
        rows.append(("06", "rejection sampling and PPO each beat SFT on gold (sampled answers)",
                     " -> ".join(f"{k} {v:.3f}" for k, v in g.items()),
                     check(all(v > g["SFT"] for k, v in g.items() if k != "SFT"))))
    g = load(run_dir, "gatt.json")
    if g and {"before GAtt", "after GAtt"} <= set(g["adherence"]):
        late = {k: sum(v["by_turn"][4:]) / max(1, len(v["by_turn"][4:])) for k, v in g["adherence"].items()}
        rows.append(("07", "GAtt keeps a first-turn instruction alive at turn 5 and later",
                     f"{100 * late['before GAtt']:.0f}% -> {100 * late['after GAtt']:.0f}% of turns",
                     check(late["after GAtt"] > late["before GAtt"] + 0.2)))
    return table(["stage", "the paper's effect", "this run", "seen?"], rows) if rows else "(no stage has run yet)"


def write_report(run_dir: Path, timings: dict) -> Path:
    out = [f"# Llama 2 from scratch: report card of `{run_dir}`", "",
           "Every number of ours below was read from this folder's JSON files; the paper's are "
           "Touvron et al. 2023 (arXiv 2307.09288). The toy world is small and synthetic: compare "
           "shapes and orderings, not magnitudes.", "", "## The paper's effects, seen here?", "", effects(run_dir), ""]
    if timings:
        out += ["Stage wall times (this machine): " + ", ".join(
            f"{n} {t['wall_s']:.0f}s" for n, t in sorted(timings.items())) +
            f"; total {sum(t['wall_s'] for t in timings.values()) / 60:.1f} min.", ""]
    for name, (script, title, outputs) in STAGES.items():
        out += [f"## {name} {title}", f"`python {script}`", ""]
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
    args = parser.parse_args(argv)
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
            timings[name] = {"wall_s": run_stage(name, args, log), "args": stage_args(name, args)}
            tok.write_json(timings_path, timings)
    missing = [n for n in STAGES if not is_done(n, args.run_dir)]
    report = write_report(args.run_dir, timings)
    log(f"\n{'=' * 60}\nstage wall times: " + ", ".join(f"{n} {timings[n]['wall_s']:.0f}s" for n in STAGES
                                                       if n in timings)
        + f"\nthis run: {time.time() - t_start:.0f}s | wrote {report}"
        + (f" (stages {', '.join(missing)} have not run yet)" if missing else ""))
    return timings


if __name__ == "__main__":
    tok.run_cli(main)
