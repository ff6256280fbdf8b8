"""bench.py: it runs in seconds at micro size without transformers, and its checks of
equivalence with transformers (same loss, same greedy tokens) hold, and catch a broken export."""
import json
import sys

import pytest

import bench

UserError = bench.UserError


def test_quick_bench_without_transformers(tmp_path):
    """With the compiled decoding step (one batch size: each compiles once, ~15-30 s on a CPU; 5 rows
    and a 64-position cache, the shapes test_model's compile test uses, so the suite compiles once):
    it gives eager decoding's tokens, and each speed has its share of the memory-bandwidth roofline."""
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--no-transformers", "--json", str(out), "--batch-sizes", "5"])
    saved = json.loads(out.read_text())
    env = saved["environment"]
    assert env["transformers"] is None and env["threads"] >= 1 and env["torch"]
    assert env["memory_bandwidth"]["bytes_per_s"] > 1e8 and env["memory_bandwidth"]["source"].startswith("measured")
    assert [r["preset"] for r in saved["train"]] == ["micro"]
    (gen,) = saved["generate"]
    assert gen["batch"] == 5 and gen["compiled_identical"] and gen["compiled_tok_s"] > 0
    assert gen["step_bytes"] == bench.M.decode_bytes(bench.M.PRESETS["micro"], 5, bench.PROMPT_LEN + 8, 4)
    assert 0 < gen["ours_roofline_share"] == pytest.approx(gen["ours_tok_s"] / gen["roofline_tok_s"])
    for row in saved["train"] + saved["generate"]:
        assert row["ours_tok_s"] > 0 and "hf_tok_s" not in row and "ratio" not in row


def test_missing_transformers_means_our_figures_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # makes `import transformers` fail
    assert bench.load_transformers(disabled=False) is None


def test_quick_bench_against_transformers(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--eager-only", "--json", str(out)])
    saved = json.loads(out.read_text())
    (train,) = saved["train"]
    assert train["loss_ours"] == pytest.approx(train["loss_hf"], abs=1e-5)
    assert train["hf_tok_s"] > 0 and train["ratio"] > 0
    assert all(r["identical"] and r["hf_tok_s"] > 0 for r in saved["generate"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_broken_export_stops_the_bench(tmp_path, monkeypatch, dtype):
    """Without the q/k permutation, transformers rotates the wrong channel pairs: the check
    must refuse to time two different models, also when the race runs in bf16 (as on a GPU)."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench.M, "permute_for_hf", lambda w, n_heads: w)
    with pytest.raises(UserError, match="disagree"):
        bench.main(["--quick", "--eager-only", "--dtype", dtype, "--json", str(tmp_path / "bench.json")])


def test_rollout_split_comes_from_06_itself(tmp_path):
    """06's PPO iterations, timed: samples/s and the generate / score / train split are positive."""
    import importlib
    from dataclasses import replace
    import torch
    tok, M, R = (importlib.import_module(m) for m in ("01_tokenizer", "02_model", "05_reward"))
    text = (tok.DEFAULT_CORPUS_DIR / "hamlet_gut.txt").read_text(encoding="utf-8")[:40_000]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    tokenizer = tok.Tokenizer(tok.train_tokenizer([tmp_path / "a.txt"], tmp_path / "tokenizer", vocab_size=600))
    args = replace(M.PRESETS["micro"], vocab_size=tokenizer.n_words)
    torch.manual_seed(0)
    M.save_model(M.Transformer(args), tmp_path / "sft.pt")
    for name in ("rm_helpful.pt", "rm_safety.pt"):
        M.save_model(R.RewardModel(args), tmp_path / name)
    out = bench.main(["--quick", "--no-transformers", "--run-dir", str(tmp_path), "--json", str(tmp_path / "b.json"),
                      "--batch-sizes", "1", "--eager-only"])["rollout"]["eager"]
    assert out["prompts"] == 8 and out["iterations"] >= 1 and out["samples_per_s"] > 0
    assert min(out["median_gen_s"], out["median_score_s"], out["median_train_s"]) > 0
