"""
01 Tokenizer: Llama 2 paper (arXiv 2307.09288) Sec. 2.2, "Tokenizer".

Llama 2 keeps Llama 1's tokenizer: byte-pair encoding (BPE) as implemented by SentencePiece,
32,000 pieces, numbers split into single digits, and unknown UTF-8 characters broken into bytes.
This script trains such a tokenizer, with the settings stored inside Meta's tokenizer.model, on
a small public-domain corpus (42 Shakespeare texts in data/shakespeare/), then shows:
  * the vocabulary (3 specials + 256 byte pieces + learned pieces) and the training time,
  * bytes per token on held-out plays that training never saw (every 20th file, ~5%),
  * a sample sentence cut into pieces: digits one by one, an emoji as four <0xNN> bytes,
  * a short pure-Python BPE encoder (PurePythonBPE) that gives exactly SentencePiece's ids.
The model goes to runs/toy/tokenizer.model; later scripts load it with this file's Tokenizer.

On a 2-core CPU the default run takes seconds; README gives the bytes per token it measured
(more with --vocab-size 32000: a larger vocabulary has longer pieces). No GPU or torchrun is
needed for this chapter. Run:
  python 01_tokenizer.py                                       # toy vocabulary of 4096 pieces
  python 01_tokenizer.py --vocab-size 32000 --input my/*.txt   # the paper's size, your text
  python 01_tokenizer.py --model tokenizer.model               # inspect Meta's model (writes nothing;
                                                               # its download puts it beside llama-2-7b/)
"""
import argparse
import errno
import heapq
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import sentencepiece as spm

# ---------------------------------------------------------------------------------------------
# Shared CLI helpers. Every later script imports these; they live here, in the first script.
REPO = Path(__file__).resolve().parent
DEFAULT_RUN_DIR = REPO / "runs" / "toy"


class UserError(Exception):
    """A mistake the user can fix (missing file, bad value, malformed data line): shown as one line, no traceback."""


# Failures of the machine, not of the code: a full disk, a read-only or forbidden folder.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_cli(main, argv=None):
    """Call main(argv); a UserError becomes 'error: <message>' on stderr and exit code 2 (no traceback).
    So does a full disk or an unwritable folder, wherever it strikes. Ctrl-C exits with 130 and one
    line: where it stopped and how to go on, when the code raising it knew (03's train() does)."""
    sys.stdout.reconfigure(line_buffering=True)   # progress lines show up at once, even through a pipe
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted (Ctrl-C){': ' + str(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(130)


def number_flag(flag: str, kind=int, at_least=None, above=None, at_most=None, below=None):
    """An argparse type for a numeric flag, checked where it is parsed: a bad value is one line
    naming the flag before any work is done, not a traceback after the data is prepared."""
    rules = [(at_least, lambda v, b: v >= b, ">="), (above, lambda v, b: v > b, ">"),
             (at_most, lambda v, b: v <= b, "<="), (below, lambda v, b: v < b, "<")]

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise UserError(f"{flag} {text}: not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not -math.inf < value < math.inf:   # nan, inf
            raise UserError(f"{flag} {text}: not a finite number")
        wanted = " and ".join(f"{sign} {bound:g}" for bound, ok, sign in rules if bound is not None)
        if any(bound is not None and not ok(value, bound) for bound, ok, sign in rules):
            raise UserError(f"{flag} {text}: must be {wanted}")
        return value
    return parse


def atomic_write_text(path, text):
    """Write via path + '.tmp' then os.replace, so a crash never leaves half a file behind
    (nor the .tmp: a full disk takes it away again). Bytes are written as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# A list of numbers, booleans or one-word strings (a curve, a score per evaluation prompt) on one
# line: indent=2 would give each item a line of its own, thousands in a stage's JSON. JSON
# strings hold no raw newline, so "[" + newline only ever opens a list.
_WORD = r'(?:-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null|NaN|-?Infinity|"[^"\\\s]{0,40}")'
_FLAT_LIST = re.compile(rf"\[\n\s*({_WORD}(?:,\n\s*{_WORD})*)\n\s*\]")


def write_json(path, obj):
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    text = _FLAT_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    atomic_write_text(path, text + "\n")


# ---------------------------------------------------------------------------------------------
# Settings. The SentencePiece options are the trainer_spec stored inside Meta's tokenizer.model.
DEFAULT_CORPUS_DIR = REPO / "data" / "shakespeare"
DEFAULT_VOCAB_SIZE = 4096  # toy size for a 5 MB corpus; the paper uses 32000 (Sec. 2.2)
HOLD_OUT_EVERY = 20        # every 20th document (sorted by path) is held out, ~5% of the corpus
SAMPLE_TEXT = "Hello world, 2025! To be, or not to be 🦙"
LLAMA_SPM_SETTINGS = dict(
    model_type="bpe",                    # Sec. 2.2: BPE, SentencePiece's implementation
    byte_fallback=True,                  # Sec. 2.2: unknown UTF-8 -> bytes (256 <0xNN> pieces), never <unk>
    split_digits=True,                   # Sec. 2.2: numbers split into single digits (2025 -> 2 0 2 5)
    normalization_rule_name="identity",  # no Unicode (NFKC) normalisation: the model sees the text as typed
    add_dummy_prefix=True,               # prepend a space: 'world' at the start is '▁world' as mid-sentence
    remove_extra_whitespaces=False,      # keep runs of spaces and indentation (code, verse)...
    allow_whitespace_only_pieces=True,   # ...and let them become pieces such as '▁▁▁▁'
    unk_id=0, bos_id=1, eos_id=2,        # Meta's ids: <unk>=0, <s>=1 (BOS), </s>=2 (EOS)
    pad_id=-1,                           # no pad piece in Meta's model either
    character_coverage=0.99995,          # chars covering 99.995% of the text get pieces; the rest: bytes
    max_sentencepiece_length=16,         # longest piece, in characters
    split_by_unicode_script=True,        # a piece never mixes scripts (Latin + CJK)...
    split_by_whitespace=True,            # ...nor spans two words ('▁' only at its start, or all '▁')...
    split_by_number=True,                # ...nor mixes letters and digits
    max_sentence_length=4192,            # Meta's value, in bytes: longer lines are skipped in training
                                         # (train_tokenizer counts them and says so: SentencePiece only logs it)
    input_sentence_size=1_000_000,       # at most 1M lines, a seeded random sample if more (Meta: 200M)
    shuffle_input_sentence=True,
    # Not one of Meta's settings: Shakespeare writes numbers in words, so at this coverage most
    # digits would get no piece (Meta's corpus is full of them). The toy world of chapters 03-07
    # is arithmetic and lists, so every printable ASCII character gets a piece of its own.
    required_chars="".join(chr(c) for c in range(33, 127)),
)


def check_inputs(paths):
    if not paths:
        raise UserError(f"no input files: pass --input FILE... (the default is {DEFAULT_CORPUS_DIR}/*.txt)")
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"input file not found: {path}")
        if Path(path).stat().st_size == 0:
            raise UserError(f"input file is empty: {path}")


def sentencepiece_version() -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", spm.__version__)[:3])


def chars_present(paths, wanted: str) -> str:
    """The characters of `wanted` that occur in the files, in wanted's order."""
    missing, found = set(wanted), set()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                found |= missing.intersection(line)
                missing -= found
                if not missing:
                    return wanted
    return "".join(c for c in wanted if c in found)


def count_long_lines(paths, max_bytes: int) -> int:
    """Lines SentencePiece's trainer skips: longer than max_sentence_length. It reads each line
    without its newline and compares its size in bytes, not characters (trainer_interface.cc)."""
    count = 0
    for path in paths:
        with open(path, "rb") as f:
            count += sum(len(line.rstrip(b"\n")) > max_bytes for line in f)
    return count


def split_held_out(paths):
    """Hold out every 20th document (sorted order, from the 11th) for measuring bytes per token;
    with fewer than 11 documents, hold out the last one (if there are at least two)."""
    paths = sorted(paths)
    held_out = paths[HOLD_OUT_EVERY // 2::HOLD_OUT_EVERY]
    if not held_out and len(paths) > 1:
        held_out = paths[-1:]
    return [p for p in paths if p not in held_out], held_out


def read_document(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text: {path} (byte {e.start}: {e.reason})") from None


def train_tokenizer(inputs, model_prefix, vocab_size=DEFAULT_VOCAB_SIZE, seed=0, log=print):
    """Train SentencePiece BPE with Llama's settings; writes model_prefix.model and .vocab atomically.
    Lines longer than max_sentence_length are left out of training, as with Meta's settings; SentencePiece
    only logs that (at a level we silence), so it is counted and said here."""
    check_inputs(inputs)
    if vocab_size <= 3 + 256:
        raise UserError(f"--vocab-size {vocab_size} leaves no room to learn: Llama's layout already "
                        "uses 3 specials + 256 byte pieces")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = model_prefix.with_name(model_prefix.name + ".tmp")
    settings = dict(LLAMA_SPM_SETTINGS)
    if sentencepiece_version() < (0, 2, 3):
        # Before 0.2.3, a required character that the corpus lacks kills the whole process (a failed
        # C++ check, "freq > 0", not an exception): ask only for the ones the corpus has
        settings["required_chars"] = chars_present(inputs, settings["required_chars"])
    spm.set_random_generator_seed(seed)  # makes the line sampling (input_sentence_size) repeatable
    try:
        spm.SentencePieceTrainer.train(
            input=[str(p) for p in inputs], model_prefix=str(tmp_prefix), vocab_size=vocab_size,
            num_threads=os.cpu_count(), minloglevel=2, **settings)  # quiet; errors still raise
    except RuntimeError as e:  # SentencePiece's failed checks: say the common ones in plain words
        if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e)):
            raise UserError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at least "
                            f"{m[1]} (3 specials + 256 bytes + {int(m[1]) - 259} characters)") from None
        if m := re.search(r"Vocabulary size too high.*<= (\d+)", str(e)):
            raise UserError(f"--vocab-size {vocab_size} is too large for this corpus: BPE can find at "
                            f"most {m[1]} pieces in it") from None
        raise UserError(f"SentencePiece training failed: {' '.join(str(e).split())}") from None
    for suffix in (".model", ".vocab"):
        os.replace(f"{tmp_prefix}{suffix}", f"{model_prefix}{suffix}")
    limit = settings["max_sentence_length"]
    if skipped := count_long_lines(inputs, limit):
        log(f"note: {skipped:,} line{'s' * (skipped > 1)} longer than {limit} bytes (max_sentence_length, Meta's "
            "value) left out of training; break long paragraphs into lines to use them")
    return Path(f"{model_prefix}.model")


class Tokenizer:
    """Meta's llama/tokenizer.py interface over any SentencePiece model (ours, or Meta's 32000 pieces)."""

    def __init__(self, model_path):
        if not Path(model_path).is_file():
            raise UserError(f"tokenizer model not found: {model_path}")
        try:
            self.sp_model = spm.SentencePieceProcessor(model_file=str(model_path))
        except RuntimeError as e:  # e.g. 'could not parse ModelProto'
            raise UserError(f"not a SentencePiece model: {model_path} ({e})") from None
        self.n_words = self.sp_model.vocab_size()
        self.bos_id, self.eos_id = self.sp_model.bos_id(), self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()  # -1 in Llama: there is no pad piece

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):   # Meta asserts type(s) is str; sentencepiece would take a list and nest
            raise UserError(f"Tokenizer.encode takes one string, not {type(s).__name__}: encode each text alone")
        ids = self.sp_model.encode(s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp_model.decode(list(ids))  # drops the dummy-prefix space at the start

    def id_to_piece(self, i) -> str:
        return self.sp_model.id_to_piece(i)


class PurePythonBPE:
    """SentencePiece's BPE encoder (bpe_model.cc) in plain Python, to read; encode() never calls
    sentencepiece. Covers Llama's piece types (normal, byte, control, unknown); the rare
    'user-defined' and 'unused' types would need the extra steps in bpe_model.cc."""

    def __init__(self, tokenizer):
        sp = tokenizer.sp_model
        self.unk_id, self.score, self.piece_id, self.byte_id = sp.unk_id(), {}, {}, {}
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):  # '<0x41>' stands for byte 0x41
                self.byte_id[int(piece[1:-1], 16)] = i
            elif not (sp.is_control(i) or sp.is_unknown(i)):  # merging never produces <s>, </s>, <unk>
                self.piece_id[piece], self.score[piece] = i, sp.get_score(i)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        # 1. Normalise like Llama: no Unicode normalisation, a dummy-prefix space, and every space
        #    made visible as '▁', so a word carries its leading space inside its piece ('▁world').
        #    Tabs and newlines stay as they are (in Llama's model, '\n' is the byte piece <0x0A>).
        # 2. Start from single characters (not bytes), kept in a doubly linked list so that
        #    merging two neighbours is O(1).
        symbols = list("▁" + text.replace(" ", "▁"))
        prev, next_ = list(range(-1, len(symbols) - 1)), list(range(1, len(symbols) + 1))
        next_[-1] = -1
        # 3. A heap of candidate merges: every adjacent pair whose concatenation is a vocabulary
        #    piece. Best score first (in a trained BPE model: the merge learned earliest), and on a
        #    tie the leftmost pair, as in SentencePiece's priority queue ('aaa' -> 'aa' 'a', not 'a' 'aa').
        heap = []

        def push(left, right):
            if left >= 0 and right >= 0 and (merged := symbols[left] + symbols[right]) in self.score:
                heapq.heappush(heap, (-self.score[merged], left, right, merged))

        for i in range(len(symbols) - 1):
            push(i, i + 1)
        # 4. Apply the best merge until none is left. An entry is stale if a neighbour merged
        #    first (one side is now empty or longer): skip it. The merged pair's neighbours
        #    form new candidates. Pairs of whitespace ('▁▁') merge like any other pair, so the
        #    text cannot simply be cut at '▁' first.
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not (symbols[left] and symbols[right] and symbols[left] + symbols[right] == merged):
                continue
            symbols[left], symbols[right] = merged, ""
            next_[left] = next_[right]
            if next_[right] >= 0:
                prev[next_[right]] = left
            push(prev[left], left)
            push(left, next_[left])
        # 5. Pieces -> ids. A symbol outside the vocabulary (a character too rare to get its own
        #    piece) becomes its UTF-8 bytes (byte fallback, Sec. 2.2); a model without byte
        #    pieces emits a single <unk> for a run of unknown pieces, as SentencePiece does.
        ids = []
        for piece in filter(None, symbols):
            if piece in self.piece_id:
                ids.append(self.piece_id[piece])
            elif self.byte_id:
                ids.extend(self.byte_id[b] for b in piece.encode("utf-8"))
            elif not ids or ids[-1] != self.unk_id:
                ids.append(self.unk_id)
        return ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files, one "
                        "document each (default: data/shakespeare/*.txt); every 20th is held out of training")
    parser.add_argument("--vocab-size", type=number_flag("--vocab-size", at_least=1), default=DEFAULT_VOCAB_SIZE,
                        metavar="N",
                        help=f"pieces in the vocabulary (default {DEFAULT_VOCAB_SIZE}, a toy size; "
                        "up to 32000, the paper's value)")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                        help="writes DIR/tokenizer.model and DIR/tokenizer.json (default runs/toy)")
    parser.add_argument("--model", type=Path, metavar="PATH", help="skip training and inspect this "
                        "SentencePiece model, e.g. Meta's tokenizer.model (writes nothing)")
    parser.add_argument("--sample", default=SAMPLE_TEXT, metavar="TEXT", help="text to show cut into pieces")
    args = parser.parse_args(argv)

    files = sorted(args.input or DEFAULT_CORPUS_DIR.glob("*.txt"))
    check_inputs(files)
    texts = {path: read_document(path) for path in files}  # fail on non-UTF-8 input before training
    train_files, held_out = split_held_out(files)
    model_path, train_seconds = args.model, None
    if not args.model:
        print(f"training BPE, vocab {args.vocab_size}, on {len(train_files)} files "
              f"({sum(len(texts[p].encode()) for p in train_files) / 1e6:.2f} MB) ...")
        t0 = time.perf_counter()
        model_path = train_tokenizer(train_files, args.run_dir / "tokenizer", args.vocab_size)
        train_seconds = round(time.perf_counter() - t0, 3)
    tok = Tokenizer(model_path)
    sp = tok.sp_model

    # The vocabulary: 3 specials, 256 bytes, then the learned pieces; the best score is the earliest merge.
    n_bytes = sum(sp.is_byte(i) for i in range(tok.n_words))
    n_special = sum(sp.is_control(i) or sp.is_unknown(i) for i in range(tok.n_words))
    learned = [i for i in range(tok.n_words) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    by_score = sorted(learned, key=sp.get_score, reverse=True)
    first_merges = [piece for piece in map(tok.id_to_piece, by_score) if len(piece) > 1][:12]
    print(f"model            : {model_path}")
    print(f"vocab size       : {tok.n_words} = {n_special} specials + {n_bytes} byte pieces + "
          f"{len(learned)} learned; bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}")
    if train_seconds is not None:
        print(f"train time       : {train_seconds:.2f} s on {os.cpu_count()} CPU threads")
    print(f"first merges     : {' '.join(first_merges)}")

    # Bytes per token on text training never saw: how much text one token carries. Higher means
    # shorter sequences, so more text per step of the model and per token of context.
    eval_files = held_out or files
    t0 = time.perf_counter()
    eval_ids = [tok.encode(texts[p], bos=False, eos=False) for p in eval_files]
    spm_seconds = time.perf_counter() - t0
    eval_bytes, eval_tokens = sum(len(texts[p].encode()) for p in eval_files), sum(map(len, eval_ids))
    bytes_per_token = eval_bytes / max(eval_tokens, 1)
    where = "held-out" if held_out else "training (none held out)"
    print(f"bytes per token  : {bytes_per_token:.3f} on {where} text {', '.join(p.name for p in eval_files)} "
          f"({eval_bytes:,} bytes -> {eval_tokens:,} tokens)")

    ids = tok.encode(args.sample, bos=True, eos=False)
    round_trip = "exact" if tok.decode(ids) == args.sample else "NOT exact"
    print(f"sample           : {args.sample!r}\n  pieces         : {' '.join(map(tok.id_to_piece, ids))}")
    print(f"  ids            : {ids}\n  decode(ids)    : {tok.decode(ids)!r} (round trip {round_trip})")
    no_piece = [c for c in dict.fromkeys(args.sample) if c != " " and sp.piece_to_id(c) == sp.unk_id()]
    if no_piece:  # byte fallback at work: characters below character_coverage have no piece of their own
        print(f"  byte fallback  : no piece for {' '.join(map(repr, no_piece))}: spelled as bytes <0xNN>")

    t0 = time.perf_counter()
    bpe = PurePythonBPE(tok)
    agrees = bpe.encode(args.sample) == ids[1:] and all(
        bpe.encode(texts[p]) == expected for p, expected in zip(eval_files, eval_ids))
    print(f"pure-Python BPE  : {'agrees with' if agrees else 'DISAGREES with'} sentencepiece on all "
          f"{eval_tokens:,} tokens ({time.perf_counter() - t0:.2f} s; sentencepiece {spm_seconds:.2f} s)")

    metrics = dict(
        model=str(model_path), vocab_size=tok.n_words, n_special=n_special, n_byte_pieces=n_bytes,
        n_learned=len(learned), train_seconds=train_seconds, bytes_per_token=round(bytes_per_token, 4),
        eval_bytes=eval_bytes, eval_tokens=eval_tokens, held_out_files=[p.name for p in held_out],
        train_files=[p.name for p in train_files], pure_python_agrees=agrees, sample=args.sample,
        sample_pieces=[tok.id_to_piece(i) for i in ids], settings=LLAMA_SPM_SETTINGS, args=vars(args))
    if not args.model:
        write_json(args.run_dir / "tokenizer.json", metrics)
        print(f"wrote            : {args.run_dir / 'tokenizer.model'}, {args.run_dir / 'tokenizer.json'}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
