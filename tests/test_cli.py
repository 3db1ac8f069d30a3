"""The ``lorank`` command line: clear errors, train -> eval -> sample, the main job."""

import json
import random
import subprocess
import sys

import pytest
import torch

from lorank.cli import main


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for split, n in (("train", 60), ("valid", 12), ("test", 12)):
        lines = [" ".join(f"w{(g + i) % 3 * 4 + rng.randrange(4)}"
                          for i in range(rng.randint(2, 7)))
                 for g in (rng.randrange(3) for _ in range(n))]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_unknown_model(corpus, capsys):
    err = _error(["train", "--corpus", str(corpus), "--model", "transformer"], capsys)
    assert "unknown model 'transformer'" in err and "hmm, lhmm, lhmm_band, rank_space" in err


def test_rank_larger_than_states(corpus, capsys):
    err = _error(["train", "--corpus", str(corpus), "--model", "lhmm", "--states", "16",
                  "--rank", "64"], capsys)
    assert "rank (64) must be at most the number of states (16)" in err


def test_missing_corpus(tmp_path, capsys):
    err = _error(["train", "--corpus", str(tmp_path / "nope"), "--model", "lhmm"], capsys)
    assert "corpus" in err and "not found" in err and "train.txt" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(["train", "--corpus", str(empty), "--model", "lhmm", "--out",
                  str(tmp_path / "o")], capsys)
    assert "lacks train.txt, valid.txt, test.txt" in err


def test_other_usage_errors(corpus, tmp_path, capsys):
    err = _error(["train", "--corpus", str(corpus), "--model", "lhmm", "--band", "2"], capsys)
    assert "band applies to model 'lhmm_band' only" in err
    err = _error(["train", "--corpus", str(corpus), "--model", "hmm", "--rank", "2"], capsys)
    assert "rank applies to low-rank models" in err
    err = _error(["train", "--task", "nope"], capsys)
    assert "invalid choice: 'nope'" in err
    err = _error(["train", "--model", "lhmm", "--states", "0"], capsys)
    assert "states must be a positive integer" in err
    err = _error(["eval", str(tmp_path / "missing.safetensors")], capsys)
    assert "does not exist" in err


def test_train_eval_sample(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--corpus", str(corpus), "--model", "lhmm_band", "--states", "6", "--rank",
            "2", "--band", "1", "--hidden", "8", "--batch-size", "16", "--max-steps", "3",
            "--eval-every", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "lhmm_band: val ppl" in text and "test ppl" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "lhmm_band" and m["band"] == 1 and m["steps"] == 3

    assert main(["eval", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["valid_ppl"] == pytest.approx(m["val_ppl"], rel=1e-5)
    assert r["test_ppl"] == pytest.approx(m["test_ppl"], rel=1e-5)

    assert main(["sample", str(out / "model.safetensors"), "--num", "3", "--max-length",
                 "6"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 3 and all(w.startswith("w") or w in ("<eos>", "<unk>")
                                   for line in lines for w in line.split())

    # --resume continues a run; training it again without a flag is refused
    assert main(argv[:-2] + ["--max-steps", "4", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    capsys.readouterr()
    assert "pass --resume" in _error(argv, capsys)


def test_main_job_prints_the_comparison(corpus, tmp_path, capsys):
    out = tmp_path / "main"
    assert main(["train", "--corpus", str(corpus), "--states", "6", "--rank", "2", "--hidden",
                 "8", "--max-steps", "2", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("unigram (add-k", "bigram (add-k", "| hmm", "| lhmm", "val ppl",
                 "train tokens/s"):
        assert word in text, word
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"hmm", "lhmm"} and "bigram" in summary["baselines"]
    assert summary["runs"]["lhmm"]["rank"] == 2 and summary["runs"]["hmm"]["rank"] is None
    assert (out / "hmm" / "metrics.json").exists() and (out / "summary.md").exists()


def test_python_dash_m_lorank():
    r = subprocess.run([sys.executable, "-m", "lorank", "train", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--states" in r.stdout and "torchrun" in r.stdout


def _train_args(corpus, out, *extra):
    return ["train", "--corpus", str(corpus), "--model", "lhmm", "--states", "6", "--rank", "2",
            "--hidden", "8", "--batch-size", "16", "--max-steps", "3", "--eval-every", "2",
            "--out", str(out), *extra]


def test_zero_is_kept_and_rejected_not_replaced_by_a_default(corpus, tmp_path, capsys):
    for flag in ("--hidden", "--states", "--batch-size", "--vocab-size"):
        err = _error(_train_args(corpus, tmp_path / "o") + [flag, "0"], capsys)
        assert f"argument {flag}: " in err and "got 0" in err, err
    assert not (tmp_path / "o").exists()


def test_data_problems_fail_before_training(corpus, tmp_path, capsys):
    (corpus / "test.txt").write_text("\n\n")
    err = _error(_train_args(corpus, tmp_path / "o"), capsys)
    assert "no usable item in split(s) test" in err
    assert not (tmp_path / "o" / "checkpoint.safetensors").exists()
    err = _error(_train_args(corpus / "train.txt", tmp_path / "o"), capsys)
    assert "is a file, not a directory" in err
    (corpus / "test.txt").write_bytes(b"caf\xe9 ol\xe9\n")
    err = _error(_train_args(corpus, tmp_path / "o"), capsys)
    assert "test.txt" in err and "not UTF-8" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(corpus, tmp_path, capsys):
    err = _error(_train_args(corpus, tmp_path / "o", "--device", "cuda"), capsys)
    assert "no usable CUDA device" in err and "--device cpu" in err


def test_divergence_names_the_learning_rate(corpus, tmp_path, capsys):
    err = _error(_train_args(corpus, tmp_path / "o", "--lr", "1e6", "--max-steps", "20"),
                 capsys)
    assert "lower --lr" in err, err


def test_busy_run_directory_and_orphans(corpus, tmp_path, capsys):
    from lorank.train.rundir import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        err = _error(_train_args(corpus, out), capsys)
    assert "another lorank process" in err and "is writing to" in err
    (out / ".checkpoint.safetensors.abcd1234.tmp").write_bytes(b"")
    (out / ".tmpQwErTy").write_bytes(b"x" * 100)
    assert main(_train_args(corpus, out, "--log-every", "0.0001")) == 0
    text = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in text
    assert "training lhmm (lm): steps 1..3" in text and "step 1/3" in text  # no terminal: lines
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]


def test_paper_recipe_sits_under_the_users_options(corpus, tmp_path):
    out = tmp_path / "paper"
    assert main(["train", "--recipe", "paper", "--model", "lhmm", "--corpus", str(corpus),
                 "--states", "32", "--hidden", "8", "--max-steps", "1", "--out", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    mc, tc = m["model_config"], m["train_config"]
    assert (mc["transition"], mc["state_dropout"], mc["feature_dropout"]) == ("embedding", 0.1,
                                                                            0.1)
    assert mc["num_states"] == 32 and mc["rank"] == 2  # R = Z / 16 of the user's Z
    assert (tc["lr"], tc["max_tokens"], tc["lr_factor"], tc["patience"]) == (1e-3, 256, 0.25, 4)
    assert tc["max_steps"] == 1  # the user's option wins
