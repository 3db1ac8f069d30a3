"""lorank.data.music: piano rolls, transposition, cache, splits, bad scores, batching."""

from __future__ import annotations

import warnings

import pytest
import torch

music21 = pytest.importorskip("music21")

from lorank.data import music  # noqa: E402
from lorank.data.music import (  # noqa: E402
    ScoreWarning,
    load_music,
    music_batches,
    parse_score,
    roll_to_notes,
    score_to_roll,
    split_of,
    transposition,
)

TUNE = "X:1\nT:{title}\nM:4/4\nL:1/8\nK:{key}\n{notes}|]\n"


def _write_tunes(folder, n: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    bodies = ["CDEF GABc", "cBAG FEDC", "C2E2 G2c2", "EFGA B2c2", "G4 E4", "c8"]
    for i in range(n):
        text = TUNE.format(title=f"t{i}", key="C", notes=bodies[i % len(bodies)] + f"|D{i % 3 + 1}")
        (folder / f"tune{i:02d}.abc").write_text(text)


def _known_score():
    """C4 quarter, E4 half, quarter rest, G4+B4 dotted quarter, D5 eighth (4/4, C major)."""
    s = music21.stream.Score()
    p = music21.stream.Part()
    m1 = music21.stream.Measure(number=1)
    m1.append(music21.meter.TimeSignature("4/4"))
    m1.append(music21.key.Key("C"))
    m1.append(music21.note.Note("C4", quarterLength=1.0))
    m1.append(music21.note.Note("E4", quarterLength=2.0))
    m1.append(music21.note.Rest(quarterLength=1.0))
    m2 = music21.stream.Measure(number=2)
    m2.append(music21.chord.Chord(["G4", "B4"], quarterLength=1.5))
    m2.append(music21.note.Note("D5", quarterLength=0.5))
    m2.append(music21.note.Rest(quarterLength=2.0))
    p.append([m1, m2])
    s.insert(0, p)
    return s


# ---- one score -----------------------------------------------------------------------------


def test_roll_round_trip_known_score():
    roll = score_to_roll(_known_score(), grid=0.5, transpose=True)
    assert roll.dtype == torch.bool and roll.shape == (12, 88)  # trailing rest trimmed
    assert roll_to_notes(roll, 0.5) == [
        (60, 0.0, 1.0),  # C4 quarter
        (64, 1.0, 2.0),  # E4 half
        (67, 4.0, 1.5),  # G4 dotted quarter (after the quarter rest)
        (71, 4.0, 1.5),  # B4
        (74, 5.5, 0.5),  # D5 eighth
    ]
    assert not roll[6:8].any()  # the rest
    assert roll[:, 60 - 21].tolist()[:3] == [True, True, False]


def test_quarter_grid_samples_on_the_beat():
    roll = score_to_roll(_known_score(), grid=1.0)
    # the eighth D5 at 5.5 covers no quarter-note grid point and disappears
    assert roll_to_notes(roll, 1.0) == [(60, 0.0, 1.0), (64, 1.0, 2.0), (67, 4.0, 2.0),
                                        (71, 4.0, 2.0)]


def test_abc_transposition_and_pickup():
    s = parse_score(TUNE.format(title="g", key="G", notes="G2A2 B2c2|d8"), format="abc")
    assert transposition(s) == 5  # G major -> C major, up a fourth
    assert roll_to_notes(score_to_roll(s, 1.0), 1.0) == [
        (72, 0.0, 1.0), (74, 1.0, 1.0), (76, 2.0, 1.0), (77, 3.0, 1.0), (79, 4.0, 4.0),
    ]
    assert roll_to_notes(score_to_roll(s, 1.0, transpose=False), 1.0)[0] == (67, 0.0, 1.0)
    # an eighth-note pickup: on a quarter grid the beats stay on the barline
    up = parse_score(TUNE.format(title="p", key="C", notes="G|c2d2e2f2|g8"), format="abc")
    assert roll_to_notes(score_to_roll(up, 1.0), 1.0)[0] == (72, 0.0, 1.0)
    assert roll_to_notes(score_to_roll(up, 0.5), 0.5)[:2] == [(67, 0.0, 0.5), (72, 0.5, 1.0)]


def test_empty_and_bad_scores_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.abc"
    empty.write_text("")
    with pytest.raises(music.ScoreError, match="empty.abc: empty file"):
        parse_score(empty)
    rests = parse_score(TUNE.format(title="r", key="C", notes="z8"), format="abc")
    with pytest.raises(music.ScoreError, match="no notes"):
        score_to_roll(rests)


# ---- corpora, cache, splits ----------------------------------------------------------------


def test_directory_corpus_skips_bad_files_with_warnings(tmp_path):
    src = tmp_path / "scores"
    _write_tunes(src, 6)
    (src / "broken.mxl").write_bytes(b"this is not a zip file")
    (src / "empty.abc").write_text("")
    (src / "rests.abc").write_text(TUNE.format(title="r", key="C", notes="z8"))
    with pytest.warns(ScoreWarning) as rec:
        corpus = load_music(str(src), cache_dir=tmp_path / "cache", progress=False)
    msgs = " | ".join(str(w.message) for w in rec)
    for bad in ("broken.mxl", "empty.abc", "rests.abc"):
        assert bad in msgs
    assert len(corpus.skipped) == 3
    all_ids = [i for s in ("train", "valid", "test") for i in corpus.ids[s]]
    assert sorted(all_ids) == [f"tune{i:02d}.abc" for i in range(6)]
    for split in ("train", "valid", "test"):
        for pid, roll in zip(corpus.ids[split], corpus.rolls(split), strict=True):
            assert split_of(pid) == split
            assert roll.dtype == torch.bool and roll.shape[1] == 88


def test_nothing_usable_is_an_error(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "empty.abc").write_text("")
    with pytest.warns(ScoreWarning), pytest.raises(ValueError, match="no usable piece"):
        load_music(str(src), cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="no score files"):
        load_music(str(tmp_path / "cache"), cache_dir=tmp_path / "c2", progress=False)
    with pytest.raises(FileNotFoundError, match="unknown music corpus"):
        load_music("no-such-corpus", cache_dir=tmp_path, progress=False)


def test_cache_reused_and_rebuilt_on_version_change(tmp_path, monkeypatch):
    src = tmp_path / "scores"
    _write_tunes(src, 4)
    calls = []
    real = music._parse_file
    monkeypatch.setattr(music, "_parse_file", lambda job: calls.append(job[0]) or real(job))
    cache = tmp_path / "cache"

    first = load_music(str(src), cache_dir=cache, progress=False)
    assert len(calls) == 4 and first.cache_path.is_file()
    assert first.cache_path.parent == cache / "music"
    assert first.cache_path.suffix == ".safetensors"

    calls.clear()
    again = load_music(str(src), cache_dir=cache, progress=False)
    assert calls == []  # reused
    for split in ("train", "valid", "test"):
        assert again.ids[split] == first.ids[split]
        assert all(
            torch.equal(a, b) for a, b in zip(again.rolls(split), first.rolls(split), strict=True)
        )

    monkeypatch.setattr(music, "CACHE_VERSION", music.CACHE_VERSION + 1)
    rebuilt = load_music(str(src), cache_dir=cache, progress=False)
    assert len(calls) == 4  # version changed: parsed again, into a new file
    assert rebuilt.cache_path != first.cache_path

    calls.clear()
    rebuilt.cache_path.write_bytes(b"garbage")  # a corrupted cache is rebuilt, with a warning
    with pytest.warns(UserWarning, match="unreadable cache"):
        load_music(str(src), cache_dir=cache, progress=False)
    assert len(calls) == 4

    calls.clear()
    load_music(str(src), cache_dir=cache, grid=0.25, progress=False)  # other grid, other file
    assert len(calls) == 4


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from lorank.data._cache import cache_root

    monkeypatch.delenv("LORANK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorank"
    monkeypatch.setenv("LORANK_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    src = tmp_path / "scores"
    _write_tunes(src, 3)
    corpus = load_music(str(src), progress=False)
    assert corpus.cache_path.parent == tmp_path / "env" / "music"


def test_split_by_piece_is_stable_and_disjoint():
    ids = [f"piece{i}" for i in range(2000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "valid", "test")}
    assert abs(frac["train"] - 0.70) < 0.04 and abs(frac["valid"] - 0.15) < 0.03


def test_bach_chorales_small(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScoreWarning)
        corpus = load_music("bach", cache_dir=tmp_path, max_pieces=5, progress=False)
    sizes = {s: len(corpus.rolls(s)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 3, "valid": 1, "test": 1}
    ids = [set(corpus.ids[s]) for s in ("train", "valid", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for s in ("train", "valid", "test"):
        for pid, roll in zip(corpus.ids[s], corpus.rolls(s), strict=True):
            assert pid.startswith("bach/bwv") and split_of(pid) == s
            assert roll.shape[1] == 88 and 8 <= roll.shape[0] <= 400
            assert int(roll.sum(1).max()) <= 4  # four voices, one note each per step
    st = corpus.stats()
    assert st["train"]["pieces"] == 3 and 2.5 < st["train"]["notes_per_step"] <= 4


# ---- batching ------------------------------------------------------------------------------


def test_music_batches_permutation_and_sharding():
    g = torch.Generator().manual_seed(0)
    rolls = [torch.rand(int(t), 88, generator=g) < 0.05 for t in torch.randint(3, 30, (23,))]
    seen = []
    for batch, lengths, idx in music_batches(rolls, 4, shuffle=True, seed=1, return_indices=True):
        assert batch.dtype == torch.float32 and batch.shape == (len(idx), int(lengths.max()), 88)
        for row, i in enumerate(idx.tolist()):
            assert torch.equal(batch[row, : lengths[row]].bool(), rolls[i])
            assert not batch[row, lengths[row] :].any()
        seen += idx.tolist()
    assert sorted(seen) == list(range(23))
    shares = [
        [i for *_, idx in music_batches(rolls, 4, shuffle=True, seed=1, rank=r, world_size=3,
                                        return_indices=True) for i in idx.tolist()]
        for r in range(3)
    ]
    assert sorted(sum(shares, [])) == list(range(23))
