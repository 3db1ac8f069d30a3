"""Runs from their files alone: checkpoints and compressed runs written by an older lorank
(format 1, tests/fixtures/v1) load and give the numbers they gave then; resume reads the run's
own settings and refuses only changes to the model or data, naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorank.cli import main
from lorank.compress import FixedLowRankTransition
from lorank.tasks import load_run
from lorank.train.checkpoint import CHECKPOINT_NAME, read_metadata

V1 = Path(__file__).resolve().parents[1] / "fixtures" / "v1"


def test_format_1_run_evaluates_as_it_did(capsys):
    """`lorank eval` of a run written at commit 244c6b3 reproduces that version's numbers."""
    want = json.loads((V1 / "lhmm_band" / "eval.json").read_text())
    assert main(["eval", str(V1 / "lhmm_band"), "--corpus", str(V1 / "corpus"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    for key in ("valid_ppl", "valid_nll", "test_ppl", "test_nll"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert (got["valid_tokens"], got["test_tokens"]) == (want["valid_tokens"],
                                                          want["test_tokens"])


def test_format_1_compressed_hmm_loads_with_its_transition():
    want = json.loads((V1 / "hmm_r2" / "log_partition.json").read_text())
    task, model, _ = load_run(V1 / "hmm_r2")
    assert isinstance(model.transition_net, FixedLowRankTransition) and model.rank == 2
    with torch.no_grad():
        got = model(torch.tensor(want["tokens"]), torch.tensor(want["lengths"])).log_partition
    torch.testing.assert_close(got, torch.tensor(want["log_partition"]), rtol=1e-6, atol=1e-5)


def _move_corpus(path: Path, corpus: Path) -> None:
    """Point a checkpoint's data_config at ``corpus`` (the fixture's was written elsewhere)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lorank"])
    meta["data_config"]["corpus"] = str(corpus)
    save_file(tensors, str(path), metadata={"lorank": json.dumps(meta)})


def test_format_1_checkpoint_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(V1 / "lhmm_band", run)
    for name in ("checkpoint.safetensors", "model.safetensors"):
        _move_corpus(run / name, V1 / "corpus")
    assert read_metadata(run / CHECKPOINT_NAME)["state"]["step"] == 2
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "3",
                 "--no-progress"]) == 0
    meta = read_metadata(run / CHECKPOINT_NAME)
    assert meta["state"]["step"] == 3 and meta["format_version"] == 2
    assert "lhmm_band: val ppl" in capsys.readouterr().out


def _train(corpus, out, *extra):
    return main(["train", "--corpus", str(corpus), "--model", "lhmm", "--states", "6", "--rank",
                 "2", "--hidden", "8", "--batch-size", "16", "--eval-every", "2",
                 "--no-progress", "--out", str(out), *extra])


def test_resume_reads_the_runs_own_settings(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_corpus, out, "--max-steps", "2") == 0
    # no model options repeated: the run's own settings are used, the new budget applies
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "4",
                 "--no-progress"]) == 0
    meta = read_metadata(out / CHECKPOINT_NAME)
    assert meta["state"]["step"] == 4 and meta["model_config"]["num_states"] == 6
    # compute-only options may change; options that change the model may not
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "5", "--no-progress",
                 "--threads", "1", "--no-memory-light"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", "--out", str(out), "--states", "8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "num_states=6 in the run, 8 given" in err
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--out", str(out), "--task", "music"])
    assert "it is a 'lm' run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--out", str(tmp_path / "nothing")])
    assert "no run to continue" in capsys.readouterr().err
