"""03's planner (--plan on 03-07): memory per rank against hand arithmetic and against the tensors
autograd really saves, Table 2 from its formula, the command line without a GPU, the JSON, the
README's verdicts; and --activation-checkpointing, which changes memory and nothing else."""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

P = importlib.import_module("03_pretrain")
M = importlib.import_module("02_model")
tok = importlib.import_module("01_tokenizer")
UserError = tok.UserError
LLAMA2_7B_PARAMS = 6_738_415_616   # Meta's count (params.json's shape), as tests/test_model.py checks it


def chapter(name):
    return importlib.import_module(name)


def plan(module, *argv):
    """main(argv + --plan) of a chapter, in this process: the planner's JSON dict."""
    return chapter(module).main([*argv, "--plan"])


def phase(result, starts):
    return next(p for p in result["phases"] if p["name"].startswith(starts))


# --- memory ----------------------------------------------------------------------------------

def test_static_memory_is_16_bytes_a_parameter_over_the_ranks():
    """7B, FSDP over 8 ranks, bf16 compute with fp32 master weights and AdamW: 4 (weights) + 4
    (gradients) + 8 (two moments) bytes a parameter, 1/8 of them a rank = 13.5 GB before
    activations and FSDP's gathered blocks."""
    result = plan("03_pretrain", "--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16")
    sharded = [i for i in phase(result, "train")["items"] if "1/8 a rank" in i["what"]]
    assert {i["kind"] for i in sharded} == {"weights", "grads", "optimizer"}
    assert sum(i["bytes"] for i in sharded) == 16 * LLAMA2_7B_PARAMS / 8
    assert round(sum(i["bytes"] for i in sharded) / 1e9, 1) == 13.5
    # one process, no FSDP: the same 16 bytes a parameter, whole
    alone = plan("03_pretrain", "--preset", "7B", "--dtype", "bf16")
    state = [i for i in phase(alone, "train")["items"] if i["kind"] in ("weights", "grads", "optimizer")]
    assert sum(i["bytes"] for i in state) == 16 * LLAMA2_7B_PARAMS


def saved_bytes(model, x, y, autocast=True):
    """Bytes of the tensors autograd saves for backward in a forward and loss, each storage once,
    the parameters themselves left out (they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            P.lm_loss(model, (x, y))
    return sum(seen.values())


@pytest.mark.parametrize("n_kv_heads", [4, 2])   # plain multi-head attention, and grouped kv heads
def test_activation_formula_matches_what_autograd_saves(n_kv_heads):
    """The planner's activations of a micro-step, less backward's transient loss gradients, against
    the bytes autograd really saves under bf16 autocast (CPU kernels; on a GPU the attention
    kernels differ a little, which no CPU test can see)."""
    args = replace(M.PRESETS["micro"], n_kv_heads=n_kv_heads)
    model = M.Transformer(args)
    rows, seq = 3, 64
    x, y = (torch.randint(0, args.vocab_size, (rows, seq)) for _ in range(2))
    setup = P.PlanSetup(gpus=1, memory=80e9, fsdp=False, elem=2, ckpt=False, prompt=1)
    items = P.training_activations(P.plan_model(args), setup, rows, seq, mask=False, ckpt=False, label="m")
    planned = sum(b for what, _, b, _ in items if "backward's start" not in what)
    measured = saved_bytes(model, x, y)
    assert abs(planned - measured) / measured < 0.05, (planned, measured)


def test_pretrain_plan_adds_up_and_names_its_peak():
    result = plan("03_pretrain", "--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16")
    per_rank, peak = result["per_rank_bytes"], max(result["phases"], key=lambda p: p["bytes"])
    assert set(per_rank) == set(P.KINDS) | {"peak"}
    assert per_rank["peak"] == sum(per_rank[k] for k in P.KINDS) == peak["bytes"]
    assert result["peak_phase"] == peak["name"] and result["fits"] == (per_rank["peak"] <= 80e9)
    assert all(p["bytes"] == sum(i["bytes"] for i in p["items"]) for p in result["phases"])


def test_the_cheapest_change_fits_when_applied():
    """03 at 7B over 8 GPUs: whatever change the planner names, planning with it must fit."""
    argv = ["--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16"]
    before = plan("03_pretrain", *argv)
    assert not before["fits"] and before["fix"] == "--activation-checkpointing"
    after = plan("03_pretrain", *argv, "--activation-checkpointing")
    assert after["fits"] and after["per_rank_bytes"]["activations"] < before["per_rank_bytes"]["activations"]


def test_more_gpus_shrink_what_fsdp_shards_and_nothing_else():
    small, large = (phase(plan("04_sft", "--preset", "13B", "--fsdp", "--gpus", str(g), "--dtype", "bf16",
                               "--data", "unread.jsonl"), "SFT")["items"] for g in (8, 16))
    for a, b in zip(small, large):
        assert b["bytes"] == (a["bytes"] / 2 if "a rank" in a["what"] else a["bytes"]), a["what"]


def test_reducing_every_micro_step_keeps_fsdp_gradients_sharded():
    """FSDP2 accumulating over micro-steps keeps whole fp32 gradients between them (4 bytes a
    parameter on every rank); --reduce-every-micro-step reduce-scatters each time, and that item
    is gone from the plan, the rest unchanged."""
    flags = ("--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16", "--data", "unread.jsonl")
    kept, reduced = (phase(plan("04_sft", *flags, *extra), "SFT") for extra in ((), ("--reduce-every-micro-step",)))
    whole = [i for i in kept["items"] if "kept unsharded between micro-steps" in i["what"]]
    assert len(whole) == 1 and whole[0]["bytes"] == 4 * LLAMA2_7B_PARAMS
    assert not any("kept unsharded" in i["what"] for i in reduced["items"])
    blocks = [i for i in reduced["items"] if "two blocks' unsharded gradients" in i["what"]]
    assert len(blocks) == 1   # what stays whole: the blocks whose gradients are being reduced
    assert reduced["bytes"] == pytest.approx(kept["bytes"] - whole[0]["bytes"] + blocks[0]["bytes"])


def test_a_checkpoint_gathers_12_bytes_a_parameter_on_rank_0_unless_sharded():
    """save_checkpoint gathers fp32 weights and Adam's two moments in rank 0's CPU memory; with
    --sharded-checkpoint each rank writes its own shards and only the finished weights (4 bytes a
    parameter) are gathered. 06 also gathers its value model (the Helpfulness RM's shape), unless
    sharded."""
    flags = ("--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16", "--data", "unread.jsonl")
    whole, sharded = (plan("04_sft", *flags, *extra)["checkpoint_host_bytes_rank0"]
                      for extra in ((), ("--sharded-checkpoint",)))
    assert (whole, sharded) == (12 * LLAMA2_7B_PARAMS, 4 * LLAMA2_7B_PARAMS)
    rm = plan("05_reward", "--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16")
    ppo = plan("06_rs_ppo", "--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16")
    assert rm["checkpoint_host_bytes_rank0"] == 12 * (LLAMA2_7B_PARAMS - 32000 * 4096 + 4096)   # a scalar head
    assert ppo["checkpoint_host_bytes_rank0"] == 12 * LLAMA2_7B_PARAMS + rm["checkpoint_host_bytes_rank0"]
    ppo = plan("06_rs_ppo", "--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16", "--sharded-checkpoint")
    assert ppo["checkpoint_host_bytes_rank0"] == 4 * LLAMA2_7B_PARAMS   # the finished policy's weights alone


def test_host_memory_a_rank_holds_while_it_builds_its_models():
    """Under --fsdp: 03 draws its model a block at a time (without FSDP, whole: 4 bytes a
    parameter, fp32); 04 reads Meta's 70B a block at a time (one block, fp32: 4 x 856M), 05 Meta's
    7B chat model so; a start model in our format is memory-mapped, nothing copied; 06 reads its
    reference and both RMs a block at a time too, in bf16 (the largest part: embedding and head)."""
    seventy_block = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192   # wq wo, wk wv (GQA), SwiGLU, norms
    host = lambda module, *flags: plan(module, "--fsdp", "--gpus", "8", "--dtype", "bf16", *flags)[
        "host_bytes_per_rank"]
    seven_root = 2 * 32000 * 4096 + 4096   # embedding, head, final norm: 7B's largest part
    assert host("03_pretrain", "--preset", "7B") == 4 * seven_root
    assert plan("03_pretrain", "--preset", "7B", "--gpus", "1")["host_bytes_per_rank"] == 4 * LLAMA2_7B_PARAMS
    assert host("04_sft", "--preset", "70B", "--init", "llama-2-70b") == 4 * seventy_block
    assert host("04_sft", "--preset", "7B", "--init", "runs/7b/sft.pt") == 0
    seven_block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert host("05_reward", "--preset", "7B", "--init", "llama-2-7b-chat") == 4 * seven_block
    assert host("06_rs_ppo", "--preset", "7B", "--init", "runs/7b/sft.pt") == 2 * (2 * 32000 * 4096 + 4096)


def test_ppo_shards_its_frozen_models_and_samples_in_bf16():
    """06 at 7B over 8 ranks: the sampler copy (bf16, the compute dtype) whole on every rank, the
    bf16 reference and both bf16 RMs 1/8 a rank, every KV cache bf16; as written it does not fit,
    with --activation-checkpointing it does, and --sample-batch shrinks the rollouts' cache."""
    flags = ("--preset", "7B", "--fsdp", "--gpus", "8", "--dtype", "bf16", "--init", "unread", "--prompts",
             "unread.jsonl")
    result = plan("06_rs_ppo", *flags)
    items = {i["what"]: i["bytes"] for i in phase(result, "PPO update")["items"]}
    R = chapter("05_reward")
    with torch.device("meta"):
        rm_params = sum(p.numel() for p in R.RewardModel(M.PRESETS["7B"]).parameters())
    assert items["sampler copy of the policy, bf16, whole on this rank"] == 2 * LLAMA2_7B_PARAMS
    assert items["reference policy, bf16, 1/8 a rank"] == 2 * LLAMA2_7B_PARAMS / 8
    assert items["Helpfulness and Safety RMs, bf16, 1/8 a rank"] == 2 * 2 * rm_params / 8
    length = 128 + 1024   # --plan-prompt-tokens' default + the paper's answers
    kv = lambda rows: 2 * 32 * rows * length * 4096 * 2
    rollouts = {i["what"]: i["bytes"] for i in phase(result, "PPO iteration: rollouts")["items"]}
    assert rollouts[f"rollouts: KV cache, bf16, 64 x {length:,} positions"] == kv(64)
    sampling = {i["what"]: i["bytes"] for i in phase(result, "calibration, Figures 7-8")["items"]}
    assert sampling[f"sampling: KV cache, bf16, 64 x {length:,} positions"] == kv(64)
    refresh = {i["what"]: i["bytes"] for i in phase(result, "PPO iteration: the sampler refreshed")["items"]}
    assert refresh["one weight of the policy gathered whole (the largest), fp32"] == 4 * 32000 * 4096
    assert not result["fits"] and result["fix"] == "--activation-checkpointing"
    checkpointed = plan("06_rs_ppo", *flags, "--activation-checkpointing", "--sample-batch", "32")
    rollouts = {i["what"]: i["bytes"] for i in phase(checkpointed, "PPO iteration: rollouts")["items"]}
    assert rollouts[f"rollouts: KV cache, bf16, 32 x {length:,} positions"] == kv(32)
    assert checkpointed["fits"]
    update = phase(checkpointed, "PPO update")
    assert update["bytes"] < phase(result, "PPO update")["bytes"] / 2   # the two graphs, checkpointed


def test_batches_the_planner_assumes_are_the_chapters():
    """The planner's scoring batches are defaults in 05's code (if one changes there, this fails),
    and it generates --sample-batch answers at a time, as 04-07 do, resolved per preset as they
    resolve it: the full-scale default at 7B, the CPU presets' on the toy."""
    S, R, PPO, G = (chapter(n) for n in ("04_sft", "05_reward", "06_rs_ppo", "07_gatt"))
    default = lambda fn, name: inspect.signature(fn).parameters[name].default
    assert P.PLAN_BATCHES == dict(score_rows=default(R.score_rows, "batch_size"),
                                  evaluate_rm=default(R.evaluate_rm, "batch_size"))
    caches = lambda module, *flags: [c for c in (sum(i["bytes"] for i in p["items"] if i["kind"] == "kv_cache")
                                                 for p in plan(module.__name__, *flags)["phases"]) if c]
    for module in (S, R, PPO, G):
        # the flag reaches the plan: every phase that generates holds that many answers' KV cache
        halved, flagged = (caches(module, "--preset", "7B", "--sample-batch", str(n)) for n in (8, 16))
        assert flagged and all(0 < a and b == 2 * a for a, b in zip(halved, flagged)), module.__name__
        for preset, side in (("7B", module.PAPER), ("toy", module.TOY)):   # and its default, per preset
            assert caches(module, "--preset", preset) == caches(module, "--preset", preset, "--sample-batch",
                                                                 str(side["sample_batch"]))
    assert S.TOY["sample_batch"] > S.PAPER["sample_batch"] and G.PAPER["sample_batch"] == 32
    assert P.PLAN_NEW_TOKENS["evaluate_chat"] == default(S.evaluate_chat, "max_new_tokens")
    assert P.PLAN_NEW_TOKENS["gatt"] == G.MAX_NEW_TOKENS == default(G.converse, "max_new_tokens")


# --- compute ---------------------------------------------------------------------------------

def test_table2_mfu_is_6ND_over_the_papers_gpu_hours():
    rows = {r["size"]: r for r in P.table2_rows()}
    assert list(rows) == ["7B", "13B", "34B", "70B"]
    hours = {"7B": 184_320, "13B": 368_640, "34B": 1_038_336, "70B": 1_720_320}   # the paper's Table 2
    for size, r in rows.items():
        n = M.count_params(M.PRESETS[size])
        assert r["params"] == n and r["gpu_hours"] == hours[size]
        assert r["mfu_6nd"] == pytest.approx(6 * n * 2e12 / (hours[size] * 3600 * 312e12))
        assert r["mfu_with_attention"] > r["mfu_6nd"]   # attention's FLOPs come on top of 6N
        assert 0.2 < r["mfu_6nd"] < 0.6   # an MFU a large A100 run reaches, not a unit slip
    assert rows["7B"]["params"] == LLAMA2_7B_PARAMS


def test_time_at_mfu_is_flops_over_the_gpus_rate():
    result = plan("03_pretrain", "--preset", "7B", "--fsdp", "--gpus", "8", "--mfu", "0.5", "--steps", "10")
    tokens = 10 * 4 * 1024**2
    assert result["flops"] == tokens * M.flops_per_token(M.PRESETS["7B"], 4096) == 10 * result["flops_per_step"]
    assert result["seconds"] == pytest.approx(result["flops"] / (8 * 312e12 * 0.5))


# --- the command line ------------------------------------------------------------------------

def test_cli_plans_without_a_gpu_data_or_checkpoint(tmp_path):
    """--device cuda on a machine whose GPUs are hidden, and no file that exists: the plan must
    print and exit before any of them is touched, and write its JSON."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "06_rs_ppo.py", "--preset", "7B", "--fsdp", "--plan", "--gpus", "8", "--gpu-memory",
           "80", "--device", "cuda", "--dtype", "bf16", "--run-dir", str(tmp_path / "run"), "--init",
           str(tmp_path / "nothing.pt"), "--prompts", str(tmp_path / "nothing.jsonl"), "--plan-json", str(out)]
    done = subprocess.run(cmd, cwd=tok.REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "verdict: does not fit on 8 x 80 GB" in done.stdout and "PPO update" in done.stdout
    assert not (tmp_path / "run").exists()
    result = json.loads(out.read_text())
    assert {"gpus", "gpu_memory_gb", "per_rank_bytes", "fits"} <= set(result)
    assert set(result["per_rank_bytes"]) == {"weights", "grads", "optimizer", "activations", "kv_cache",
                                             "other_models", "peak"}
    assert result["gpus"] == 8 and result["gpu_memory_gb"] == 80 and result["fits"] is False


@pytest.mark.parametrize("module,extra", [("04_sft", []), ("05_reward", []), ("07_gatt", [])])
def test_every_chapter_plans(module, extra, tmp_path):
    result = plan(module, "--preset", "7B", "--fsdp", "--gpus", "8", "--run-dir", str(tmp_path / "run"), *extra)
    assert result["per_rank_bytes"]["peak"] > 0 and isinstance(result["fits"], bool)
    assert not (tmp_path / "run").exists()


def test_pipeline_plans_each_chapter(tmp_path, capsys):
    pipeline = chapter("pipeline")
    plans = pipeline.main(["--plan", "--only", "03", "05", "--preset", "7B", "--fsdp", "--gpus", "8",
                           "--run-dir", str(tmp_path / "run")])
    assert list(plans) == ["03", "05"] and all(p["gpus"] == 8 and p["parallelism"] == "FSDP" for p in plans.values())
    assert plans["03"] == plan("03_pretrain", *pipeline.stage_args("03", pipeline.argparse.Namespace(
        run_dir=tmp_path / "run", device="auto", dtype="auto", compile=False, preset="7B", smoke=False)),
        "--gpus", "8", "--fsdp")
    assert re.search(r"03 03_pretrain.py +[\d.]+ GB  (fits|does not fit)", capsys.readouterr().out)
    assert not (tmp_path / "run").exists()


def test_table2_flag_prints_the_four_sizes(capsys):
    rows = P.main(["--plan-table2"])["table2"]
    printed = capsys.readouterr().out
    for r in rows:
        assert re.search(rf"{r['size']}\s+{r['params']:,}.*{100 * r['mfu_6nd']:.1f}%", printed)


def test_a_plan_of_an_unusable_setup_is_one_line():
    with pytest.raises(UserError, match="not a multiple"):   # the real run's own check
        plan("03_pretrain", "--preset", "7B", "--gpus", "3")
    with pytest.raises(UserError, match="fp16"):
        plan("03_pretrain", "--preset", "7B", "--dtype", "fp16")


PLAN_ROW = re.compile(r"^\| `(?:torchrun (?:--nnodes=(\d+) )?--nproc_per_node=(\d+)|python) (0\d_\w+)\.py ([^`]*)` \| "
                      r"(\d+) \| ([\d.]+) \| (fits|does not fit) \| ([^|]*) \|$", re.M)


def planner_rows():
    readme = (tok.REPO / "README.md").read_text(encoding="utf-8")
    return PLAN_ROW.findall(readme.split("## Will it fit? The planner", 1)[1].split("\n## ", 1)[0])


def test_readme_verdicts_are_the_planners():
    """Each row of the README's tables of full-scale commands is what the planner says for that
    command today: its peak per rank and its verdict, on its GPUs (nodes x processes a node)."""
    rows = planner_rows()
    assert len(rows) >= 12
    for nnodes, nproc, script, flags, gpus, peak, verdict, fix in rows:
        assert int(gpus) == int(nnodes or 1) * int(nproc or 1)
        result = plan(script, *flags.split(), "--gpus", gpus)
        assert f"{result['per_rank_bytes']['peak'] / 1e9:.1f}" == peak, (script, flags)
        assert result["fits"] == (verdict == "fits"), (script, flags)
        assert (result["fix"] or "-") == fix.strip(), (script, flags)


def advertised_commands():
    """The training commands of the README's code blocks and of 03-07's docstrings that name a
    full-scale preset (not --plan, not chat): lines joined at their continuations, comments off."""
    texts = [(tok.REPO / "README.md").read_text(encoding="utf-8")]
    texts += [inspect.getmodule(chapter(m)).__doc__ for m in ("03_pretrain", "04_sft", "05_reward", "06_rs_ppo",
                                                                "07_gatt")]
    found = []
    for text in texts:
        joined = re.sub(r"\\+\n\s*", " ", text)
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            full_scale = re.search(r"--preset (7B|13B|34B|70B)\b", line)
            if re.match(r"(torchrun .*|python )0[3-7]_\w+\.py", line) and full_scale \
                    and "--plan" not in line and " chat " not in line:
                found.append(line)
    return found


def test_every_advertised_full_scale_command_is_planned_and_fits():
    """Issue 18: each full-scale training command we advertise is a row of the README's first
    table (the same flags, in any order) and fits on the GPUs it names."""
    words = lambda command: sorted(w for w in command.split() if w != "...")
    fitting = {tuple(words(f"{script}.py {flags}")): (nnodes, nproc) for nnodes, nproc, script, flags, _, _, verdict, _
               in planner_rows() if verdict == "fits"}
    commands = advertised_commands()
    assert len(commands) >= 9   # README: 03, 04, 06; the docstrings: 03, 04 (7B, 70B), 05, 06, 07
    for command in commands:
        nodes = re.search(r"--nnodes=(\d+)", command)
        procs = re.search(r"--nproc_per_node=(\d+)", command)
        script_on = command[command.index("0"):] if command.startswith("python") else \
            re.sub(r"^torchrun (--nnodes=\d+ )?--nproc_per_node=\d+ ", "", command)
        key = tuple(words(script_on))
        assert key in fitting, command
        assert fitting[key] == (nodes.group(1) if nodes else "", procs.group(1) if procs else ""), command


# --- activation checkpointing ------------------------------------------------------------------

def test_checkpointing_gives_the_same_loss_and_gradients_and_saves_less():
    torch.manual_seed(0)
    model = M.Transformer(M.PRESETS["micro"])
    x, y = (torch.randint(0, 512, (2, 48)) for _ in range(2))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = P.lm_loss(model, (x, y))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    plain_saved = saved_bytes(model, x, y)
    P.checkpoint_blocks(model, True)
    loss, grads = loss_and_grads()
    saved = saved_bytes(model, x, y)
    P.checkpoint_blocks(model, False)
    assert torch.equal(loss, plain_loss)
    assert all(torch.allclose(g, h, rtol=0, atol=1e-6) for g, h in zip(grads, plain_grads))
    assert saved < plain_saved / 2
    assert "forward" not in model.layers[0].__dict__   # taken off again: the model is 02's plain one
    assert saved_bytes(model, x, y) == plain_saved


def test_train_with_checkpointing_follows_the_same_losses():
    """03's loop for a few steps in bf16 (CPU autocast), with and without the flag: the same losses."""
    def run(*flags):
        parser = P.argparse.ArgumentParser()
        P.add_training_args(parser, P.PAPER, P.TOY)
        cfg = P.resolve_args(parser.parse_args(["--preset", "micro", "--dtype", "bf16", "--steps", "3", "--seq-len",
                                                "32", "--micro-batch", "2", "--batch-tokens", "128", "--log-every",
                                                "1", "--warmup-steps", "1", *flags]))
        torch.manual_seed(0)
        model = M.Transformer(M.PRESETS["micro"])
        data = torch.randint(0, 512, (64, 33), generator=torch.Generator().manual_seed(1))

        def get_batch(step, micro):
            rows = data[(step * 2 + micro) * 2:(step * 2 + micro) * 2 + 2]
            return rows[:, :-1], rows[:, 1:]
        out = P.train(cfg, model, get_batch, P.lm_loss)
        return [h["loss"] for h in out["history"]], model
    plain, _ = run()
    checkpointed, model = run("--activation-checkpointing")
    assert checkpointed == plain and len(plain) == 3
    assert not any("forward" in m.__dict__ for m in model.modules())


# --- FSDP2 under autocast, as the planner assumes it ------------------------------------------

FSDP_PROBE = textwrap.dedent("""
    import importlib, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    M = importlib.import_module("02_model")
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    model = M.Transformer(M.PRESETS["micro"])
    # the linear layers' weights; a matmul may save its weight transposed, so shapes are compared sorted
    full = {tuple(sorted(p.shape)) for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n}
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randint(0, 512, (2, 15)))   # 30 tokens: no activation shaped like a weight
    model.set_requires_gradient_sync(False)   # a micro-step before the last, as 03's loop does it
    out.float().sum().backward()
    fsdp_param = model.layers[0]._get_fsdp_state()._fsdp_param_group.fsdp_params[0]
    if dist.get_rank() == 0:
        print("bf16 weights saved:", {tuple(sorted(s)) for d, s in saved if d == torch.bfloat16} >= full)
        print("unsharded gradient kept:", fsdp_param._unsharded_param.grad.shape == fsdp_param._orig_size
              and fsdp_param.sharded_param.grad is None)
    dist.barrier()   # a gloo rank leaving while its peer is connected can abort at exit
    dist.destroy_process_group()
""")


def test_fsdp_with_autocast_saves_whole_bf16_weights_and_keeps_unsharded_gradients(tmp_path, torchrun):
    """Two claims the planner makes of today's code, checked on CPU with two gloo processes: the
    bf16 copies autocast saves for backward are of the whole (gathered) weights, and a backward
    without gradient sync leaves the whole fp32 gradient on every rank."""
    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_PROBE)
    done = torchrun(probe, tok.REPO, timeout=300, env={"OMP_NUM_THREADS": "1"}, standalone=False)
    assert "bf16 weights saved: True" in done.stdout and "unsharded gradient kept: True" in done.stdout
