"""The trainer on a tiny corpus: learning, perplexity = exp(mean token NLL) computed
independently, exact resume, checkpoints without pickle, metrics.json."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from lorank.config import ConfigError
from lorank.nn.hmm import HMMLMConfig
from lorank.tasks import LMTask, TextDataConfig
from lorank.train import TrainConfig, Trainer, load_checkpoint
from lorank.train.checkpoint import BEST_NAME, CHECKPOINT_NAME, model_state
from lorank.train.distributed import DistContext


def _task(corpus, **model):
    cfg = {"model": "lhmm", "num_states": 8, "rank": 4, "hidden": 12, "mlp_layers": 1}
    cfg.update(model)
    return LMTask(TextDataConfig(corpus=str(corpus)), HMMLMConfig(**cfg))


def _config(out, **kw):
    base = dict(out=str(out), batch_size=16, max_tokens=None, lr=0.05, progress=False,
                device="cpu", eval_per_epoch=2)
    base.update(kw)
    return TrainConfig(**base)


def _fit(corpus, out, model=None, **kw):
    trainer = Trainer(_task(corpus, **(model or {})), _config(out, **kw), DistContext())
    return trainer, trainer.fit()


def test_lhmm_training_loss_goes_down(tiny_corpus, tmp_path):
    _, m = _fit(tiny_corpus, tmp_path / "run", model={"hidden": 32, "mlp_layers": 2}, epochs=6,
                lr=0.03)
    hist = m["history"]
    assert hist[-1]["train_ppl"] < 0.8 * hist[0]["train_ppl"], hist
    assert m["val_ppl"] < 0.8 * hist[0]["val_ppl"]
    # beats the add-k unigram model of the same corpus
    task = _task(tiny_corpus)
    task.load_data()
    assert m["val_ppl"] < task.baselines()["unigram"]["val_ppl"]


def _independent_nll(model, sentences) -> tuple[float, int]:
    """Sum over sentences of -log p(x) by a float64 log-space forward on dense tables."""
    model = model.double().eval()
    with torch.no_grad():
        init = model.init_logits().log_softmax(-1)
        trans = model.transition().log_probs()
        table = model.emission.log_probs(model.state_emb)  # (Z, V)
    total, count = 0.0, 0
    for s in sentences:
        alpha = init + table[:, s[0]]
        for w in s[1:]:
            alpha = torch.logsumexp(alpha.unsqueeze(-1) + trans, 0) + table[:, w]
        total -= float(torch.logsumexp(alpha, 0))
        count += len(s)
    return total, count


@pytest.mark.parametrize("name", ["hmm", "lhmm", "lhmm_band", "rank_space"])
def test_perplexity_is_exp_of_mean_token_nll(tiny_corpus, tmp_path, name):
    model = {"model": name, "rank": None if name == "hmm" else 4}
    trainer, m = _fit(tiny_corpus, tmp_path / "run", model=model, max_steps=2)
    task = trainer.task
    valid = task.sentences("valid")
    assert all(int(s[-1]) == task.corpus.vocab.eos_id for s in valid)
    r = trainer.evaluate("valid")
    nll, count = _independent_nll(trainer.model, valid)
    assert r["units"] == count == task.corpus.valid.numel()  # <eos> counted
    assert math.isclose(r["ppl"], math.exp(nll / count), rel_tol=1e-4)
    # the test perplexity in metrics.json is that of the best model
    best = task.build_model()
    best.load_state_dict(model_state(load_checkpoint(tmp_path / "run" / BEST_NAME)[0]))
    tnll, tcount = _independent_nll(best, task.sentences("test"))
    assert math.isclose(m["test_ppl"], math.exp(tnll / tcount), rel_tol=1e-4)


def _params(path):
    return model_state(load_checkpoint(path)[0])


def test_resume_reproduces_the_next_steps_exactly(tiny_corpus, tmp_path):
    """Interrupt after step 2, resume, and land on the uninterrupted run's parameters and
    optimizer state bit for bit, across an epoch boundary, with state and feature dropout."""
    model = {"state_dropout": 0.25, "feature_dropout": 0.25}
    kw = dict(batch_size=40, eval_every=2, epochs=3)
    _, full = _fit(tiny_corpus, tmp_path / "full", model=model, max_steps=5, **kw)
    _fit(tiny_corpus, tmp_path / "cut", model=model, max_steps=2, **kw)
    trainer = Trainer(_task(tiny_corpus, **model),
                      _config(tmp_path / "cut", max_steps=5, resume=True, **kw), DistContext())
    resumed = trainer.fit()
    assert resumed["steps"] == full["steps"] == 5
    assert full["epochs"] > 1  # the run crossed an epoch boundary
    a, meta_a = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    b, meta_b = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    vals = [[h["val_ppl"] for h in m["state"]["history"]] for m in (meta_a, meta_b)]
    assert vals[0] == vals[1] and len(vals[0]) == 3  # evaluations at steps 2, 4, 5
    assert resumed["val_ppl"] == full["val_ppl"] and resumed["test_ppl"] == full["test_ppl"]


def test_checkpoints_are_safetensors_with_json_metadata(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    _fit(tiny_corpus, out, max_steps=1)
    for name in (CHECKPOINT_NAME, BEST_NAME):
        with safe_open(str(out / name), framework="pt") as f:  # tensors only, no pickle
            meta = json.loads(f.metadata()["lorank"])
        assert meta["task"] == "lm" and meta["model_config"]["model"] == "lhmm"
        assert meta["task_meta"]["vocab"][:2] == ["<unk>", "<eos>"]
    tensors, meta = load_checkpoint(out)  # a run directory resolves to its best model
    assert "optimizer" not in meta and any(k.startswith("model.") for k in tensors)
    full, meta = load_checkpoint(out / CHECKPOINT_NAME)
    assert any(k.startswith("optim.") for k in full) and "scheduler" in meta
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_metrics_json(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    trainer, m = _fit(tiny_corpus, out, max_steps=3, eval_every=1)
    disk = json.loads((out / "metrics.json").read_text())
    for key in ("model", "num_states", "rank", "val_ppl", "test_ppl", "tokens_per_s", "params"):
        assert disk[key] is not None, key
    assert disk["model"] == "lhmm" and disk["num_states"] == 8 and disk["rank"] == 4
    assert disk["params"] == sum(p.numel() for p in trainer.model.parameters())
    assert disk["val_ppl"] == min(h["val_ppl"] for h in disk["history"])
    assert len(disk["history"]) == 3 and disk["tokens_per_s"] > 0
    assert disk == json.loads(json.dumps(m))


def test_existing_run_needs_resume_or_overwrite(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    _fit(tiny_corpus, out, max_steps=1)
    with pytest.raises(FileExistsError, match="pass --resume"):
        _fit(tiny_corpus, out, max_steps=1)
    _fit(tiny_corpus, out, max_steps=1, overwrite=True)
    with pytest.raises(ValueError, match="cannot resume .*num_states: 8 in the run, 6 now"):
        _fit(tiny_corpus, out, model={"num_states": 6}, max_steps=2, resume=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="batch_size must be a positive integer") as e:
        TrainConfig(batch_size=0)
    assert e.value.field == "batch_size" and e.value.owner == "TrainConfig"
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        TrainConfig(lr=0.0)


def test_time_budget_stops_training_and_evaluates(tiny_corpus, tmp_path):
    _, m = _fit(tiny_corpus, tmp_path / "run", epochs=50, max_seconds=0.2, eval_every=1000)
    assert 1 <= m["steps"] < 50 * 4  # stopped early, by time
    assert m["train_seconds"] >= 0.2 and m["train_seconds"] < 0.2 + 5.0
    assert m["history"][-1]["step"] == m["steps"]  # evaluated where it stopped


def test_linear_schedule_reaches_min_lr_and_resumes(tiny_corpus, tmp_path):
    kw = dict(schedule="linear", lr=0.05, min_lr=0.005, max_steps=5, eval_every=2)
    trainer, m = _fit(tiny_corpus, tmp_path / "run", **kw)
    lrs = [h["lr"] for h in m["history"]]  # after steps 2, 4, 5: lr of the last step taken
    want = [0.05 + (0.005 - 0.05) * s / 4 for s in (1, 3, 4)]
    assert lrs == pytest.approx(want)
    # the schedule follows the run's budget: a resumed run continues it from its step
    _fit(tiny_corpus, tmp_path / "cut", **dict(kw, max_steps=2))
    _, resumed = _fit(tiny_corpus, tmp_path / "cut", **dict(kw, resume=True))
    assert [h["lr"] for h in resumed["history"]][1:] == pytest.approx(want[1:])
