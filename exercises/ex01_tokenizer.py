"""Exercises for chapter 01 (paper Sec. 2.2, "Tokenizer"). Check with:
    python exercises/check.py bpe_encode
"""
import _setup  # noqa: F401  (puts the repository root on sys.path)


def bpe_encode(self, text: str) -> list[int]:
    """SentencePiece's BPE encoding of `text`, in plain Python: the body of 01's PurePythonBPE.encode.
    The checker binds it as a method of a PurePythonBPE, so `self` holds the vocabulary:
      self.score[piece]    -> the piece's score (higher = learned earlier = merged first)
      self.piece_id[piece] -> its id;  self.byte_id[b] -> id of the byte piece <0xNN> for byte b
      self.unk_id          -> <unk>, for a model without byte pieces
    Paper: Sec. 2.2, BPE as in SentencePiece, digits split, unknown UTF-8 falls back to bytes.
    Steps: '▁' + text with every ' ' replaced by '▁'; start from single characters; repeatedly
    merge the adjacent pair whose concatenation is a piece with the best score (on a tie, the
    leftmost pair); then map pieces to ids, a piece outside the vocabulary becoming its UTF-8
    bytes. "" -> [].
    Shapes: str -> list of int ids, exactly tok.encode(text, bos=False, eos=False).
    Hint: a heap of (-score, left, right, merged) candidates, and skip a popped entry that is stale
    (one side already merged into something else): 'aaa' must give 'aa' 'a', not 'a' 'aa'."""
    raise NotImplementedError
