"""Tests for 01_tokenizer.py: Llama's SentencePiece settings, Meta's Tokenizer interface, and a
pure-Python BPE encoder that must give exactly SentencePiece's ids. No network: the tokenizer is
trained inside the tests on a slice of the bundled corpus (about a second)."""
import importlib
import json
import random
import re
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
tk = importlib.import_module("01_tokenizer")

CORPUS = sorted((tk.REPO / "data" / "shakespeare").glob("*.txt"))
VOCAB = 800


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small Llama-style tokenizer: 3 plays plus a file of numbers, so digits are common enough
    that BPE would merge them into '12', '2025', ... if split_digits did not forbid it."""
    d = tmp_path_factory.mktemp("tok")
    numbers = d / "numbers.txt"
    numbers.write_text("\n".join(f"In 1599, act {i} had {i * 12345} lines and 2025 words." for i in range(400)))
    return tk.Tokenizer(tk.train_tokenizer(CORPUS[:3] + [numbers], d / "tokenizer", vocab_size=VOCAB))


@pytest.fixture(scope="module")
def bpe(tok):
    return tk.PurePythonBPE(tok)


def pieces(tok, text):
    return [tok.id_to_piece(i) for i in tok.encode(text, bos=False, eos=False)]


def corpus_chunks():
    """Slices of a play the fixture never trained on, plus whitespace the text has in runs."""
    text = (tk.REPO / "data" / "shakespeare" / "hamlet_gut.txt").read_text(encoding="utf-8")
    rng = random.Random(0)
    chunks = [text[i:i + rng.randrange(1, 2000)] for i in (rng.randrange(len(text)) for _ in range(300))]
    chunks += [" " * n + "the" + " " * m for n in range(12) for m in range(3)]
    chunks += ["\t\tindented\tby tabs", "two\n\nlines\n", "\r\nwindows\r\n", "    verse,\n    indented"]
    chunks += ["aaaa", "eeee e", "ssss  sss", "\n" * 5]  # repeated pairs: ties go to the leftmost
    return chunks


def random_unicode(n, seed):
    rng = random.Random(seed)
    ranges = [(32, 127), (0x80, 0x3000), (0x1F300, 0x1FAFF), (0, 0x110000)]  # ASCII, scripts, emoji, anything
    codepoints = (rng.randrange(*rng.choice(ranges)) for _ in range(n))
    return "".join(chr(c) if not 0xD800 <= c < 0xE000 else " " for c in codepoints)  # no lone surrogates


UNICODE = [
    "🦙", "🦙🦙 llamas", "👩‍👩‍👧 family (zero-width joiners)", "日本語のテキスト", "中文分词测试",
    "مرحبا بالعالم",
    "cafe\u0301 n\u0303 (combining accents)", "\x00\x07\x1b[31mred\x1b[0m", "12345", "version 3.14159 in 2025",
    "mixed: abc123def ½ ² ⅷ", " ", "  ", "\t", "\n", "x", "Ω ≈ ç √ ∫",
    "ẞ ß ǅ ﬁ (no NFKC: ligatures stay)",
    random_unicode(3000, seed=1), random_unicode(500, seed=2),
]


def test_pure_python_bpe_matches_sentencepiece_on_corpus_text(tok, bpe):
    for text in corpus_chunks():
        assert bpe.encode(text) == tok.encode(text, bos=False, eos=False), repr(text[:80])


def test_pure_python_bpe_matches_sentencepiece_on_unicode(tok, bpe):
    for text in UNICODE + ["", "a▁b", "▁"]:
        assert bpe.encode(text) == tok.encode(text, bos=False, eos=False), repr(text[:80])


def test_round_trip_is_lossless(tok):
    # Byte fallback means nothing is lost; decode drops the one space the dummy prefix added.
    for text in corpus_chunks() + UNICODE:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text, repr(text[:80])


def test_dummy_prefix_and_whitespace_are_kept(tok):
    assert "".join(pieces(tok, "hello")) == "▁hello"       # the dummy prefix
    assert "".join(pieces(tok, " hello")) == "▁▁hello"     # a real leading space is kept too
    assert "".join(pieces(tok, "a   b")) == "▁a▁▁▁b"       # runs of spaces are not collapsed
    assert tok.decode(tok.encode(" hello", bos=False, eos=False)) == " hello"
    # A literal '▁' (U+2581) in the input is indistinguishable from a space: the one lossy case.
    assert tok.decode(tok.encode("a▁b", bos=False, eos=False)) == "a b"


def test_special_ids_and_vocab_layout(tok):
    assert (tok.sp_model.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [tok.id_to_piece(i) for i in (3, 3 + 0x0A, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]  # bytes at 3..258
    assert tok.n_words == VOCAB == tok.sp_model.get_piece_size()
    body = tok.encode("to be", bos=False, eos=False)
    assert tok.encode("to be", bos=True, eos=False) == [1] + body
    assert tok.encode("to be", bos=True, eos=True) == [1] + body + [2]
    assert tok.decode([1] + body + [2]) == "to be"


def test_numbers_are_split_into_single_digits(tok):
    assert [p for p in pieces(tok, "12345") if p != "▁"] == ["1", "2", "3", "4", "5"]
    assert [p for p in pieces(tok, "in 2025.") if p.isdigit()] == ["2", "0", "2", "5"]


def test_emoji_falls_back_to_utf8_bytes(tok):
    ids = tok.encode("🦙", bos=False, eos=False)
    assert ids[-4:] == [3 + b for b in "🦙".encode("utf-8")]  # <0xNN> sits at id 3 + NN
    assert [tok.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert 0 not in tok.encode(random_unicode(2000, seed=3), bos=False, eos=False)  # never <unk>


def test_without_byte_fallback_a_run_of_unknowns_is_one_unk(tmp_path):
    settings = dict(tk.LLAMA_SPM_SETTINGS, byte_fallback=False)
    spm.SentencePieceTrainer.train(input=str(CORPUS[0]), model_prefix=str(tmp_path / "m"), vocab_size=300,
                                   minloglevel=2, **settings)
    tok = tk.Tokenizer(tmp_path / "m.model")
    bpe = tk.PurePythonBPE(tok)
    assert pieces(tok, "a😀😀b").count("<unk>") == 1   # the run is merged...
    assert pieces(tok, "a😀 😀b").count("<unk>") == 2  # ...but not across a known piece
    for text in UNICODE + corpus_chunks()[:50]:
        assert bpe.encode(text) == tok.encode(text, bos=False, eos=False), repr(text[:80])


def test_training_is_deterministic(tmp_path):
    a = tk.Tokenizer(tk.train_tokenizer(CORPUS[:2], tmp_path / "a", vocab_size=500))
    b = tk.Tokenizer(tk.train_tokenizer(CORPUS[:2], tmp_path / "b", vocab_size=500))
    assert [a.id_to_piece(i) for i in range(500)] == [b.id_to_piece(i) for i in range(500)]
    # Written atomically: no .tmp files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "a.vocab", "b.model", "b.vocab"]


def test_held_out_split():
    train, held = tk.split_held_out(CORPUS)
    assert [p.name for p in held] == [CORPUS[10].name, CORPUS[30].name]  # every 20th, ~5%
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(CORPUS)
    assert tk.split_held_out(CORPUS[:3]) == (CORPUS[:2], CORPUS[2:3])
    assert tk.split_held_out(CORPUS[:1]) == (CORPUS[:1], [])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(tk.UserError, match="not found"):
        tk.Tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_text("definitely not a protobuf")
    with pytest.raises(tk.UserError, match="not a SentencePiece model"):
        tk.Tokenizer(garbage)


def test_training_errors(tmp_path):
    with pytest.raises(tk.UserError, match="missing.txt"):
        tk.train_tokenizer([CORPUS[0], tmp_path / "missing.txt"], tmp_path / "m")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(tk.UserError, match="empty.txt"):
        tk.train_tokenizer([tmp_path / "empty.txt"], tmp_path / "m")
    with pytest.raises(tk.UserError, match="too small"):
        tk.train_tokenizer(CORPUS[:1], tmp_path / "m", vocab_size=300)  # < 259 + the play's characters
    with pytest.raises(tk.UserError, match="no room"):
        tk.train_tokenizer(CORPUS[:1], tmp_path / "m", vocab_size=100)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("to be or not to be\n" * 20)
    with pytest.raises(tk.UserError, match="too large"):
        tk.train_tokenizer([tiny], tmp_path / "m", vocab_size=4096)
    assert not list(tmp_path.glob("m*"))  # a failed run leaves no model behind


def test_run_cli_turns_user_error_into_exit_2(capsys):
    def broken(argv):
        raise tk.UserError("input file not found: x.txt")

    with pytest.raises(SystemExit) as exit_info:
        tk.run_cli(broken, [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: input file not found: x.txt\n"
    assert tk.run_cli(lambda argv: 42, []) == 42


def test_main_reports_missing_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tk.run_cli(tk.main, ["--input", str(tmp_path / "nope.txt"), "--run-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "nope.txt" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_atomic_write_json(tmp_path):
    path = tmp_path / "deep" / "dir" / "m.json"
    tk.write_json(path, {"a": 1, "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "path": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_main_end_to_end(tmp_path, capsys):
    docs = []
    for i, src in enumerate(CORPUS[:3]):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(src.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    run_dir = tmp_path / "run"
    metrics = tk.main(["--input", *map(str, docs), "--vocab-size", "400", "--run-dir", str(run_dir)])
    saved = json.loads((run_dir / "tokenizer.json").read_text())
    assert saved["vocab_size"] == 400 == tk.Tokenizer(run_dir / "tokenizer.model").n_words
    assert saved["held_out_files"] == ["doc2.txt"] and saved["train_files"] == ["doc0.txt", "doc1.txt"]
    assert 1.0 < saved["bytes_per_token"] == metrics["bytes_per_token"]
    assert saved["train_seconds"] > 0 and saved["pure_python_agrees"] is True
    out = capsys.readouterr().out
    assert "bytes per token" in out and "agrees with" in out
    # --model only inspects: it writes nothing.
    (run_dir / "tokenizer.json").unlink()
    tk.main(["--input", *map(str, docs), "--model", str(run_dir / "tokenizer.model"),
             "--run-dir", str(run_dir)])
    assert sorted(p.name for p in run_dir.iterdir()) == ["tokenizer.model", "tokenizer.vocab"]


def test_before_sentencepiece_0_2_3_only_present_characters_are_required(tmp_path, monkeypatch):
    """SentencePiece < 0.2.3 aborts the process on a required character the corpus lacks, so
    then train_tokenizer asks only for those present; from 0.2.3, every printable ASCII one."""
    corpus = tmp_path / "plain.txt"
    text = CORPUS[0].read_text(encoding="utf-8")[:60_000].replace("{", "").replace("~", "")
    corpus.write_text(text + "\n42 lines\n", encoding="utf-8")
    assert tk.chars_present([corpus], "a{t~4") == "at4"
    vocabs = {}
    for version in ("0.2.2", spm.__version__):
        monkeypatch.setattr(tk.spm, "__version__", version)
        model = tk.Tokenizer(tk.train_tokenizer([corpus], tmp_path / version, vocab_size=500))
        vocabs[version] = {model.id_to_piece(i) for i in range(model.n_words)}
    assert "{" not in vocabs["0.2.2"] and "4" in vocabs["0.2.2"]
    if tk.sentencepiece_version() >= (0, 2, 3):   # the version requirements.txt pins
        assert "{" in vocabs[spm.__version__]


def test_run_cli_full_disk_and_ctrl_c_are_one_line(capsys):
    import errno

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/toy/data/x.bin")

    with pytest.raises(SystemExit) as exit_info:
        tk.run_cli(full, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: runs/toy/data/x.bin: No space left on device\n"

    def interrupted(argv):
        raise KeyboardInterrupt("stopped during step 38 of 670; runs/toy/pretrain.pt holds step 20: continue with --resume")

    with pytest.raises(SystemExit) as exit_info:
        tk.run_cli(interrupted, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == ("interrupted (Ctrl-C): stopped during step 38 of 670; runs/toy/pretrain.pt "
                                               "holds step 20: continue with --resume")
    with pytest.raises(FileNotFoundError):   # not a disk failure: a bug to see whole
        tk.run_cli(lambda argv: open("/nonexistent/x"), [])


def test_failed_write_leaves_no_tmp(tmp_path, monkeypatch):
    def full(self, text, encoding=None):
        open(self, "w").write(text[:3])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tk.Path, "write_text", full)
    with pytest.raises(OSError):
        tk.write_json(tmp_path / "m.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_vocab_size_flag_is_checked_where_parsed(tmp_path):
    with pytest.raises(tk.UserError, match="^--vocab-size 0: must be >= 1"):
        tk.main(["--vocab-size", "0", "--run-dir", str(tmp_path)])


def test_encode_takes_one_string(tok):
    """Meta's encode asserts a str; sentencepiece alone takes a list and returns a list of lists."""
    with pytest.raises(tk.UserError, match="^Tokenizer.encode takes one string, not list"):
        tok.encode(["to be", "or not"], bos=True, eos=False)


def test_lines_too_long_to_train_on_are_counted_and_said(tmp_path, capfd):
    """SentencePiece leaves lines longer than max_sentence_length (bytes) out of training and only logs
    it. Our count must be SentencePiece's own, read from its log at full verbosity."""
    limit = tk.LLAMA_SPM_SETTINGS["max_sentence_length"]
    text = CORPUS[0].read_text(encoding="utf-8")[:30_000]
    long_lines = ["x" * limit,               # exactly the limit: kept
                  "y" * (limit + 1),         # one byte over
                  "日" * (limit // 3 + 1),    # fewer characters than the limit, more bytes
                  ("a paragraph on one line. " * 400).strip()]
    corpus = tmp_path / "long.txt"
    corpus.write_text(text + "\n" + "\n".join(long_lines) + "\n", encoding="utf-8")
    said = []
    tk.train_tokenizer([corpus], tmp_path / "m", vocab_size=400, log=said.append)
    assert len(said) == 1 and said[0].startswith(f"note: 3 lines longer than {limit} bytes")
    capfd.readouterr()
    settings = {k: v for k, v in tk.LLAMA_SPM_SETTINGS.items() if k != "required_chars"}   # (< 0.2.3 aborts)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=400,
                                   minloglevel=0, **settings)
    skipped = re.search(r"Skipped (\d+) too long sentences", capfd.readouterr().err)
    assert skipped and said[0].startswith(f"note: {skipped[1]} lines")
    said.clear()
    tk.train_tokenizer(CORPUS[:1], tmp_path / "short", vocab_size=400, log=said.append)
    assert said == []                       # nothing skipped, nothing said
