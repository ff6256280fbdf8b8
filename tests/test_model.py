"""Chapter 02: the architecture's properties, generation, and checkpoint formats."""
import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

M = importlib.import_module("02_model")
UserError = importlib.import_module("01_tokenizer").UserError

MICRO = M.PRESETS["micro"]


def micro_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.Transformer(replace(MICRO, **overrides)).eval()


def test_rope_dot_product_depends_only_on_offset():
    head_dim = 16
    freqs = M.precompute_freqs_cis(head_dim, 64)
    q = torch.randn(1, 1, 1, head_dim)
    k = torch.randn(1, 1, 1, head_dim)

    def rotated_dot(m, n):
        qm = M.apply_rotary_emb(q, freqs[:, m:m + 1])
        kn = M.apply_rotary_emb(k, freqs[:, n:n + 1])
        return (qm * kn).sum().item()

    assert rotated_dot(3, 1) == pytest.approx(rotated_dot(40, 38), abs=1e-5)
    assert rotated_dot(10, 10) == pytest.approx(rotated_dot(0, 0), abs=1e-5)
    assert rotated_dot(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)   # position 0: no rotation
    assert abs(rotated_dot(5, 1) - rotated_dot(5, 4)) > 1e-3                     # other offsets differ


def test_rope_keeps_norm():
    freqs = M.precompute_freqs_cis(8, 32)
    x = torch.randn(2, 32, 3, 8)
    assert torch.allclose(M.apply_rotary_emb(x, freqs).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rope_as_a_complex_multiply_equals_the_written_out_rotation_to_the_bit(monkeypatch):
    """Eager mode rotates with one complex multiply, torch.compile traces the two real lines: the
    same products and sums, so the same floats, forward and backward (bf16 input included)."""
    freqs = M.precompute_freqs_cis(32, 4096)[:, 1000:1300]   # positions far from 0: large angles
    torch.manual_seed(0)
    x = (torch.randn(4, 300, 4, 32) * torch.logspace(-3, 3, 32)).requires_grad_()
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        out = M.apply_rotary_emb(x, freqs)
        results.append((out, torch.autograd.grad(out.pow(2).sum(), x)[0],
                        M.apply_rotary_emb(x.detach().bfloat16(), freqs)))
    (eager, eager_grad, eager_bf16), (written, written_grad, written_bf16) = results
    assert torch.equal(eager, written) and torch.equal(eager_grad, written_grad)
    assert eager_bf16.dtype == torch.bfloat16 and torch.equal(eager_bf16, written_bf16)
    assert not torch.equal(eager, x)   # it rotated


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    gqa = micro_model(n_heads=4, n_kv_heads=2)
    mha = M.Transformer(replace(MICRO, n_heads=4, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    head_dim = MICRO.dim // 4
    for key in list(state):
        if key.endswith(("wk.weight", "wv.weight")):
            # each kv head serves 2 query heads: copy its rows for each of them
            w = state[key].view(2, head_dim, -1)
            state[key] = w.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, MICRO.vocab_size, (2, 20))
    assert torch.allclose(gqa(tokens), mha(tokens), atol=1e-5)


def test_repeat_kv_layout():
    x = torch.arange(2 * 3).float().view(1, 1, 2, 3)       # 2 kv heads
    y = M.repeat_kv(x, 3)
    assert y.shape == (1, 1, 6, 3)
    assert torch.equal(y[0, 0, 0], y[0, 0, 2]) and torch.equal(y[0, 0, 3], x[0, 0, 1])


@pytest.mark.parametrize("attention", ["sdpa", "plain"])
def test_kv_cache_decoding_equals_full_forward(attention):
    model = micro_model()
    model.set_attention(attention)   # the plain path repeats the cached kv heads itself (GQA)
    tokens = torch.randint(0, MICRO.vocab_size, (3, 24))
    full = model(tokens)
    model.setup_cache(3, 24)
    pieces = [model(tokens[:, :10], 0)]                       # prefill 10 tokens
    pieces += [model(tokens[:, i:i + 1], i) for i in range(10, 17)]
    pieces.append(model(tokens[:, 17:], 17))                  # a multi-token chunk after the cache
    model.clear_cache()
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_decode_step_reads_the_static_cache_as_generation_does():
    """decode_step (uncompiled): each row's token at its own position, the cache read under a mask
    up to that position, gives the logits of a full forward over the row's tokens; the columns
    after a shorter row's prompt (written by the prefill, not yet by its answer) are not read."""
    model = micro_model()
    tokens = torch.randint(3, MICRO.vocab_size, (2, 9))
    model.setup_cache(2, 16)
    model(tokens[:, :8], 0)                        # the prefill writes columns 0-7 of both rows
    pos = torch.tensor([8, 5])                     # row 1's prompt is 5 tokens: its step overwrites column 5
    step = torch.stack([tokens[0, 8], tokens[1, 5]])[:, None]
    logits, narrow = M.decode_step(model, step, pos), M.decode_step(model, step, pos, width=9)
    model.clear_cache()
    assert torch.allclose(logits[0], model(tokens[:1])[0, -1], atol=1e-5)
    assert torch.allclose(logits[1], model(tokens[1:, :6])[0, -1], atol=1e-5)
    assert torch.allclose(narrow, logits, atol=1e-6)


def test_an_additive_mask_gives_the_bool_masks_result_to_the_bit(monkeypatch):
    """features() hands SDPA the mask already converted (0 / -inf, once for every layer), as SDPA
    would convert a bool mask itself: the same logits and gradients, bit for bit."""
    model = micro_model().train()
    tokens = torch.randint(3, MICRO.vocab_size, (3, 40))
    doc = torch.cumsum(torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) < 0.1, 1)
    mask = (torch.ones(40, 40, dtype=torch.bool).tril() & (doc[:, :, None] == doc[:, None, :]))[:, None]
    results, additive_mask = [], M.additive_mask
    for convert in (True, False):
        if not convert:
            monkeypatch.setattr(M, "additive_mask", lambda mask, dtype: mask)
        model.zero_grad()
        logits = model(tokens, 0, mask)
        logits.logsumexp(-1).mean().backward()
        results.append((logits, [p.grad.clone() for p in model.parameters()]))
    (converted, grads), (as_bool, bool_grads) = results
    assert torch.equal(converted, as_bool) and all(torch.equal(a, b) for a, b in zip(grads, bool_grads))
    assert not torch.equal(converted, model(tokens, 0))   # the mask mattered
    additive = additive_mask(mask, torch.float32)
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, mask)


def test_a_session_feeds_only_what_the_cache_does_not_hold():
    """generate(session=...) over four turns gives fresh generate's greedy tokens, while each
    turn's prefill reads only the columns from the first token some row's cache lacks: rows that
    add a turn, one whose earlier text changed (as when a turn is dropped to fit the context), one
    whose answer came back tokenised otherwise; a row that leaves (Session.keep)."""
    model = micro_model().double()   # float64: the two paths' rounding cannot flip a greedy token
    g = torch.Generator().manual_seed(0)
    new = lambda n: torch.randint(3, MICRO.vocab_size, (n,), generator=g).tolist()
    other = lambda t: 3 + (t - 2) % (MICRO.vocab_size - 3)   # another token than t
    prefills = []   # (first column, columns) of each forward that is not a decoding step
    forward = model.forward
    def spy(tokens, start_pos=0, mask=None, logits_at=None):
        if not torch.is_tensor(start_pos):
            prefills.append((start_pos, tokens.shape[1]))
        return forward(tokens, start_pos, mask, logits_at)
    model.forward = spy

    def turn(prompts, session):
        fresh = M.generate(model, prompts, 6, temperature=0.0)
        prefills.clear()
        assert M.generate(model, prompts, 6, temperature=0.0, session=session) == fresh
        assert all(len(a) == 6 for a in fresh)
        return fresh, list(prefills)

    with M.Session() as session:
        p = [new(5), new(9), new(3)]
        a, read = turn(p, session)
        assert read == [(0, 9)]   # nothing held: every prompt from column 0
        # each row's cache holds its prompt and its answer but the last token (never fed)
        q = [p[i] + a[i] + new(4) for i in range(3)]   # 15, 19 and 13 tokens
        q[1][4] = other(q[1][4])                       # row 1's text changed at token 4
        b, read = turn(q, session)
        assert read == [(4, 15)]   # from row 1's change to the longest prompt's end (rows 0, 2 held 10, 8)
        session.keep([0, 2])       # row 1 leaves
        r = [q[0] + b[0][:1] + [other(b[0][1])] + b[0][2:] + new(2),   # row 0's answer's token 1 differs
             q[2] + b[2] + new(3)]                                     # 23 and 22 tokens
        c, read = turn(r, session)
        assert read == [(16, 7)]   # from row 0's column 16 (row 2 held 18)
        _, read = turn([r[i] + c[i] + new(2) for i in range(2)], session)   # 31 and 30 tokens
        assert read == [(27, 4)]   # from row 1's answer's last token, drawn but never fed (row 0 held 28)
        assert session.cache[0][0].shape[:3] == (2, MICRO.n_kv_heads, MICRO.max_seq_len)
    assert session.cache is None and model.layers[0].attention.cache_k is None


def test_compiled_decoding_gives_the_same_greedy_tokens():
    """generate(compile=True): the compiled decode step gives eager decoding's greedy tokens, with
    prompts of different lengths (padding) and of one length (one compiled shape: a compile on a
    CPU takes ~15 s)."""
    model = micro_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, MICRO.vocab_size, (2 + i,), generator=g).tolist() for i in range(5)]
    for batch in (prompts, [p[:2] for p in prompts]):
        eager = M.generate(model, batch, 40, temperature=0)
        assert len(eager[0]) == 40 and M.generate(model, batch, 40, temperature=0, compile=True) == eager


def test_logits_at_computes_only_the_chosen_positions_logits():
    model = micro_model()
    tokens = torch.randint(0, MICRO.vocab_size, (3, 12))
    chosen = torch.rand(3, 12) < 0.3
    chosen[0, 0] = True
    some = model(tokens, logits_at=chosen)
    assert some.shape == (int(chosen.sum()), MICRO.vocab_size)
    assert torch.allclose(some, model(tokens)[chosen], atol=1e-5)


def test_causality():
    model = micro_model()
    tokens = torch.randint(0, MICRO.vocab_size, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % MICRO.vocab_size
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


def test_sdpa_equals_plain_attention():
    model = micro_model()
    tokens = torch.randint(0, MICRO.vocab_size, (2, 32))
    fast = model(tokens)
    model.set_attention("plain")
    slow = model(tokens)
    assert torch.allclose(fast, slow, atol=1e-5)
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    mask[20:, :5] = False                                     # a custom mask goes through both paths
    slow_masked = model(tokens, mask=mask)
    model.set_attention("sdpa")
    assert torch.allclose(model(tokens, mask=mask), slow_masked, atol=1e-5)
    assert not torch.allclose(slow_masked, slow, atol=1e-4)


@pytest.mark.parametrize("name,params,ffn", [("7B", 6_738_415_616, 11008), ("13B", 13_015_864_320, 13824),
                                             ("70B", 68_976_648_192, 28672), ("34B", None, 22016)])
def test_preset_shapes_match_the_paper(name, params, ffn):
    args = M.PRESETS[name]
    assert M.ffn_hidden_dim(args) == ffn
    if params is not None:
        assert M.count_params(args) == params


@pytest.mark.parametrize("name", list(M.PRESETS))
def test_count_params_is_what_the_model_holds(name):
    assert M.count_params(M.PRESETS[name]) == sum(p.numel() for p in M.meta_model(M.PRESETS[name]).parameters())


def test_preset_table_json_is_what_the_model_has(tmp_path):
    M.main(["--json", str(tmp_path / "model.json"), "--preset", "micro", "--max-new-tokens", "2"])
    table = json.loads((tmp_path / "model.json").read_text())
    assert list(table) == list(M.PRESETS)
    assert table["70B"]["params"] == 68_976_648_192 and table["70B"]["n_kv_heads"] == 8   # GQA at 70B
    micro = M.Transformer(M.PRESETS["micro"])
    assert table["micro"]["params"] == sum(p.numel() for p in micro.parameters())


def test_flops_per_token_counts_matmul_weights():
    args = M.PRESETS["7B"]
    n = M.count_params(args) - args.vocab_size * args.dim
    assert M.flops_per_token(args, 0) == 6 * n
    assert M.flops_per_token(args, 4096) - M.flops_per_token(args, 0) == 12 * 32 * 4096 * 4096


def test_generate_batched_prompts_match_single_prompts():
    model = micro_model()
    prompts = [[1, 5, 9, 33], [1, 7], [1, 2 + 40, 11, 12, 13, 14], [1]]   # padded by 2, 4, 0, 5
    batched = M.generate(model, prompts, 12, temperature=0.0)
    singles = [M.generate(model, [p], 12, temperature=0.0)[0] for p in prompts]
    assert batched == singles
    assert all(len(o) == 12 for o in batched)
    # greedy = argmax of a full forward at every step
    seq = prompts[0] + batched[0]
    logits = model(torch.tensor([seq]))[0]
    for i in range(len(prompts[0]), len(seq)):
        assert seq[i] == logits[i - 1].argmax().item()


def test_generate_gives_every_answer_the_room_the_longest_prompt_leaves():
    model = micro_model()
    room = MICRO.max_seq_len - 20
    outs = M.generate(model, [[1] * 20, [1, 5]], room + 10, temperature=0.0)
    assert [len(o) for o in outs] == [room, room]
    assert outs[1] == M.generate(model, [[1, 5]], room, temperature=0.0)[0]


def test_generate_stops_at_eos_and_sampling_is_seeded():
    model = micro_model()
    prompt = [[1, 5, 9]]
    greedy = M.generate(model, prompt, 10, temperature=0.0)[0]
    cut = M.generate(model, prompt, 10, temperature=0.0, eos_id=greedy[3])[0]
    assert cut == greedy[:greedy.index(greedy[3])]
    g1 = M.generate(model, prompt, 10, 1.0, 0.9, generator=torch.Generator().manual_seed(1))
    g2 = M.generate(model, prompt, 10, 1.0, 0.9, generator=torch.Generator().manual_seed(1))
    assert g1 == g2


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    draws = {M.sample_top_p(probs.clone(), 0.7, gen).item() for _ in range(200)}
    assert draws == {0, 1}      # 0.5 < 0.7, so the second token is needed; the third is not


def test_top_p_from_the_top_k_draws_what_a_full_sort_draws(monkeypatch):
    """sample_top_p sorts only the top NUCLEUS_CANDIDATES tokens when they hold more than p: the
    same draws as sorting the whole vocabulary, for peaked rows (top k enough) and flat ones (not)."""
    def full_sort(probs, p, generator):
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
        probs_sort[torch.cumsum(probs_sort, dim=-1) - probs_sort > p] = 0.0
        return probs_idx.gather(-1, M.sample_categorical(probs_sort, generator)[:, None])[:, 0]

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g)
    for scale in (8.0, 0.5):                    # peaked: the nucleus holds a few tokens; flat: hundreds
        probs = torch.softmax(logits * scale, dim=-1)
        fast = M.sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(1))
        assert torch.equal(fast, full_sort(probs.clone(), 0.9, torch.Generator().manual_seed(1)))
    sorts = []
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or torch.topk(a[0], a[0].shape[-1]))
    M.sample_top_p(torch.softmax(logits * 8.0, dim=-1), 0.9)
    assert not sorts                            # peaked rows never sort the whole vocabulary
    M.sample_top_p(torch.softmax(logits * 0.5, dim=-1), 0.9)
    assert sorts


def test_inverse_cdf_samples_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).repeat(40000, 1)
    draws = M.sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    # standard error of each frequency is at most 0.0025; 0.01 is four of them
    assert torch.allclose(freq, probs[0], atol=0.01), freq
    assert set(M.sample_top_p(probs[:50].clone(), 1.0).tolist()) <= {0, 1, 2, 3}


def test_a_token_of_probability_zero_is_never_drawn(monkeypatch):
    # unnormalised rows, zeros inside and at both ends (top-p leaves zeros at the end)
    probs = torch.tensor([0.0, 2.0, 0.0, 2.0, 0.0]).repeat(2000, 1)
    assert set(M.sample_categorical(probs, torch.Generator().manual_seed(0)).tolist()) == {1, 3}
    # u at the very top of its range: rounding could put it at the total, past the last token
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert M.sample_categorical(probs[:3]).tolist() == [3, 3, 3]


def test_our_checkpoint_round_trip(tmp_path):
    model = micro_model()
    M.save_model(model, tmp_path / "m.pt", step=3)
    loaded = M.Transformer.from_pretrained(tmp_path / "m.pt")
    tokens = torch.randint(0, MICRO.vocab_size, (2, 16))
    assert torch.equal(model(tokens), loaded(tokens))
    assert not (tmp_path / "m.pt.tmp").exists()


def mapped_from(path, tensor) -> bool:
    """Whether the tensor's memory lies in a mapping of the file (Linux's /proc/self/maps)."""
    ptr, target = tensor.data_ptr(), str(Path(path).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if rest and rest[-1] == target and start <= ptr < end:
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_our_checkpoints_load_memory_mapped(tmp_path):
    """A .pt model is read from the file's pages (shared by every process that loads it: FSDP's ranks),
    not copied whole into each process; a copy in another dtype is the model's own memory; training
    it leaves the file as it was."""
    model = micro_model()
    M.save_model(model, tmp_path / "m.pt", step=3)
    saved = (tmp_path / "m.pt").read_bytes()
    loaded = M.Transformer.from_pretrained(tmp_path / "m.pt")
    assert mapped_from(tmp_path / "m.pt", loaded.layers[0].attention.wq.weight)
    assert not mapped_from(tmp_path / "m.pt", M.Transformer.from_pretrained(tmp_path / "m.pt", dtype=torch.bfloat16)
                           .layers[0].attention.wq.weight)
    loaded.train()
    loaded(torch.randint(0, MICRO.vocab_size, (2, 8))).sum().backward()
    torch.optim.SGD(loaded.parameters(), lr=1.0).step()
    assert (tmp_path / "m.pt").read_bytes() == saved
    assert not torch.equal(loaded.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)


def test_a_lazy_load_reads_the_weights_a_part_at_a_time(tmp_path):
    """from_pretrained(lazy=True) leaves the model on the meta device, the weights in their files
    (Meta's split ones joined only when read); fill_from_state reads one block, then the rest, and
    the model is the one an eager load gives."""
    model = micro_model()
    M.save_meta(model, tmp_path, num_shards=2)
    lazy = M.Transformer.from_pretrained(tmp_path, lazy=True)
    state, dtype = lazy.pending
    assert all(p.is_meta for p in lazy.parameters()) and dtype == torch.float32
    assert isinstance(state["layers.0.attention.wq.weight"], M.Concat)
    assert state["layers.0.attention.wq.weight"].shape == model.layers[0].attention.wq.weight.shape
    M.fill_from_state(lazy.layers[1], *lazy.pending, prefix="layers.1.")
    assert not any(p.is_meta for p in lazy.layers[1].parameters())
    assert all(p.is_meta for p in lazy.layers[0].parameters()) and lazy.output.weight.is_meta
    M.fill_from_state(lazy, *lazy.pending)
    tokens = torch.randint(0, MICRO.vocab_size, (2, 16))
    assert torch.equal(lazy(tokens), M.Transformer.from_pretrained(tmp_path)(tokens))
    assert torch.equal(lazy(tokens), model(tokens))


def test_a_new_model_drawn_part_by_part_has_inits_weights():
    """on_meta leaves the weights undrawn; from the RNG state it saved, the default draws replayed
    and the parts drawn in the model's order (as 03's shard_model does under --fsdp), they are the
    weights __init__ draws from the same seed, whatever the RNG did in between."""
    torch.manual_seed(5)
    lazy = M.on_meta(M.Transformer, MICRO)
    torch.rand(100)   # the RNG moves on before the parts are drawn
    assert all(p.is_meta for p in lazy.parameters()) and lazy.pending[0] == "draw"
    torch.set_rng_state(lazy.pending[1])
    M.replay_default_draws(lazy)
    for part in [lazy.tok_embeddings, *lazy.layers, lazy.norm, lazy.output]:
        M.draw_weights(lazy, part)
        assert not any(p.is_meta for p in part.parameters())
    after = torch.rand(3)
    torch.manual_seed(5)
    eager = M.Transformer(MICRO)
    assert lazy.state_dict().keys() == eager.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(lazy.state_dict().values(), eager.state_dict().values()))
    assert torch.equal(torch.rand(3), after)   # the RNG left where building the model whole leaves it


@pytest.mark.parametrize("num_shards", [1, 2])
def test_meta_format_round_trip(tmp_path, num_shards):
    model = micro_model()
    M.save_meta(model, tmp_path, num_shards=num_shards)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == num_shards
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1                                 # as in Meta's released params.json
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = M.Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, MICRO.vocab_size, (2, 16))
    assert torch.equal(model(tokens), loaded(tokens))


def test_meta_export_params_open_with_metas_model_args(tmp_path):
    """Meta's Llama.build does ModelArgs(max_seq_len=..., max_batch_size=..., **params): the fields
    below are Llama 2's ModelArgs (llama/model.py); the old params.json (all our fields) failed here."""
    from dataclasses import dataclass
    from typing import Optional

    @dataclass
    class MetaModelArgs:
        dim: int = 4096
        n_layers: int = 32
        n_heads: int = 32
        n_kv_heads: Optional[int] = None
        vocab_size: int = -1
        multiple_of: int = 256
        ffn_dim_multiplier: Optional[float] = None
        norm_eps: float = 1e-5
        max_batch_size: int = 32
        max_seq_len: int = 2048
    model = micro_model()
    M.save_meta(model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    args = MetaModelArgs(max_seq_len=MICRO.max_seq_len, max_batch_size=4, **params)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == \
        (MICRO.dim, MICRO.n_layers, MICRO.n_heads, MICRO.n_kv_heads, MICRO.vocab_size)
    assert None not in params.values()
    tokens = torch.randint(0, MICRO.vocab_size, (2, 16))
    assert torch.equal(model(tokens), M.Transformer.from_pretrained(tmp_path)(tokens))


def test_forward_past_position_0_without_a_cache_is_an_error_not_wrong_logits():
    model, tokens = micro_model(), torch.randint(0, MICRO.vocab_size, (1, 8))
    with pytest.raises(UserError, match="call setup_cache"):
        model(tokens[:, 7:], start_pos=7)
    full = model(tokens)
    model.setup_cache(1, MICRO.max_seq_len)   # Meta's way: prefill, then one token at its position
    model(tokens[:, :7])
    assert torch.allclose(model(tokens[:, 7:], start_pos=7)[:, -1], full[:, -1], atol=1e-5)
    model.clear_cache()


def test_hf_format_round_trip(tmp_path):
    model = micro_model()
    M.save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["intermediate_size"] == M.ffn_hidden_dim(MICRO)
    loaded = M.Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, MICRO.vocab_size, (2, 16))
    assert torch.allclose(model(tokens), loaded(tokens), atol=1e-6)


def test_hf_permutation_turns_interleaved_rope_into_rotate_half():
    """HF rotates halves (x_i, x_{i+d/2}). With q/k rows permuted by permute_for_hf,
    HF's rotation gives Meta's rotated channels, reordered (even ones first):
    the same dot products, so the same attention."""
    head_dim, n_heads, dim = 8, 2, 16
    freqs = M.precompute_freqs_cis(head_dim, 10)
    wq = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(1, 10, dim)
    meta = M.apply_rotary_emb((x @ wq.T).view(1, 10, n_heads, head_dim), freqs)
    hf_q = (x @ M.permute_for_hf(wq, n_heads).T).view(1, 10, n_heads, head_dim)
    cos = torch.cat([freqs[0], freqs[0]], -1)   # (seq, 1, head_dim)
    sin = torch.cat([freqs[1], freqs[1]], -1)
    rotate_half = torch.cat([-hf_q[..., head_dim // 2:], hf_q[..., :head_dim // 2]], -1)
    hf = hf_q * cos + rotate_half * sin
    assert torch.allclose(hf, torch.cat([meta[..., 0::2], meta[..., 1::2]], -1), atol=1e-5)
    assert torch.equal(M.unpermute_from_hf(M.permute_for_hf(wq, n_heads), n_heads), wq)


def test_hf_config_finds_the_70b_ffn_rule():
    cfg = M.hf_config(M.PRESETS["70B"])
    assert cfg["intermediate_size"] == 28672
    back = M.args_from_hf_config(cfg)
    assert M.ffn_hidden_dim(back) == 28672 and back.n_kv_heads == 8


def test_transformers_loads_our_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = micro_model()
    M.save_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, MICRO.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)


def test_clear_errors_for_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not found"):
        M.Transformer.from_pretrained(tmp_path / "nope.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        M.Transformer.from_pretrained(tmp_path / "corrupt.pt")
    bigger = M.Transformer(replace(MICRO, dim=96))
    M.save_model(bigger, tmp_path / "big.pt")
    ckpt = torch.load(tmp_path / "big.pt", weights_only=True)
    ckpt["model_args"] = M.asdict(MICRO)                      # args say micro, weights say dim 96
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="shape"):
        M.Transformer.from_pretrained(tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="neither"):
        M.Transformer.from_pretrained(tmp_path)


def test_hostile_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model_args": {}, "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read"):
        M.load_checkpoint(tmp_path / "evil.pt")


def test_we_load_a_checkpoint_that_transformers_wrote(tmp_path):
    """The loader against an independent writer: a random LlamaForCausalLM (with GQA)
    saved by transformers, read by from_pretrained, must give the same logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=128, rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = M.Transformer.from_pretrained(tmp_path)
    assert ours.args.n_kv_heads == 2 and M.ffn_hidden_dim(ours.args) == 192
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf(tokens).logits, atol=1e-4)


def test_rope_table_stays_float32_in_bf16():
    model = micro_model().to(torch.bfloat16)
    tokens = torch.randint(0, MICRO.vocab_size, (1, 8))
    assert model(tokens).dtype == torch.float32
    assert model.freqs_cis.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the RoPE table moves only to another device")
def test_training_after_generating_on_a_gpu():
    # generate() runs under inference_mode, and its first forward moves the RoPE table to the
    # GPU: the table must still serve a training step afterwards (06 generates, then trains)
    model = micro_model().cuda()
    M.generate(model, [[1, 5, 9]], 4, temperature=0.0)
    loss = model(torch.randint(0, MICRO.vocab_size, (2, 8), device="cuda")).logsumexp(-1).mean()
    loss.backward()
    assert model.output.weight.grad is not None


def test_damaged_hf_folder_is_one_line(tmp_path):
    M.save_hf(micro_model(), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])              # a download cut short
    with pytest.raises(UserError, match="cannot read .*model.safetensors"):
        M.Transformer.from_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"hidden_size": 64,')   # not JSON
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        M.Transformer.from_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"hidden_size": 64}')   # JSON, but not a Llama config
    with pytest.raises(UserError, match="config.json lacks num_hidden_layers"):
        M.Transformer.from_pretrained(tmp_path / "hf")
    M.save_meta(micro_model(), tmp_path / "meta")
    (tmp_path / "meta" / "params.json").write_text("[1, 2")
    with pytest.raises(UserError, match="params.json is not valid JSON"):
        M.Transformer.from_pretrained(tmp_path / "meta")


def test_export_onto_a_file_and_a_failed_write_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    for flag in ("--export-hf", "--export-meta"):
        with pytest.raises(SystemExit) as e:
            M.run_cli(M.main, ["--preset", "micro", "--device", "cpu", flag, str(tmp_path / "taken")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "is a file" in err

    def full_disk(obj, path):   # what torch.save says when the disk fills up mid-write
        open(path, "wb").write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")
    monkeypatch.setattr(M.torch, "save", full_disk)
    with pytest.raises(UserError, match=r"cannot write m.pt in .*inline_container.*disk full"):
        M.save_model(micro_model(), tmp_path / "run" / "m.pt")
    monkeypatch.setattr(M.torch, "save", lambda obj, path: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(path))))
    with pytest.raises(UserError, match=r"cannot write m.pt in .*run: Permission denied"):
        M.save_model(micro_model(), tmp_path / "run" / "m.pt")
    assert list((tmp_path / "run").iterdir()) == []               # no .tmp left behind


def test_device_mps_without_mps_is_one_line(monkeypatch):
    monkeypatch.setattr(M.torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device mps: this machine has no Apple GPU"):
        M.pick_device("mps")


def test_numeric_flags_are_checked_where_parsed():
    for flag, bad in (("--max-new-tokens", "0"), ("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                      ("--temperature", "nan"), ("--max-new-tokens", "x")):
        with pytest.raises(UserError, match=f"^{flag} {bad}: "):
            M.main(["--preset", "micro", flag, bad])


# --- the tokenizer beside a checkpoint, and exports that open elsewhere as a whole (issue 17) ------

@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tokenizer with the micro model's vocabulary (512 pieces), trained here on part of a play."""
    tk = importlib.import_module("01_tokenizer")
    root = tmp_path_factory.mktemp("tok512")
    text = (tk.DEFAULT_CORPUS_DIR / "hamlet_gut.txt").read_text(encoding="utf-8")[:80_000]
    (root / "play.txt").write_text(text, encoding="utf-8")
    return tk.train_tokenizer([root / "play.txt"], root / "tokenizer", vocab_size=MICRO.vocab_size)


def test_prompt_without_a_tokenizer_is_one_line_naming_where_it_looked(tmp_path, capsys):
    M.save_meta(micro_model(), tmp_path / "llama-2-7b")          # no tokenizer.model anywhere
    with pytest.raises(SystemExit) as e:
        M.run_cli(M.main, ["--ckpt", str(tmp_path / "llama-2-7b"), "--prompt", "Hello", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --prompt needs a tokenizer") and err.count("\n") == 1
    assert str(tmp_path / "llama-2-7b" / "tokenizer.model") in err and str(tmp_path / "tokenizer.model") in err


def test_tokenizer_is_found_beside_a_meta_folder(tmp_path, tokenizer_path, capsys):
    """Meta's download puts tokenizer.model beside llama-2-7b/, not in it: the prompt must be encoded with
    it (the old code found none there and generated after BOS alone, printing ids under the prompt)."""
    tk = importlib.import_module("01_tokenizer")
    model = micro_model()
    M.save_meta(model, tmp_path / "llama-2-7b")
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    M.main(["--ckpt", str(tmp_path / "llama-2-7b"), "--prompt", "To be, or not", "--temperature", "0",
            "--max-new-tokens", "5", "--device", "cpu"])
    tokenizer = tk.Tokenizer(tokenizer_path)
    expected = M.generate(model, [tokenizer.encode("To be, or not", bos=True, eos=False)], 5, temperature=0.0)[0]
    assert f"> To be, or not\n{tokenizer.decode(expected)}\n" in capsys.readouterr().out


def test_generate_with_nothing_to_generate_says_so():
    with pytest.raises(UserError, match="max_gen_len 0: must be >= 1"):   # not "prompts must hold ..."
        M.generate(micro_model(), [[1, 5, 9]], 0)


def test_hf_config_reads_rope_theta_in_the_transformers_5_layout(tmp_path):
    """transformers 5 writes RoPE's base inside rope_parameters, with no top-level rope_theta; reading
    only the top level loaded this checkpoint with theta 10000, and wrong logits, silently."""
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in M.hf_config(MICRO).items() if k not in ("rope_theta", "rope_parameters")}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    assert M.args_from_hf_config(cfg).rope_theta == 500.0
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=128, rope_theta=500.0)).eval()
    hf.save_pretrained(tmp_path)
    ours = M.Transformer.from_pretrained(tmp_path)
    assert ours.args.rope_theta == 500.0
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf(tokens).logits, atol=1e-4)


def test_hf_config_refuses_rope_scaling_it_does_not_implement():
    base = M.hf_config(MICRO)
    for key, rope, kind in (("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
                            ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
                            ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama3")):
        with pytest.raises(UserError, match=f"^config.json: {key} asks for RoPE scaling '{kind}'"):
            M.args_from_hf_config({**base, key: rope})
    assert M.args_from_hf_config({**base, "rope_scaling": None}).rope_theta == MICRO.rope_theta   # Llama 2's own


def test_hf_export_opens_in_transformers_with_its_tokenizer(tmp_path, tokenizer_path):
    """--export-hf beside a tokenizer: AutoTokenizer gives our ids for a mixed text (digits, accents, CJK,
    an emoji, runs of spaces) and, through the chat template, encode_dialog's ids for a chat; the model
    gives our logits on them."""
    transformers = pytest.importorskip("transformers")
    tk, S = importlib.import_module("01_tokenizer"), importlib.import_module("04_sft")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    model = micro_model()
    M.save_model(model, tmp_path / "run" / "pretrain.pt")
    M.main(["--ckpt", str(tmp_path / "run" / "pretrain.pt"), "--export-hf", str(tmp_path / "hf")])
    ours = tk.Tokenizer(tokenizer_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "  In 2025, naïve Hamlet wrote 31 lines: 日本語 🦙\tdone."
    ids = ours.encode(text, bos=True, eos=False)
    assert theirs(text).input_ids == ids and theirs.decode(ids, skip_special_tokens=True) == text
    tokenizers = pytest.importorskip("tokenizers")      # tokenizer.json as written, as transformers 4 reads it
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(text).ids == ids
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "And 40 + 2? "}]
    chat_ids = theirs.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids == S.encode_dialog(ours, chat)[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for seq in (ids, chat_ids):
            tokens = torch.tensor([seq])
            assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)


def test_meta_export_carries_the_tokenizer(tmp_path, tokenizer_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    M.save_model(micro_model(), tmp_path / "run" / "pretrain.pt")
    M.main(["--ckpt", str(tmp_path / "run" / "pretrain.pt"), "--export-meta", str(tmp_path / "meta")])
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert f"--tokenizer_path {tmp_path / 'meta' / 'tokenizer.model'}" in capsys.readouterr().out
    M.main(["--ckpt", str(tmp_path / "meta"), "--prompt", "To be", "--max-new-tokens", "2"])   # found there
