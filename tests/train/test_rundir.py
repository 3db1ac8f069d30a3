"""Run directories: one writer at a time, orphaned temporaries removed, readable file modes,
and clear errors for damaged checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lorank._io import atomic_write_json
from lorank.train.checkpoint import load_checkpoint, read_metadata
from lorank.train.rundir import RunLock, remove_orphans


def test_a_second_writer_fails_fast(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        # another process trying the same directory is refused at once, naming the holder
        code = textwrap.dedent(f"""
            from lorank.train.rundir import RunLock
            try:
                RunLock({str(run)!r}).acquire()
            except FileExistsError as e:
                print(e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60).stdout
        assert f"pid {os.getpid()}" in out and "is writing to" in out
        with pytest.raises(FileExistsError, match="another lorank process"):
            RunLock(run).acquire()  # a second lock in this process too
    RunLock(run).acquire().release()  # free again once released


def test_orphaned_temporaries_are_removed(tmp_path):
    keep = ["model.safetensors", "metrics.json", ".lock", "notes.tmp"]
    orphans = [".checkpoint.safetensors.k3j_x9a2.tmp", ".tmpAb12Cd", ".metrics.json.q1w2e3r4.tmp"]
    for name in keep + orphans:
        (tmp_path / name).write_bytes(b"x")
    assert remove_orphans(tmp_path) == sorted(orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_files_get_the_usual_mode(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x10\x00\x00\x00\x00\x00\x00\x00{"])
def test_damaged_checkpoints_name_the_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors.*not a readable checkpoint"):
        read_metadata(path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)
