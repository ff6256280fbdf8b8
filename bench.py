"""
bench.py: is the readable code the slow code? Ours against Hugging Face transformers.

Each figure is measured side by side in one process against transformers' LlamaForCausalLM
holding the same weights (02's save_hf export, q/k rows permuted for HF's RoPE, opened with
from_pretrained), and reported as ours / theirs:
  * the training step: forward, backward, gradient clipping and AdamW (03's optimizer), in
    tokens/s, at the --sizes presets; first the two must give the same fp32 logits on the batch;
  * generation with the KV cache, greedy, at --batch-sizes (1 and 8) and --gen-tokens (256)
    new tokens, ours eager and with 02's compiled decoding step (generate(compile=True)); first
    all must produce identical tokens (in fp32; bf16 rounds differently). Each with its share of
    the roofline: the bytes a decoding step reads (02's decode_bytes) times steps/s, over the
    memory bandwidth (a GPU's from a table or --peak-bandwidth; a CPU's measured by a copy);
  * on a GPU, also a ~1B preset in bf16 with torch.compile: training tokens/s and MFU, the
    model FLOPs done per second (02's flops_per_token) over the device's dense bf16 peak
    (03's PEAK_FLOPS table);
  * 06's rollout throughput and the generate / score / train split of a PPO iteration, with
    the compiled decoding step off and on, when 06_rs_ppo.py is there.
Every figure is the median of --repeats timed runs after --warmup runs, ours and theirs taking
turns, so that a slow spell of a shared machine slows both alike; a ratio is the median of the
ratios of the back-to-back pairs. transformers is optional: without it (or with
--no-transformers) the script prints our own figures only.

Run:
  python bench.py                        # CPU: training steps at toy and small, generation at toy
  python bench.py --device cuda          # adds the 1B preset in bf16 with compile, and MFU
  python bench.py --quick --no-transformers    # micro sizes in a few seconds (the smoke test)
The table goes to the terminal and everything to runs/toy/bench.json (--json).
"""
import argparse
import importlib
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")
M = importlib.import_module("02_model")
P = importlib.import_module("03_pretrain")
UserError = tok.UserError
REPO = Path(__file__).resolve().parent

# Targets (issue "bench.py"): ratios ours / transformers, and MFU on a GPU.
TRAIN_TARGET = 1.0   # CPU training step: at least as fast as transformers
GEN_TARGET = 2.0     # CPU generation, compiled step: 2x transformers' tokens/s (issue "decode")
MFU_TARGET = 0.45    # ~1B preset, bf16 and compile, on an H100
ROOFLINE_TARGET = 0.5   # GPU preset, bf16, batch 1, compiled step: half the memory-bandwidth limit
GPU_GEN_TARGET = 3.0    # GPU preset, bf16, batch 8, compiled step: 3x transformers' tokens/s
ROLLOUT_TARGET = 2.0    # GPU: 06's rollout samples/s, compiled step over eager
# HBM bandwidth, bytes/s (vendors' data sheets), for the roofline of decoding on a GPU
PEAK_BANDWIDTH = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("B200", 8.0e12),
                  ("A100-SXM4-40GB", 1.555e12), ("A100", 2.039e12), ("L40S", 0.864e12), ("L4", 0.3e12),
                  ("MI300X", 5.3e12)]
# The GPU row trains as a real run would: micro-batches of 4 x 2048 tokens, 4 of them
# accumulated per optimizer step, so AdamW's pass over the weights is amortised (64 would be
# in a run of 03, whose batch is 0.5M tokens). Both models and their optimizers fit on 80 GB.
GPU_TRAIN = dict(batch=4, seq_len=2048, accum=4)
PROMPT_LEN = 32      # generation prompts: random tokens, the same length in every row (no padding)


def load_transformers(disabled: bool):
    """The transformers module, or None (not installed, or --no-transformers)."""
    if disabled:
        return None
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: our figures only (pip install transformers to compare)")
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def hf_twin(model, transformers, device):
    """transformers' LlamaForCausalLM with our weights, through 02's Hugging Face export."""
    with tempfile.TemporaryDirectory() as folder:
        M.save_hf(model, folder)
        hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=model.output.weight.dtype)
    return hf.to(device)


def race(fns: dict, warmup: int, repeats: int, device) -> dict:
    """Seconds per call of each function, every timed call. After the warm-up (which also pays
    for compilation) the functions take turns, a b, b a, a b, ...: a slow spell of a shared
    machine hits both, and neither always goes first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in (fns.items() if i % 2 == 0 else reversed(fns.items())):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def speeds(row: dict, times: dict, work: float):
    """ours_tok_s and hf_tok_s (and compiled_tok_s) from the median times; the ratio to
    transformers as the median of the ratios of each turn's pair (timed back to back, so they saw
    the same machine), steadier than the ratio of the two medians on a machine whose speed drifts."""
    for name, t in times.items():
        row[f"{name}_tok_s"] = work / statistics.median(t)
    if "hf" in times:
        row["ratio"] = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))
        if "compiled" in times:
            row["compiled_ratio"] = statistics.median(h / c for c, h in zip(times["compiled"], times["hf"]))


def memory_bandwidth(device, peak=None):
    """Bytes/s the device's memory moves: --peak-bandwidth, else a GPU's from PEAK_BANDWIDTH, else
    measured: the best of 5 copies of 512 MB (each reads and writes it), as on a CPU."""
    if peak:
        return peak, "--peak-bandwidth"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = next((b for key, b in PEAK_BANDWIDTH if key in name), None)
        if table:
            return table, f"{name}'s data sheet"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.ones(2 ** 27, device=device)
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best, "measured: a 512 MB copy"


# ------------------------------------------------------------------------------------------
# The training step: the same loss code for both, so that the models are what is compared.

def train_step_fn(model, forward, x, y, accum: int, amp_dtype, device):
    """One optimizer step: `accum` micro-batches of forward and backward, clipping, AdamW."""
    optimizer = P.configure_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5,
                                      device=device)
    params = list(model.parameters())

    def step():
        for _ in range(accum):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                logits = forward(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_train(preset: str, batch: int, seq_len: int, accum: int, amp_dtype, compile: bool,
                device, transformers, opts) -> dict:
    args = M.PRESETS[preset]
    seq_len = min(seq_len, args.max_seq_len)
    torch.manual_seed(opts.seed)
    with torch.device(device):   # built in place: a 1B model initialised on the CPU takes a while
        ours = M.Transformer(args).train()   # fp32 weights; bf16 through autocast, as in 03
    xy = torch.randint(0, args.vocab_size, (batch, seq_len + 1), device=device)
    x, y = xy[:, :-1], xy[:, 1:]
    row = dict(preset=preset, params=M.count_params(args), batch=batch, seq_len=seq_len, accum=accum,
               dtype=str(amp_dtype).removeprefix("torch."), compile=compile)
    fns = {"ours": ours}
    if transformers:
        hf = hf_twin(ours, transformers, device).train()
        # The same logits on the same batch first: otherwise the race would compare two models.
        # In fp32, the weights' own precision, whatever the race's autocast: there the two agree
        # to rounding, and a wrong RoPE permutation shows at 1e-3 even at init, where the loss
        # barely moves. (Under bf16 autocast the two round differently, and that hides it.)
        with torch.no_grad():
            a, b = ours(x).float(), hf(input_ids=x, use_cache=False).logits.float()
        loss_a, loss_b = (F.cross_entropy(t.flatten(0, 1), y.flatten()).item() for t in (a, b))
        row.update(loss_ours=loss_a, loss_hf=loss_b, max_logit_diff=(a - b).abs().max().item())
        print(f"  {preset}: fp32 loss ours {loss_a:.6f}, transformers {loss_b:.6f} (max logit difference "
              f"{row['max_logit_diff']:.1e})")
        if row["max_logit_diff"] > 1e-4:
            raise UserError(f"{preset}: the two models disagree (loss {loss_a:.6f} vs {loss_b:.6f}, logits "
                            f"by up to {row['max_logit_diff']:.1e}): the export or a model is wrong, "
                            "so timing them means nothing")
        fns["hf"] = hf
    steps = {}
    for name, model in fns.items():
        runner = torch.compile(model) if compile else model
        forward = runner if name == "ours" else (lambda t, r=runner: r(input_ids=t, use_cache=False).logits)
        steps[name] = train_step_fn(model, forward, x, y, accum, amp_dtype, device)
    speeds(row, race(steps, opts.warmup, opts.repeats, device), work=batch * seq_len * accum)
    peak = opts.peak_flops or P.peak_flops(device)
    if peak:   # MFU: the model's FLOPs per second over the device's peak
        for name in steps:
            row[f"{name}_mfu"] = M.flops_per_token(args, seq_len) * row[f"{name}_tok_s"] / peak
    print(f"  {preset}: {progress(row)}")
    return row


def progress(row) -> str:
    line = f"ours {row['ours_tok_s']:,.0f} tok/s"
    if "hf_tok_s" in row:
        line += f", transformers {row['hf_tok_s']:,.0f} tok/s: {row['ratio']:.2f}x"
    if "ours_mfu" in row:
        theirs = f", transformers {row['hf_mfu']:.1%}" if "hf_mfu" in row else ""
        line += f" (MFU ours {row['ours_mfu']:.1%}{theirs})"
    if "compiled_tok_s" in row:
        line += (f" | compiled step {row['compiled_tok_s']:,.0f} tok/s"
                 + (f": {row['compiled_ratio']:.2f}x transformers" if "compiled_ratio" in row else ""))
    if "roofline_tok_s" in row:
        line += (f" | roofline {row['roofline_tok_s']:,.0f} tok/s ({row['step_bytes'] / 1e6:,.1f} MB a step at "
                 f"{row['bandwidth'] / 1e9:,.0f} GB/s): eager {row['ours_roofline_share']:.1%}"
                 + (f", compiled {row['compiled_roofline_share']:.1%}" if "compiled_roofline_share" in row else ""))
    return line


# ------------------------------------------------------------------------------------------
# Generation: greedy, so the two must agree token for token.

def bench_generate(preset: str, batch: int, new_tokens: int, dtype, device, transformers, opts) -> dict:
    args = M.PRESETS[preset]
    torch.manual_seed(opts.seed)
    with torch.device(device):
        ours = M.Transformer(args).to(dtype).eval()
    prompts = torch.randint(3, args.vocab_size, (batch, PROMPT_LEN), device=device)
    row = dict(preset=preset, batch=batch, prompt_len=PROMPT_LEN, new_tokens=new_tokens,
               dtype=str(dtype).removeprefix("torch."))
    out = {}   # the tokens of each one's latest call

    def ours_generate():
        out["ours"] = M.generate(ours, prompts.tolist(), new_tokens, temperature=0, eos_id=None)

    def compiled_generate():   # 02's compiled decoding step; the warm-up call compiles it
        out["compiled"] = M.generate(ours, prompts.tolist(), new_tokens, temperature=0, eos_id=None, compile=True)
    fns = {"ours": ours_generate}
    if transformers:
        hf = hf_twin(ours, transformers, device).eval()
        hf.generation_config.eos_token_id = None   # never stop early: all new_tokens, as ours

        def hf_generate():
            ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            out["hf"] = ids[:, PROMPT_LEN:].tolist()
        fns["hf"] = hf_generate
    if not opts.eager_only:
        fns["compiled"] = compiled_generate
    # The agreement checks first, on one call of each (the race's warm-up repeats it): transformers'
    # before the compile, so that a broken export stops the bench at once
    for name, fn in fns.items():
        t0 = time.time()
        fn()
        if name == "compiled":
            row["compile_s"] = time.time() - t0   # this first call compiled the step (less with a warm cache)
    for name in [n for n in ("hf", "compiled") if n in out]:
        agree = out["ours"] == out[name]
        row["identical" if name == "hf" else "compiled_identical"] = agree
        if not agree:
            first = min(next(i for i, (s, t) in enumerate(zip(a, b)) if s != t)
                        for a, b in zip(out["ours"], out[name]) if a != b)
            row["first_difference" if name == "hf" else "compiled_first_difference"] = first
            what = "transformers'" if name == "hf" else "the compiled step's"
            if dtype == torch.float32:
                raise UserError(f"generation {preset} batch {batch}: greedy tokens differ from {what} at new token "
                                f"{first}")
            print(f"  {preset} batch {batch}: tokens agree with {what} up to new token {first} "
                  f"(expected in {row['dtype']}: they round differently)")
    speeds(row, race(fns, opts.warmup, opts.repeats, device), work=batch * new_tokens)
    # the roofline: what a step must read (decode_bytes, the cache half full on average; the compiled
    # step reads its whole static cache, so it sits further below), at most bandwidth bytes a second
    step_bytes = M.decode_bytes(args, batch, PROMPT_LEN + new_tokens // 2, dtype.itemsize)
    row.update(step_bytes=step_bytes, bandwidth=opts.bandwidth, bandwidth_source=opts.bandwidth_source,
               roofline_tok_s=batch * opts.bandwidth / step_bytes)
    for name in [n for n in fns if n != "hf"]:
        row[f"{name}_roofline_share"] = row[f"{name}_tok_s"] / row["roofline_tok_s"]
    print(f"  {preset} batch {batch}: {progress(row)}")
    return row


# ------------------------------------------------------------------------------------------
# Chapter 06's rollouts: samples/s for a PPO batch and the split of one PPO iteration.

def bench_rollout(device, opts):
    """06's rollout throughput and the time split of its PPO iterations, measured by running 06
    itself (PPO only, no figures) from the run folder's SFT model and reward models, with the
    compiled decoding step off, then on (--compile-decode); None when those are missing. Rollouts
    are not compared with TRL: that would need its own RMs."""
    if opts.run_dir is None and opts.quick:
        print("rollout skipped (--quick without --run-dir)")
        return None
    run_dir = Path(opts.run_dir or tok.DEFAULT_RUN_DIR)
    needed = [run_dir / f for f in ("tokenizer.model", "sft.pt", "rm_helpful.pt", "rm_safety.pt")]
    if not all(p.is_file() for p in needed) or not (REPO / "06_rs_ppo.py").is_file():
        print(f"rollout skipped: it needs 06_rs_ppo.py and {', '.join(p.name for p in needed)} in {run_dir} "
              "(run the pipeline first, or pass --run-dir)")
        return None
    RL = importlib.import_module("06_rs_ppo")
    iterations = max(2, opts.repeats)
    small = ["--preset", "micro", "--ppo-prompts", "8", "--ppo-mini-batch", "8", "--ppo-micro-batch", "8",
             "--max-new-tokens", "8", "--calibration-prompts", "8"] if opts.quick else []
    out = {}
    for decoding, flags in (("eager", []), ("compiled", ["--compile-decode"]))[:1 if opts.eager_only else 2]:
        with tempfile.TemporaryDirectory() as tmp:
            RL.main(["--run-dir", tmp, "--tokenizer", str(needed[0]), "--init", str(needed[1]),
                     "--rm-helpful", str(needed[2]), "--rm-safety", str(needed[3]), "--device", str(device),
                     "--no-rs", "--fig-n", "0", "--eval-per-kind", "1", "--calibration-prompts", "64",
                     "--value-warmup", "0", "--ppo-iterations", str(iterations), "--ppo-ckpt-every", "1000",
                     *small, *flags])
            history = json.loads((Path(tmp) / "rs_ppo.json").read_text())
        prompts = history["config"]["ppo_prompts"]
        timed = history["ppo"][1:]   # the first iteration warms up (and compiles what the calibration did not)
        split = {k: statistics.median(h[k] for h in timed) for k in ("gen_s", "score_s", "train_s")}
        out[decoding] = dict(prompts=prompts, iterations=len(timed), samples_per_s=prompts / split["gen_s"],
                             **{f"median_{k}": v for k, v in split.items()})
        total = sum(split.values())
        print(f"  {decoding:>8}: PPO batch of {prompts} rollouts: {out[decoding]['samples_per_s']:,.1f} samples/s "
              f"generated; one iteration {total:.2f}s = "
              + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s ({v / total:.0%})" for k, v in split.items()))
    if "compiled" in out:
        out["compiled_over_eager"] = out["compiled"]["samples_per_s"] / out["eager"]["samples_per_s"]
        print(f"  rollout samples/s, compiled step over eager: {out['compiled_over_eager']:.2f}x")
    return out


# ------------------------------------------------------------------------------------------
# The report: one table, and the JSON.

def fmt(value, percent=False):
    if value is None:
        return "-"
    return f"{value:.1%}" if percent else f"{value:,.0f}"


def report_rows(results: dict, device, gpu_preset) -> list:
    """A row per figure: what, ours, theirs, ratio, and where the issue sets one, the target,
    the value it applies to and whether it is met. The ratio targets are for the CPU; on a GPU
    the targets are the GPU preset's: MFU, the compiled step's share of the roofline at batch 1
    and its ratio to transformers at batch 8, and the rollouts' compiled / eager."""
    rows, on_cpu = [], device.type == "cpu"

    def add(what, ours, theirs, ratio, value=None, target=None, percent=False):
        met = None if value is None or target is None else value >= target
        text = "" if target is None else f">= {target:.0%}" if percent else f">= {target:.1f}x"
        rows.append(dict(what=what, ours=ours, hf=theirs, ratio=ratio, value=value, target=text, met=met))
    for r in results["train"]:
        ratio = r.get("ratio")
        compiled = " compile" if r["compile"] else ""
        add(f"train {r['preset']} {r['dtype']}{compiled} tok/s", fmt(r["ours_tok_s"]), fmt(r.get("hf_tok_s")),
            ratio, ratio, TRAIN_TARGET if on_cpu else None)
        if "ours_mfu" in r:
            is_target = r["preset"] == gpu_preset and r["dtype"] == "bfloat16" and r["compile"]
            add(f"  MFU {r['preset']}", fmt(r["ours_mfu"], True), fmt(r.get("hf_mfu"), True), None,
                r["ours_mfu"], MFU_TARGET if is_target else None, percent=True)
    for r in results["generate"]:
        on_gpu_preset = r["preset"] == gpu_preset and r["dtype"] == "bfloat16"
        add(f"generate {r['preset']} {r['dtype']} batch {r['batch']} tok/s", fmt(r["ours_tok_s"]),
            fmt(r.get("hf_tok_s")), r.get("ratio"))
        if "compiled_tok_s" not in r:   # --eager-only
            continue
        same = r.get("identical", True) and r.get("compiled_identical", True)
        ratio = r.get("compiled_ratio") if same or r["dtype"] != "float32" else 0.0   # other tokens: not met
        target = GEN_TARGET if on_cpu else GPU_GEN_TARGET if on_gpu_preset and r["batch"] == 8 else None
        add("  compiled step tok/s", fmt(r["compiled_tok_s"]), fmt(r.get("hf_tok_s")), r.get("compiled_ratio"),
            ratio, target)
        add("  compiled step, share of roofline", fmt(r["compiled_roofline_share"], True), "-", None,
            r["compiled_roofline_share"], ROOFLINE_TARGET if on_gpu_preset and r["batch"] == 1 else None,
            percent=True)
    if results.get("rollout") and "compiled" in results["rollout"]:
        speedup = results["rollout"]["compiled_over_eager"]
        add("rollout samples/s, compiled / eager", fmt(results["rollout"]["compiled"]["samples_per_s"]), "-",
            speedup, speedup, None if on_cpu else ROLLOUT_TARGET)
    return rows


def print_table(rows):
    header = ("what", "ours", "transformers", "ratio", "target", "met?")
    lines = [header] + [(r["what"], r["ours"], r["hf"], "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                         r["target"], {True: "yes", False: "NO", None: ""}[r["met"]]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                        for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description="Speed against Hugging Face transformers, and MFU on a GPU.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="toy,small", help="presets for the training-step comparison")
    p.add_argument("--gen-preset", default="toy", help="preset for the generation comparison")
    p.add_argument("--gpu-preset", default="1B", help="on a GPU, also this preset in bf16 with compile "
                                                      "(training, MFU, generation); 'none' to skip")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    p.add_argument("--dtype", default="auto", help="for --sizes and --gen-preset: auto (bf16 on a GPU "
                                                   "that has it, else fp32), fp32, bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' training steps "
                                                         "(the GPU preset always is)")
    p.add_argument("--batch", type=int, default=4, help="training rows per step at --sizes")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length at --sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--gen-tokens", type=int, default=256, help="new tokens per generation")
    p.add_argument("--batch-sizes", default="1,8", help="generation batch sizes")
    p.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s for MFU (default: 03's table)")
    p.add_argument("--eager-only", action="store_true", help="skip 02's compiled decoding step (each batch "
                                                             "size compiles it once: ~15-30 s on a CPU)")
    p.add_argument("--peak-bandwidth", type=float, help="the device's memory bandwidth in bytes/s, for the "
                                                        "roofline of decoding (default: a GPU table; on a CPU, "
                                                        "measured by a copy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(tok.DEFAULT_RUN_DIR / "bench.json"), help="where the figures go")
    p.add_argument("--no-transformers", action="store_true", help="our figures only, even with transformers")
    p.add_argument("--run-dir", help="where 06's rollout bench finds the SFT model and the reward models "
                                     "(default runs/toy; with --quick, none: no rollout)")
    p.add_argument("--quick", action="store_true", help="micro sizes and few tokens (batch sizes 1,2 unless given): "
                                                     "a smoke test in seconds")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.sizes, opts.gen_preset, opts.gpu_preset = "micro", "micro", "none"
        opts.batch, opts.seq_len, opts.gen_tokens = 2, 64, 16
        if opts.batch_sizes == p.get_default("batch_sizes"):
            opts.batch_sizes = "1,2"
        opts.repeats, opts.warmup = min(opts.repeats, 2), min(opts.warmup, 1)
    sizes = [s for s in opts.sizes.split(",") if s]
    for name in sizes + [opts.gen_preset] + ([opts.gpu_preset] if opts.gpu_preset != "none" else []):
        if name not in M.PRESETS:
            raise UserError(f"unknown preset {name!r} (choose from {', '.join(M.PRESETS)})")
    room = M.PRESETS[opts.gen_preset].max_seq_len - PROMPT_LEN
    if opts.gen_tokens > room:
        raise UserError(f"--gen-tokens {opts.gen_tokens}: {opts.gen_preset} holds at most {room} new tokens "
                        f"after a {PROMPT_LEN}-token prompt")
    try:
        batch_sizes = [int(b) for b in opts.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes {opts.batch_sizes!r}: integers and commas, e.g. 1,8") from None
    device = M.pick_device(opts.device)
    dtype = M.pick_dtype(opts.dtype, device)
    if dtype == torch.float16:
        raise UserError("--dtype fp16 would need loss scaling in the training step: use bf16 or fp32")
    transformers = load_transformers(opts.no_transformers)
    gpu_preset = opts.gpu_preset if device.type == "cuda" and opts.gpu_preset != "none" else None

    results = dict(config=dict(vars(opts), gpu_preset=gpu_preset),
                   environment=dict(torch=torch.__version__,
                                    transformers=transformers.__version__ if transformers else None,
                                    device=device_name(device), device_type=device.type,
                                    threads=torch.get_num_threads(), python=platform.python_version()),
                   train=[], generate=[], rollout=None)
    print(f"bench on {results['environment']['device']} ({device.type}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, transformers {results['environment']['transformers'] or 'not used'}")

    print("\ntraining step (forward, backward, clipping, AdamW):")
    for preset in sizes:
        results["train"].append(bench_train(preset, opts.batch, opts.seq_len, 1, dtype, opts.compile,
                                            device, transformers, opts))
    if gpu_preset:
        g = GPU_TRAIN
        results["train"].append(bench_train(gpu_preset, g["batch"], g["seq_len"], g["accum"], torch.bfloat16,
                                            True, device, transformers, opts))
        torch._dynamo.reset()   # let go of the compiled graphs, and with them the models' memory
        torch.cuda.empty_cache()

    opts.bandwidth, opts.bandwidth_source = memory_bandwidth(device, opts.peak_bandwidth)
    results["environment"]["memory_bandwidth"] = dict(bytes_per_s=opts.bandwidth, source=opts.bandwidth_source)
    print(f"\ngeneration (greedy, KV cache, {opts.gen_tokens} new tokens; memory bandwidth "
          f"{opts.bandwidth / 1e9:,.0f} GB/s, {opts.bandwidth_source}):")
    gen_rows = [(opts.gen_preset, dtype)] + ([(gpu_preset, torch.bfloat16)] if gpu_preset else [])
    for preset, gen_dtype in gen_rows:
        for batch in batch_sizes:
            results["generate"].append(bench_generate(preset, batch, opts.gen_tokens, gen_dtype, device,
                                                      transformers, opts))

    print("\nrollout (chapter 06):")
    results["rollout"] = bench_rollout(device, opts)

    rows = report_rows(results, device, gpu_preset)
    results["targets"] = [dict(what=r["what"].strip(), value=r["value"], target=r["target"], met=r["met"])
                          for r in rows if r["target"]]
    print()
    print_table(rows)
    tok.write_json(opts.json, results)
    print(f"\nwrote {opts.json}")
    return results


if __name__ == "__main__":
    tok.run_cli(main)
