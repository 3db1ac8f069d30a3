"""Polyphonic music as 88-key binary piano rolls, from the corpora music21 ships.

``load_music(name)`` parses every score once (with a progress bar), samples it on a fixed grid,
transposes it to a common key signature, caches the rolls (safetensors, atomic) in the user
cache directory under a version key, and splits deterministically by piece:

* ``"bach"`` (aliases ``"jsb"``, ``"chorales"``): the 371 Riemenschneider chorales of
  ``music21.corpus.chorales.Iterator``, the four voices S, A, T, B only; quarter-note grid.
* ``"folk"`` (aliases ``"ryans"``, ``"ryansmammoth"``): Ryan's Mammoth Collection (1059 ABC
  tunes, melodies); eighth-note grid.
* ``"palestrina"``: the 1318 Palestrina mass movements in Humdrum; quarter-note grid.
* a directory: every ``.mxl .musicxml .xml .abc .krn .mid .midi`` file under it.

Piano-roll column ``j`` is MIDI pitch ``21 + j`` (A0 .. C8).  See ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorank._checks import check_positive_int
from lorank.data._batching import BatchIterator, padded_batches
from lorank.data._cache import cache_root, config_digest, file_lock, load_cache, save_cache

#: bump when parsing, quantization, transposition or splitting changes: caches rebuild
CACHE_VERSION = 1
LOWEST_MIDI = 21  # A0
NUM_KEYS = 88
SPLITS = ("train", "valid", "test")
#: fractions of pieces per split (by a hash of the piece id, so a piece's split never changes)
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SCORE_SUFFIXES = (".mxl", ".musicxml", ".xml", ".abc", ".krn", ".mid", ".midi")

_ALIASES = {
    "bach": "bach", "jsb": "bach", "chorales": "bach", "bach_chorales": "bach",
    "folk": "folk", "ryans": "folk", "ryansmammoth": "folk", "ryans_mammoth": "folk",
    "palestrina": "palestrina",
}
#: default grid (quarter lengths per time step) per corpus
DEFAULT_GRID = {"bach": 1.0, "folk": 0.5, "palestrina": 1.0, "directory": 0.5}
_EPS = 1e-6

__all__ = [
    "CACHE_VERSION",
    "MusicCorpus",
    "ScoreWarning",
    "load_music",
    "music_batches",
    "score_to_roll",
    "roll_to_notes",
    "parse_score",
    "transposition",
    "split_of",
]


class ScoreWarning(UserWarning):
    """A score was skipped (unreadable, empty, or without the expected voices)."""


class ScoreError(ValueError):
    """A score cannot be turned into a piano roll."""


def _music21():
    try:
        import music21  # noqa: PLC0415
    except ImportError as err:
        raise ModuleNotFoundError(
            "music corpora need the PyPI package music21 (its corpus ships the scores; nothing "
            "is downloaded at run time). Install it with:  pip install -c "
            "requirements/constraints.txt music21   or   pip install 'lorank[music]'"
        ) from err
    return music21


# --------------------------------------------------------------------------------------------
# one score -> one roll


def parse_score(source: str | os.PathLike, format: str | None = None):  # noqa: A002
    """Parse a score file (or, with ``format``, a string such as inline ABC) with music21,
    without reading or writing music21's pickle cache.  Raises :class:`ScoreError` naming the
    file on failure."""
    m21 = _music21()
    label = str(source) if format is None else f"<{format} string>"
    try:
        if format is None:
            path = Path(source)
            if not path.is_file():
                raise ScoreError(f"{path}: no such file")
            if path.stat().st_size == 0:
                raise ScoreError(f"{path}: empty file")
            return m21.converter.parse(path, forceSource=True)
        return m21.converter.parse(source, format=format, forceSource=True)
    except ScoreError:
        raise
    except Exception as err:  # music21 raises many kinds
        raise ScoreError(f"{label}: cannot parse score ({type(err).__name__}: {err})") from err


def transposition(score) -> int:
    """Semitones in [-6, 5] that move the score's first key signature to no sharps or flats
    (C major, or A minor for minor keys); music21's key analysis when the score has none."""
    m21 = _music21()
    sig = next(iter(score.recurse().getElementsByClass(m21.key.KeySignature)), None)
    if sig is None:
        try:
            sig = score.analyze("key")
        except Exception:  # no pitches to analyze
            return 0
    tonic_pc = (7 * int(sig.sharps)) % 12  # the major tonic of that signature
    return ((-tonic_pc + 6) % 12) - 6


_VOICES = ("soprano", "alto", "tenor", "bass")


def _satb_parts(score) -> list:
    """The four vocal parts of a chorale: parts named soprano/alto/tenor/bass (extra
    instrumental parts dropped), or all parts when there are exactly four."""
    parts = list(score.parts)
    chosen = []
    for voice in _VOICES:
        for p in parts:
            name = (p.partName or "") + " " + (p.getInstrument().instrumentName or "")
            if voice in name.lower() and p not in chosen:
                chosen.append(p)
                break
    if len(chosen) == 4:
        return chosen
    if len(parts) == 4:
        return parts
    names = [p.partName for p in parts]
    raise ScoreError(f"expected the four voices S, A, T, B; found {len(parts)} parts {names}")


def score_to_roll(
    score, grid: float = 1.0, transpose: bool = True, *, satb: bool = False
) -> torch.Tensor:
    """A (T, 88) bool piano roll: ``roll[t, p - 21]`` is True when MIDI pitch ``p`` sounds at
    time ``t * grid`` (quarter lengths from the start of the piece).

    Sampling: a note ``[onset, onset + duration)`` covers the grid points inside it, so a note
    shorter than the grid that covers no grid point is dropped, and a repeated note merges with
    its neighbour (binary rolls have no onsets).  Pickups are aligned so grid points fall on the
    beat; grace notes and chord symbols are ignored; ties need no special care.  Leading and
    trailing silent steps are trimmed.  ``transpose`` shifts all pitches by
    :func:`transposition`; pitches outside A0..C8 are moved by octaves into range.  ``satb``
    keeps only the four voices of a chorale.  Raises :class:`ScoreError` for a score with no
    notes."""
    m21 = _music21()
    if not grid > 0:
        raise ValueError(f"grid must be > 0 quarter lengths, got {grid!r}")
    if isinstance(score, m21.stream.Opus):
        raise ScoreError("an Opus holds several scores; convert each one")
    parts = _satb_parts(score) if satb else (list(score.parts) or [score])
    shift = transposition(score) if transpose else 0

    events: list[tuple[float, float, int]] = []
    end_time = 0.0
    for part in parts:
        first = next(iter(part.recurse().getElementsByClass(m21.stream.Measure)), None)
        pad = float(first.paddingLeft) if first is not None else 0.0
        align = pad % grid
        flat = part.flatten()
        end_time = max(end_time, float(flat.highestTime) + align)
        for el in flat.notes:
            if isinstance(el, m21.harmony.Harmony) or el.duration.isGrace:
                continue
            dur = float(el.quarterLength)
            if dur <= 0:
                continue
            on = float(el.offset) + align
            for p in el.pitches:
                events.append((on, on + dur, int(round(p.ps)) + shift))
    if not events:
        raise ScoreError("score has no notes")

    steps = max(1, math.ceil(end_time / grid - _EPS))
    roll = np.zeros((steps, NUM_KEYS), dtype=bool)
    for on, off, midi in events:
        lo = math.ceil(on / grid - _EPS)
        hi = min(math.ceil(off / grid - _EPS), steps)
        if hi <= lo:
            continue
        while midi < LOWEST_MIDI:
            midi += 12
        while midi >= LOWEST_MIDI + NUM_KEYS:
            midi -= 12
        roll[lo:hi, midi - LOWEST_MIDI] = True
    active = np.flatnonzero(roll.any(1))
    if active.size == 0:
        raise ScoreError(f"no note covers a grid point (grid={grid} quarter lengths)")
    return torch.from_numpy(roll[active[0] : active[-1] + 1].copy())


def roll_to_notes(roll: torch.Tensor, grid: float = 1.0) -> list[tuple[int, float, float]]:
    """The notes of a roll as ``(midi, onset, duration)`` in quarter lengths, sorted by onset
    then pitch; consecutive active steps of a key make one note."""
    r = torch.as_tensor(roll).bool()
    notes = []
    for key in range(r.shape[1]):
        col = r[:, key].tolist()
        t = 0
        while t < len(col):
            if col[t]:
                s = t
                while t < len(col) and col[t]:
                    t += 1
                notes.append((LOWEST_MIDI + key, s * grid, (t - s) * grid))
            else:
                t += 1
    return sorted(notes, key=lambda n: (n[1], n[0]))


# --------------------------------------------------------------------------------------------
# corpora


def split_of(piece_id: str) -> str:
    """The split of a piece: by a SHA-256 hash of its id, so it never depends on which other
    pieces are loaded."""
    u = int.from_bytes(hashlib.sha256(piece_id.encode()).digest()[:8], "big") / 2.0**64
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "valid"
    return "test"


def _corpus_files(name: str) -> list[tuple[str, str]]:
    """(piece id, path) for a built-in corpus, sorted by id."""
    m21 = _music21()
    corpus = m21.corpus
    out = []
    if name == "bach":
        for work in corpus.chorales.Iterator(returnType="filename"):
            paths = corpus.getWork(work)
            paths = paths if isinstance(paths, list) else [paths]
            best = sorted(paths, key=lambda p: (Path(p).suffix != ".mxl", str(p)))[0]
            out.append((str(work), str(best)))
    elif name == "folk":
        for p in corpus.getWork("ryansMammoth"):
            out.append((f"ryansMammoth/{Path(p).stem}", str(p)))
    elif name == "palestrina":
        for p in corpus.getComposer("palestrina"):
            out.append((f"palestrina/{Path(p).stem}", str(p)))
    else:  # pragma: no cover
        raise ValueError(name)
    if not out:
        raise FileNotFoundError(
            f"music21 {m21.__version__} ships no scores for corpus {name!r}; reinstall music21"
        )
    return sorted(out)


def _directory_files(path: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SCORE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no score files ({' '.join(SCORE_SUFFIXES)}) under {str(path)!r}")
    return [(p.relative_to(path).as_posix(), str(p)) for p in files]


def _parse_file(
    job: tuple[str, str, float, bool, bool],
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Worker: one file -> [(piece id, uint8 roll)], [warning messages]."""
    piece_id, path, grid, transpose, satb = job
    m21 = _music21()
    try:
        parsed = parse_score(path)
        scores = list(parsed.scores) if isinstance(parsed, m21.stream.Opus) else [parsed]
    except Exception as err:
        return [], [f"skipping {path}: {err}"]
    out, msgs = [], []
    for i, sc in enumerate(scores):
        sid = piece_id if len(scores) == 1 else f"{piece_id}#{i}"
        try:
            roll = score_to_roll(sc, grid, transpose, satb=satb)
            out.append((sid, roll.numpy().astype(np.uint8)))
        except Exception as err:
            where = path if len(scores) == 1 else f"{path} (score {i})"
            msgs.append(f"skipping {where}: {err}")
    return out, msgs


@dataclass(eq=False)
class MusicCorpus:
    """Piano rolls split by piece.  ``train``/``valid``/``test``: lists of (T, 88) bool
    tensors; ``ids[split]``: the matching piece ids."""

    name: str
    grid: float
    transpose: bool
    train: list[torch.Tensor]
    valid: list[torch.Tensor]
    test: list[torch.Tensor]
    ids: dict[str, list[str]]
    skipped: list[str] = field(default_factory=list)
    cache_path: Path | None = None

    def rolls(self, split: str) -> list[torch.Tensor]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per split: pieces, time steps, mean/max steps per piece, mean notes per step."""
        out = {}
        for s in SPLITS:
            rolls = self.rolls(s)
            steps = sum(r.shape[0] for r in rolls)
            notes = sum(int(r.sum()) for r in rolls)
            out[s] = {
                "pieces": len(rolls),
                "time_steps": steps,
                "mean_steps": steps / max(len(rolls), 1),
                "max_steps": max((r.shape[0] for r in rolls), default=0),
                "notes_per_step": notes / max(steps, 1),
            }
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.rolls(s))}" for s in SPLITS)
        return f"MusicCorpus({self.name!r}, grid={self.grid}, pieces: {sizes})"


def _quotas(n: int) -> dict[str, int]:
    if n < 3:
        return {"train": n, "valid": 0, "test": 0}
    v = max(1, round(n * SPLIT_FRACTIONS[1]))
    t = max(1, round(n * SPLIT_FRACTIONS[2]))
    return {"train": n - v - t, "valid": v, "test": t}


def load_music(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    grid: float | None = None,
    max_pieces: int | None = None,
    *,
    transpose: bool = True,
    num_workers: int | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> MusicCorpus:
    """Load a music corpus (``"bach"``, ``"folk"``, ``"palestrina"`` or a directory of scores).

    ``grid``: quarter lengths per time step (default: quarter note for bach and palestrina,
    eighth note for folk and directories).  ``max_pieces``: parse only this many pieces (the
    first ones by id in each split, ~70/15/15), for tests and quick runs.  ``transpose``: move
    every piece to the key signature without sharps or flats.  The result is cached under
    ``cache_root(cache_dir) / "music"`` (``$LORANK_CACHE``, ``$XDG_CACHE_HOME/lorank`` or
    ``~/.cache/lorank``), keyed by :data:`CACHE_VERSION` and the arguments; ``rebuild`` forces a
    fresh parse.  ``num_workers`` parallelizes the first parse (default: up to 8 processes for
    large corpora)."""
    key = str(name)
    path = Path(key).expanduser()
    if key.lower() in _ALIASES:
        cname = _ALIASES[key.lower()]
        files_fn = lambda: _corpus_files(cname)  # noqa: E731
        source: object = cname
        satb = cname == "bach"
    elif path.is_dir():
        cname = "directory"
        files_fn = lambda: _directory_files(path)  # noqa: E731
        source = str(path.resolve())
        satb = False
    else:
        raise FileNotFoundError(
            f"unknown music corpus {key!r}: not one of {sorted(set(_ALIASES.values()))} "
            f"(aliases {sorted(_ALIASES)}) and not a directory of score files"
        )
    grid = float(DEFAULT_GRID[cname] if grid is None else grid)
    if not grid > 0:
        raise ValueError(f"grid must be > 0 quarter lengths, got {grid!r}")
    if max_pieces is not None:
        check_positive_int("max_pieces", max_pieces)

    m21 = _music21()
    files = files_fn()
    config = {
        "source": source,
        "grid": grid,
        "transpose": bool(transpose),
        "max_pieces": max_pieces,
        "music21": m21.__version__,
        "split_fractions": list(SPLIT_FRACTIONS),
    }
    if cname == "directory":  # a changed file changes the key
        config["files"] = [[pid, os.stat(p).st_size, os.stat(p).st_mtime_ns] for pid, p in files]
    label = Path(str(source)).name if cname == "directory" else cname
    stem = f"{label}_g{grid:g}_{'t' if transpose else 'o'}_v{CACHE_VERSION}_{config_digest(config)}"
    cache_path = cache_root(cache_dir) / "music" / f"{stem}.safetensors"
    expect = {"cache_version": CACHE_VERSION, "config": config}

    with file_lock(cache_path):
        hit = None if rebuild else load_cache(cache_path, expect)
        if hit is None:
            tensors, meta = _build(files, grid, transpose, satb, max_pieces, num_workers, progress)
            if not meta["pieces"]:
                raise ValueError(
                    f"no usable piece in music corpus {key!r} ({len(meta['skipped'])} skipped)"
                )
            save_cache(cache_path, tensors, {**expect, **meta})
        else:
            tensors, meta = hit
    return _corpus_from_tensors(label, grid, transpose, tensors, meta, cache_path)


def _build(files, grid, transpose, satb, max_pieces, num_workers, progress):
    from tqdm.auto import tqdm  # noqa: PLC0415

    results: list[tuple[str, np.ndarray]] = []
    skipped: list[str] = []

    def record(res: list[tuple[str, np.ndarray]], msgs: list[str]) -> None:
        results.extend(res)
        for m in msgs:
            warnings.warn(m, ScoreWarning, stacklevel=4)
            skipped.append(m)

    if max_pieces is not None:  # parse in id order until each split's quota is filled
        quota = _quotas(max_pieces)
        by_split = {s: [f for f in files if split_of(f[0]) == s] for s in SPLITS}
        bar = tqdm(total=max_pieces, desc="parsing scores", disable=not progress)
        for s in SPLITS:
            got = 0
            for pid, p in by_split[s]:
                if got >= quota[s]:
                    break
                res, msgs = _parse_file((pid, p, grid, transpose, satb))
                res = res[: quota[s] - got]
                got += len(res)
                bar.update(len(res))
                record(res, msgs)
        bar.close()
    else:
        jobs = [(pid, p, grid, transpose, satb) for pid, p in files]
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1) if len(jobs) >= 64 else 1
        bar = tqdm(total=len(jobs), desc="parsing scores", disable=not progress)
        if num_workers <= 1:
            for job in jobs:
                record(*_parse_file(job))
                bar.update(1)
        else:
            import multiprocessing as mp  # noqa: PLC0415

            # fork where available: spawn would re-import the caller's __main__ in each worker
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(num_workers, mp_context=mp.get_context(method)) as ex:
                for res, msgs in ex.map(_parse_file, jobs, chunksize=8):
                    record(res, msgs)
                    bar.update(1)
        bar.close()

    results.sort(key=lambda r: r[0])
    pieces = [[pid, split_of(pid.split("#")[0])] for pid, _ in results]
    lengths = torch.tensor([r.shape[0] for _, r in results], dtype=torch.long)
    rolls = (
        torch.from_numpy(np.concatenate([r for _, r in results]))
        if results
        else torch.zeros(0, NUM_KEYS, dtype=torch.uint8)
    )
    return {"rolls": rolls, "lengths": lengths}, {"pieces": pieces, "skipped": skipped}


def _corpus_from_tensors(name, grid, transpose, tensors, meta, cache_path) -> MusicCorpus:
    lengths = tensors["lengths"].tolist()
    rolls = torch.split(tensors["rolls"].bool(), lengths) if lengths else []
    out: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    for (pid, split), roll in zip(meta["pieces"], rolls, strict=True):
        out[split].append(roll)
        ids[split].append(pid)
    return MusicCorpus(
        name=name,
        grid=grid,
        transpose=transpose,
        train=out["train"],
        valid=out["valid"],
        test=out["test"],
        ids=ids,
        skipped=list(meta.get("skipped", [])),
        cache_path=cache_path,
    )


# --------------------------------------------------------------------------------------------
# batching


def music_batches(
    rolls: Sequence[torch.Tensor],
    batch_size: int,
    *,
    max_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
    return_indices: bool = False,
    **order,
) -> BatchIterator:
    """Padded batches of pieces of similar length: yields ``(rolls (B, T, 88) of dtype,
    zero-padded, lengths (B,) LongTensor)`` (and ``indices (B,)`` with ``return_indices``).

    ``batch_size`` caps pieces per batch, ``max_steps`` optionally caps ``pieces x longest``.
    ``order``: ``shuffle``, ``seed`` (deterministic), ``rank``/``world_size`` (sharding), as in
    :func:`lorank.data.text.sentence_batches`."""
    return padded_batches(rolls, batch_size, max_tokens=max_steps, fill=0, dtype=dtype,
                          return_indices=return_indices, **order)
