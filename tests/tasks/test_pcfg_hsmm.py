"""Tasks ``pcfg`` and ``hsmm`` through ``lorank train``: a few steps, metrics.json, units,
``lorank eval`` from the checkpoint, sampling, clear errors (statsmodels missing included)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from lorank.cli import main
from lorank.config import ConfigError
from lorank.data import series
from lorank.nn.hsmm import HSMMConfig
from lorank.nn.pcfg import PCFGConfig
from lorank.tasks import HSMMTask, PCFGDataConfig, PCFGTask, SeriesDataConfig

COMMON = ["--no-progress", "--threads", "1"]

# ---- pcfg ----------------------------------------------------------------------------------


def _pcfg_args(corpus, out, rules, *extra):
    rank = [] if rules == "dense" else ["--rank", "4"]
    return ["train", "--task", "pcfg", "--corpus", str(corpus), "--out", str(out),
            "--rules", rules, "--nonterminals", "4", "--preterminals", "6", "--hidden", "16",
            *rank, "--epochs", "3", "--max-steps", "8", "--batch-size", "16", "--eval-every",
            "4", "--lr", "0.03", *COMMON, *extra]


@pytest.mark.parametrize("rules", ["dense", "low_rank", "cp", "rank_space"])
def test_pcfg_trains_and_writes_metrics(tiny_corpus, tmp_path, rules):
    out = tmp_path / rules
    assert main(_pcfg_args(tiny_corpus, out, rules)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "pcfg" and m["metric"] == "ppl" and m["rule_type"] == rules
    assert m["model"] == f"pcfg_{rules}" and m["rank"] == (None if rules == "dense" else 4)
    assert m["steps"] == 8 and len(m["history"]) == 2
    vals = [h["val_ppl"] for h in m["history"]]
    assert all(math.isfinite(v) and v > 1 for v in vals)
    assert vals[1] < vals[0], vals
    assert math.isfinite(m["test_ppl"]) and m["tokens_per_s"] > 0


def test_pcfg_units_eval_round_trip_and_sampling(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_pcfg_args(tiny_corpus, out, "cp")) == 0
    m = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["valid_ppl"] == pytest.approx(m["val_ppl"], rel=1e-5)
    # the unit count is the text's tokens incl. <eos>, as for the HMM language models
    task = PCFGTask.from_dicts(m["data_config"], m["model_config"])
    task.load_data()
    assert ev["valid_tokens"] == int(task.corpus.lengths("valid").sum())
    assert ev["valid_ppl"] == pytest.approx(math.exp(ev["valid_nll"] / ev["valid_tokens"]))
    assert main(["sample", str(out), "--num", "3", "--max-length", "6", "--seed", "1",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    vocab = set(task.corpus.vocab.itos)
    assert len(lines) == 3 and all(1 <= len(s.split()) <= 6 and set(s.split()) <= vocab
                                   for s in lines)


def test_pcfg_eval_max_length_and_errors(tiny_corpus, tmp_path, capsys):
    task = PCFGTask(PCFGDataConfig(corpus=str(tiny_corpus), max_length=5, eval_max_length=4),
                    PCFGConfig())
    task.load_data()
    train, valid = task.sentences("train"), task.sentences("valid")
    assert max(s.numel() for s in train) <= 5 and max(s.numel() for s in valid) <= 4
    full = [s.numel() - 1 for s in task.corpus.sentences("valid")]
    assert task.dropped["valid"] == sum(n > 4 for n in full) > 0
    assert all(int(s[-1]) != 1 for s in valid)  # no <eos> id inside the grammar's strings
    for bad, msg in [({"rule_type": "dense", "rank": 4}, "rank applies"),
                     ({"rule_type": "sparse"}, "unknown rule_type"),
                     ({"rule_type": "cp", "rank": 0}, "rank must be a positive")]:
        cfg = {"num_nonterminals": 4, "num_preterminals": 4, "hidden": 8, **bad}
        with pytest.raises(ConfigError, match=msg):
            PCFGConfig(**cfg)
    cfg = PCFGConfig(rule_type="TN-PCFG", num_nonterminals=4, num_preterminals=4, hidden=8)
    assert cfg.rule_type == "cp" and cfg.rank == 64
    with pytest.raises(SystemExit) as err:
        main(_pcfg_args(tiny_corpus, tmp_path / "x", "dense", "--rank", "3"))
    assert err.value.code == 2 and "rank applies" in capsys.readouterr().err


# ---- hsmm ----------------------------------------------------------------------------------


@pytest.fixture
def co2_file(tmp_path):
    """A synthetic weekly series in statsmodels' co2.csv layout: trend, yearly cycle and
    regime changes (segments of 4..12 weeks with their own level), some weeks missing."""
    g = torch.Generator().manual_seed(0)
    vals, level = [], 0.0
    while len(vals) < 700:
        level = float(torch.randn(1, generator=g)) * 0.5
        for _ in range(int(torch.randint(4, 13, (1,), generator=g))):
            t = len(vals)
            vals.append(315 + 0.02 * t + 2 * math.sin(2 * math.pi * t / 52) + level
                        + 0.05 * float(torch.randn(1, generator=g)))
    rows = ["date,co2"] + [f"{i},{'' if i % 97 == 5 else f'{v:.4f}'}"
                           for i, v in enumerate(vals[:700])]
    path = tmp_path / "co2.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _hsmm_args(csv, out, *extra):
    return ["train", "--task", "hsmm", "--csv", str(csv), "--out", str(out), "--states", "8",
            "--max-duration", "6", "--emb-dim", "8", "--window", "52", "--train-stride", "26",
            "--epochs", "5", "--max-steps", "10", "--batch-size", "8", "--eval-every", "5",
            "--lr", "0.05",
            *COMMON, *extra]


@pytest.mark.parametrize("model", ["lhsmm", "hsmm"])
def test_hsmm_trains_and_writes_metrics(co2_file, tmp_path, model, capsys):
    out = tmp_path / model
    rank = ["--rank", "2"] if model == "lhsmm" else []
    assert main(_hsmm_args(co2_file, out, "--model", model, *rank)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "hsmm" and m["metric"] == "nll_per_step" and m["model"] == model
    assert m["rank"] == (2 if model == "lhsmm" else None)
    vals = [h["val_nll_per_step"] for h in m["history"]]
    assert m["steps"] == 10 and len(vals) >= 2 and vals[-1] < vals[0], vals
    assert math.isfinite(m["test_nll_per_step"]) and m["time_steps_per_s"] > 0
    weeks = m["weeks"]
    assert sum(weeks.values()) == 699 and weeks["valid"] == 70
    gauss = m["baselines"]["gaussian"]
    assert gauss["val_nll_per_step"] > 0.5 * math.log(2 * math.pi)
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["valid_time_steps"] == weeks["valid"] and ev["test_time_steps"] == weeks["test"]
    assert ev["valid_nll_per_step"] == pytest.approx(m["val_nll_per_step"], rel=1e-5)


def test_hsmm_nll_is_the_sum_over_windows(co2_file):
    config = HSMMConfig(model="lhsmm", num_states=4, max_duration=4, emb_dim=4)
    assert config.rank == 4  # min(8, Z)
    task = HSMMTask(SeriesDataConfig(csv=str(co2_file), window=52, train_stride=26), config)
    task.load_data()
    model = task.build_model()
    batches = list(task.batches("valid", batch_size=2))
    w, ln = task.data.windows["valid"], task.data.lengths["valid"]
    with torch.no_grad():
        total = sum(float(task.nll(model, b, None)) for b in batches)
        one_by_one = sum(float(-model(w[i : i + 1, : int(n)]).log_partition.sum())
                         for i, n in enumerate(ln.tolist()))
    assert total == pytest.approx(one_by_one, rel=1e-5)
    assert sum(task.count(b) for b in batches) == task.data.weeks["valid"]


def test_hsmm_errors(co2_file, tmp_path, monkeypatch, capsys):
    for bad, msg in [({"model": "hsmm", "rank": 2}, "rank applies"),
                     ({"model": "lhsmm", "rank": 99}, "at most the number"),
                     ({"model": "crf"}, "unknown model")]:
        cfg = {"num_states": 8, "max_duration": 4, "emb_dim": 4, **bad}
        with pytest.raises(ConfigError, match=msg):
            HSMMConfig(**cfg)
    with pytest.raises(ConfigError, match="valid_fraction must be a finite number > 0"):
        SeriesDataConfig(csv=str(co2_file), valid_fraction=0.0)
    # without statsmodels (and no --csv) the CLI names the install command
    real = importlib.util.find_spec
    monkeypatch.setattr(series.importlib.util, "find_spec",
                        lambda name, *a: None if name == "statsmodels" else real(name, *a))
    args = [a for a in _hsmm_args(co2_file, tmp_path / "n") if a not in ("--csv", str(co2_file))]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2 and "pip install statsmodels" in capsys.readouterr().err


def test_hsmm_on_the_real_co2_series(tmp_path):
    pytest.importorskip("statsmodels")
    out = tmp_path / "co2"
    args = [a for a in _hsmm_args("x", out, "--rank", "2") if a not in ("--csv", "x")]
    args[args.index("--window") + 1] = "104"
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["weeks"] == {"train": 1598, "valid": 228, "test": 457}
    assert math.isfinite(m["val_nll_per_step"])
