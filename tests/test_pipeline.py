"""The main command end to end: all seven chapters at micro size through pipeline.py, the same
code path as `bash run.sh` (each chapter a subprocess, as a reader runs it), then report.md."""
import importlib
import json
import os
import subprocess
import sys

import pytest

pipeline = importlib.import_module("pipeline")
UserError = importlib.import_module("01_tokenizer").UserError


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    timings = pipeline.main(["--smoke", "--run-dir", str(run_dir)])
    return run_dir, timings


def test_every_stage_writes_its_checkpoint_metrics_and_figures(smoke_run):
    run_dir, timings = smoke_run
    assert sorted(timings) == sorted(pipeline.STAGES)
    for name, (script, title, outputs) in pipeline.STAGES.items():
        for f in outputs:
            assert (run_dir / f).is_file() and (run_dir / f).stat().st_size > 0, (name, f)
        for f in outputs:
            if f.endswith(".json"):
                json.loads((run_dir / f).read_text())
            if f.endswith(".png"):
                assert (run_dir / f).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "pipeline.json").read_text()).keys() == timings.keys()


def test_report_has_every_chapter_filled_in(smoke_run):
    run_dir, _ = smoke_run
    report = (run_dir / "report.md").read_text()
    for name, (script, title, outputs) in pipeline.STAGES.items():
        assert f"## {name} {title}" in report
    assert "not run yet" not in report and "could not read" not in report
    for png in [f for _, _, outputs in pipeline.STAGES.values() for f in outputs if f.endswith(".png")]:
        assert f"({png})" in report, png   # every figure is shown


def test_the_report_says_which_machine_kernels_and_commit_ran_each_stage(smoke_run):
    run_dir, _ = smoke_run
    import torch
    recorded = json.loads((run_dir / "pipeline.json").read_text())
    for name in pipeline.STAGES:
        m = recorded[name]["machine"]
        assert m["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and m["torch"] == torch.__version__
        assert m["threads"] == torch.get_num_threads() and m["cpu"]
    line = pipeline.machine_line(recorded)
    assert line.endswith(f"(stages {', '.join(sorted(pipeline.STAGES))})")   # one machine ran them all
    assert f"Ran on: {line}." in (run_dir / "report.md").read_text()


def test_the_machine_line_groups_stages_by_machine_and_skips_older_runs():
    a = dict(cpu="X", cpu_kernels="AVX512", threads=2, gpu=None, torch="2.13.0", commit="abc1234")
    b = dict(a, cpu_kernels="AVX2")
    line = pipeline.machine_line({"03": {"wall_s": 1, "machine": a}, "05": {"wall_s": 1, "machine": b},
                                  "04": {"wall_s": 1, "machine": a}, "06": {"wall_s": 1}})
    assert line == ("X, 2 threads, CPU kernels AVX512, torch 2.13.0, commit abc1234 (stages 03, 04); "
                    "X, 2 threads, CPU kernels AVX2, torch 2.13.0, commit abc1234 (stages 05)")
    assert pipeline.machine_line({"03": {"wall_s": 1}}) == ""   # pipeline.json from before it recorded machines


def test_the_recorded_kernels_follow_what_torch_was_told_to_use():
    """ATEN_CPU_CAPABILITY=avx2 makes torch run an AVX2-only CPU's kernels (README: another machine's
    arithmetic on this one); the record must say so."""
    import torch
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("not an x86 CPU with AVX2")
    code = "import pipeline; print(pipeline.machine('cpu')['cpu_kernels'])"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=pipeline.tok.REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == "AVX2"


def test_table30_rows_quote_the_paper_at_its_own_turns(smoke_run, tmp_path):
    """The paper's Table 30 gives turns 2, 4, 6 and 20 (baseline 100, 10, 0, 0): a 20-turn gatt.json
    must show them there, and nothing at turns 1 and 10."""
    run_dir, _ = smoke_run
    g = json.loads((run_dir / "gatt.json").read_text())
    for a in g["adherence"].values():   # stretch the smoke run's 3 turns to 20
        for part in (a, a.get("control") or {}):
            for key in ("by_turn",):
                part[key] = (part[key] * 7)[:20]
            part["followed"] = [(f * 7)[:20] for f in part["followed"]]
    (tmp_path / "gatt.json").write_text(json.dumps(g))
    text = "\n".join(pipeline.section_gatt(tmp_path))
    assert "| before GAtt (paper) | - | 100 | 10 | 0 | - | 0 |" in text
    assert "| after GAtt (paper) | - | 100 | 100 | 100 | - | 100 |" in text
    assert "copy control (ours)" in text


def test_greedy_change_says_which_way_from_the_paired_interval():
    kinds = ["arithmetic", "fact"] * 20
    chat = lambda gold: {"gold": sum(gold) / len(gold), "per_prompt": {"kind": kinds, "gold": gold}}
    base = [0.2, 0.6] * 20
    results = {"SFT": chat(base), "+RS": chat([g + 0.1 for g in base]), "+PPO": chat([g - 0.1 for g in base]),
               "+noise": chat([g + (0.1 if i % 2 else -0.1) for i, g in enumerate(base[:20])] + base[20:])}
    text = pipeline.greedy_change(results)
    assert "+RS +0.100 [+0.100, +0.100] (up, clear of its interval)" in text
    assert "+PPO -0.100 [-0.100, -0.100] (**down**, clear of its interval)" in text
    assert "+noise" in text and "(within noise)" in text
    assert "(no interval)" in pipeline.greedy_change({"SFT": {"gold": 0.3}, "+RS": {"gold": 0.4}})


def test_the_words_follow_the_interval():
    """seen?: clear of its interval only when the difference's interval excludes 0 on the paper's side."""
    seen = lambda value, interval, direction=1: pipeline.effect("04", "", value, interval, "", "gold",
                                                                direction)["seen"]
    assert seen(0.3, (0.1, 0.5)) == "yes, clear of its interval"
    assert seen(0.3, (-0.1, 0.5)) == seen(0.0, (0.0, 0.0)) == "within noise"
    assert seen(-0.3, (-0.5, -0.1)).startswith("**no**: the other way")
    assert seen(-0.3, (-0.5, -0.1), direction=-1) == "yes, clear of its interval"   # the paper's effect is a fall
    assert seen(0.3, None).startswith("yes (no interval") and seen(None, None) == "not measured"


def test_an_older_json_without_per_prompt_scores_still_renders(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    new = lambda k, v: (k.endswith("per_prompt") or k in ("right", "rating", "followed")
                        or (k == "n" and isinstance(v, dict)))   # the fields intervals need
    strip = lambda x: ({k: strip(v) for k, v in x.items() if not new(k, v)} if isinstance(x, dict) else
                       [strip(v) for v in x] if isinstance(x, list) else x)
    for f in [*run_dir.glob("*.json"), *(run_dir / pipeline.HELPFUL_ONLY).glob("*.json")]:
        (tmp_path / f.relative_to(run_dir)).parent.mkdir(exist_ok=True)
        (tmp_path / f.relative_to(run_dir)).write_text(json.dumps(strip(json.loads(f.read_text()))))
    for f in [f for _, _, outputs in pipeline.STAGES.values() for f in outputs if not f.endswith(".json")]:
        (tmp_path / f).write_bytes(b"")
    pipeline.main(["--run-dir", str(tmp_path), "--report-only"])
    report = (tmp_path / "report.md").read_text()
    assert "[-]" in report and "could not read" not in report and "not run yet" not in report
    assert "[-]" not in (run_dir / "report.md").read_text().split("## 06")[0]   # the new JSONs: intervals


def test_seeds_rerun_the_stochastic_stages_and_tell_the_spread(smoke_run):
    """--seeds 2: 04 again (--only keeps the test short) in RUN_DIR/seed-1 with --seed 1, on the run's
    own tokenizer and pretrained model; seeds.json and seeds.md hold each effect per seed."""
    run_dir, _ = smoke_run
    pipeline.main(["--smoke", "--run-dir", str(run_dir), "--seeds", "2", "--only", "04"])
    folder = run_dir / "seed-1"
    assert (folder / "pretrain.pt").samefile(run_dir / "pretrain.pt")
    assert json.loads((folder / "sft.json").read_text())["config"]["seed"] == 1
    assert json.loads((run_dir / "sft.json").read_text())["config"]["seed"] == 0   # seed 0 is the run itself
    assert not (folder / "rm_helpful.pt").exists()   # --only 04
    seeds = json.loads((run_dir / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1] and seeds["folders"] == [".", "seed-1"]
    assert {e["stage"] for e in seeds["effects"]} == {"04", "05", "06", "06h", "07"}
    sft = next(e for e in seeds["effects"] if e["stage"] == "04")
    assert None not in sft["values"] and sft["range"][0] <= sft["mean"] <= sft["range"][1]
    assert len(sft["intervals"]) == 2 and sft["held_in_every_seed"] == all(e == "yes, clear of its interval"
                                                                        for e in sft["seen"])
    ppo = next(e for e in seeds["effects"] if e["stage"] == "06")
    assert ppo["values"][1] is None and not ppo["held_in_every_seed"]   # seed 1 has not run 06
    assert "| seed 0 | seed 1 | mean | range | held in every seed? |" in (run_dir / "seeds.md").read_text()
    # seed 1 ran 04 alone: its machine line names that stage, and the run's names every stochastic stage
    assert seeds["machines"][1].endswith("(stages 04)")
    assert seeds["machines"][0].endswith("(stages 04, 05, 06, 06h, 07)")
    assert f"seed 1: {seeds['machines'][1]}" in (run_dir / "seeds.md").read_text()
    assert "seeds.md" in (run_dir / "report.md").read_text()
    assert "## 04 Supervised fine-tuning" in (folder / "report.md").read_text()


def test_finished_stages_are_skipped_and_rerun_on_request(smoke_run, capsys):
    run_dir, _ = smoke_run
    before = {f: (run_dir / f).stat().st_mtime_ns for f in ("tokenizer.json", "model.json", "sft.json")}
    pipeline.main(["--smoke", "--run-dir", str(run_dir), "--rerun", "02", "--only", "01", "02"])
    out = capsys.readouterr().out
    assert "01 Tokenizer (Sec. 2.2): outputs present, skipped" in out
    assert (run_dir / "tokenizer.json").stat().st_mtime_ns == before["tokenizer.json"]
    assert (run_dir / "model.json").stat().st_mtime_ns > before["model.json"]
    pipeline.main(["--run-dir", str(run_dir), "--report-only"])
    assert (run_dir / "sft.json").stat().st_mtime_ns == before["sft.json"]


def test_a_failing_stage_is_one_line_and_names_the_stage(tmp_path):
    with pytest.raises(UserError, match="stage 04"):
        pipeline.main(["--smoke", "--run-dir", str(tmp_path), "--only", "04"])   # no tokenizer there
    with pytest.raises(UserError, match="no stage 9"):
        pipeline.main(["--rerun", "9"])


def test_a_stage_stopped_with_stop_at_is_run_again(smoke_run, tmp_path, monkeypatch, capsys):
    """03 and 04 cut off by --stop-at leave every output file, as a finished run does; their JSON
    says finished: false, and the pipeline runs them again instead of skipping them."""
    import shutil
    import types
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir, symlinks=True)
    args = types.SimpleNamespace(run_dir=run_dir, device="cpu", dtype="auto", compile=False, smoke=True, preset="toy")
    chats = tmp_path / "chats.jsonl"   # 04 on a user's data: no toy-world grading, so seconds
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                        {"role": "assistant", "content": f"{i + 1}."}]})
                               for i in range(20)))
    for name, module, extra in (("03", "03_pretrain", []), ("04", "04_sft", ["--data", str(chats)])):
        assert pipeline.is_done(name, run_dir)
        importlib.import_module(module).main(pipeline.stage_args(name, args) + extra + ["--stop-at", "1"])
        assert json.loads((run_dir / pipeline.STAGES[name][2][-1]).read_text())["finished"] is False
        assert all((run_dir / f).is_file() for f in pipeline.STAGES[name][2]) and not pipeline.is_done(name, run_dir)
    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, args, log: ran.append(name) or 0.0)
    capsys.readouterr()
    pipeline.main(["--smoke", "--run-dir", str(run_dir), "--only", "02", "03", "04", "05"])
    assert ran == ["03", "04"] and "05 Reward modelling" in capsys.readouterr().out   # 02 and 05: skipped


def test_is_done_reads_whether_the_stage_finished(tmp_path):
    for f in pipeline.STAGES["05"][2]:
        (tmp_path / f).write_text("x")
    for metrics, done in (({"finished": True}, True), ({"finished": False}, False), ({"config": {"stop_at": 3}}, False),
                          ({"config": {"stop_at": None}}, True), ("{half a file", False)):
        (tmp_path / "reward.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
        assert pipeline.is_done("05", tmp_path) is done, metrics


def test_ctrl_c_in_a_stage_says_where_the_pipeline_stopped(tmp_path, monkeypatch):
    class Stage:   # a stage that gets Ctrl-C, as the whole process group does from a terminal
        def __init__(self, cmd, cwd):
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return 130
    monkeypatch.setattr(pipeline.subprocess, "Popen", Stage)
    (tmp_path / "sft.json").write_text(json.dumps({"finished": True}))   # an older run's
    (tmp_path / "sft.pt").write_text("a checkpoint")
    args = pipeline.argparse.Namespace(run_dir=tmp_path, device="cpu", dtype="auto", compile=False, smoke=True,
                                       preset="toy")
    with pytest.raises(KeyboardInterrupt, match=r"pipeline stopped in stage 04 \(04_sft.py\); .* run the same command "
                                                r"again .* --resume\)"):
        pipeline.run_stage("04", args, print)
    assert not (tmp_path / "sft.json").exists()   # new checkpoints never sit beside an old 'finished' JSON


def test_the_reward_switch_effects_read_refusals_the_right_way(smoke_run, tmp_path):
    """06h's effect: PPO on the Helpfulness RM alone lowers refusals of harmful requests; 06's: RS and
    PPO on Rc raise them. Refusals set by hand in copies of the smoke run's JSONs (40 harmful prompts)."""
    run_dir, _ = smoke_run

    def with_refusals(src, dst, before, after):
        d = json.loads(src.read_text())
        for name, share in (("SFT", before), ("+PPO", after)):
            n = 40
            per = {"kind": ["harmful"] * n + ["benign"] * n, "gold": [0.5] * 2 * n, "careless": [0.0] * 2 * n,
                   "refused": [1.0] * round(share * n) + [0.0] * (n - round(share * n)) + [0.0] * n}
            d["results"][name].update(sampled_per_prompt=per, sampled_refusal_harmful=share)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(d))

    with_refusals(run_dir / "rs_ppo.json", tmp_path / "rs_ppo.json", 0.7, 0.9)
    with_refusals(run_dir / pipeline.HELPFUL_ONLY / "rs_ppo.json", tmp_path / pipeline.HELPFUL_ONLY / "rs_ppo.json",
                  0.7, 0.1)
    rows = {e["stage"]: e for e in pipeline.effects_helpful_only(tmp_path)}
    assert rows["06"]["value"] == pytest.approx(0.2) and rows["06"]["side"] == "clear"
    assert rows["06h"]["value"] == pytest.approx(-0.6) and rows["06h"]["side"] == "clear"
    with_refusals(run_dir / pipeline.HELPFUL_ONLY / "rs_ppo.json", tmp_path / pipeline.HELPFUL_ONLY / "rs_ppo.json",
                  0.7, 0.95)   # the Helpfulness RM alone raising refusals would be the other way
    assert pipeline.effects_helpful_only(tmp_path)[1]["side"] == "other way"


def test_chapter_06_runs_whole_under_fsdp_on_two_processes(smoke_run, tmp_path, torchrun):
    """06 end to end under torchrun --fsdp (2 processes, gloo, the smoke run's micro models, with
    --activation-checkpointing): the RMs and the reference sharded (every rank joins each of their
    forwards, Figures 7-8 included), the policy and the value model sharded from host memory, the
    empty sampler copy refreshed before each rollout. It finishes, writes its outputs, and its
    calibration (both sharded RMs scoring the start model's samples) and its greedy held-out
    evaluation of the start model (spread over the ranks) are the one-process run's."""
    run_dir, _ = smoke_run
    flags = dict(zip(pipeline.SMOKE["06"][::2], pipeline.SMOKE["06"][1::2]))
    flags.update({"--micro-batch": "2", "--ppo-micro-batch": "2"})   # the batches tile 2 ranks
    torchrun(pipeline.tok.REPO / "06_rs_ppo.py", "--fsdp", "--activation-checkpointing", "--preset", "micro",
             "--device", "cpu", "--run-dir", tmp_path, "--init", run_dir / "sft.pt",
             "--tokenizer", run_dir / "tokenizer.model", "--rm-helpful", run_dir / "rm_helpful.pt",
             "--rm-safety", run_dir / "rm_safety.pt", *[x for kv in flags.items() for x in kv], timeout=600)
    for f in ("rs.pt", "ppo.pt", "rs_ppo.json", "rs_best_of_n.png", "ppo_curves.png"):
        assert (tmp_path / f).is_file(), f
    sharded = json.loads((tmp_path / "rs_ppo.json").read_text())
    whole = json.loads((run_dir / "rs_ppo.json").read_text())
    assert len(sharded["ppo"]) == int(flags["--ppo-iterations"])
    assert set(sharded["results"]) == {"SFT", "+RS", "+PPO"}
    for key in ("helpful_offset", "safety_offset", "mean", "std"):
        assert sharded["calibration"][key] == pytest.approx(whole["calibration"][key], abs=1e-4), key
    # the held-out evaluation of the start model, spread over the two ranks (greedy): one process's
    for figure in ("gold", "refusal_harmful", "red_team_refusal_harmful"):
        assert sharded["results"]["SFT"][figure] == whole["results"]["SFT"][figure], figure
    assert sharded["results"]["SFT"]["per_prompt"] == whole["results"]["SFT"]["per_prompt"]
    # Figures 7-8 drawn a share of the prompts a rank (other random numbers): every temperature, every N
    assert sharded["figures"]["temperature"].keys() == whole["figures"]["temperature"].keys()
    for t, curves in sharded["figures"]["temperature"].items():
        assert curves["n"] == whole["figures"]["temperature"][t]["n"] and len(curves["max"]) == len(curves["n"])


def test_chapter_06_resumes_from_sharded_checkpoints(smoke_run, tmp_path, torchrun):
    """06 under torchrun --fsdp --sharded-checkpoint (2 processes, gloo): each rank writes its
    shards of the policy (ppo.dcp/) and of the value model (ppo_value.dcp/), nothing gathered
    until the finished policy's weights; a run stopped after PPO iteration 1 and resumed from the
    shards ends where the uninterrupted run does."""
    import torch
    run_dir, _ = smoke_run
    flags = dict(zip(pipeline.SMOKE["06"][::2], pipeline.SMOKE["06"][1::2]))
    flags.update({"--micro-batch": "2", "--ppo-micro-batch": "2", "--fig-n": "0"})   # 2 ranks; no figures

    def sharded(out_dir, *extra):
        return torchrun(pipeline.tok.REPO / "06_rs_ppo.py", "--fsdp", "--sharded-checkpoint", "--preset", "micro",
                        "--device", "cpu", "--run-dir", out_dir, "--init", run_dir / "sft.pt",
                        "--tokenizer", run_dir / "tokenizer.model", "--rm-helpful", run_dir / "rm_helpful.pt",
                        "--rm-safety", run_dir / "rm_safety.pt", *[x for kv in flags.items() for x in kv], *extra,
                        timeout=600).stdout
    sharded(tmp_path / "whole")
    sharded(tmp_path / "cut", "--stop-at", "1")
    assert not (tmp_path / "cut" / "ppo.pt").exists()
    for folder in ("ppo.dcp", "ppo_value.dcp"):
        assert sum(f.suffix == ".distcp" for f in (tmp_path / "cut" / folder).iterdir()) == 2, folder
    assert "resumed at iteration 1" in sharded(tmp_path / "cut", "--resume")
    whole, cut = (torch.load(tmp_path / run / "ppo.pt", weights_only=True) for run in ("whole", "cut"))
    assert "value_model" not in cut and "optimizer" not in cut   # the finished policy's weights alone
    for k, v in whole["model"].items():
        assert torch.allclose(cut["model"][k], v, atol=1e-6), k
    a, b = (json.loads((tmp_path / run / "rs_ppo.json").read_text()) for run in ("whole", "cut"))
    assert [h["iteration"] for h in b["ppo"]] == [1, 2]
    assert b["ppo"][-1]["reward"] == pytest.approx(a["ppo"][-1]["reward"], abs=1e-5)
