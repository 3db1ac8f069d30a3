"""Save/load round trips, fine-tuning, the CLI, Hugging Face models and HMM transitions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lorank
from lorank.cli import main
from lorank.compress import (
    CompressConfig,
    FixedLowRankTransition,
    LowRankLinear,
    apply_structure,
    break_even_rank,
    compress,
    compress_hmm,
    finetune,
    load_compressed,
    nmf_transition,
    save_compressed,
    transition_error,
)
from lorank.compress.io import compressed_structure
from lorank.nn.hmm import HMMLanguageModel, HMMLMConfig
from lorank.tasks import LMTask, TextDataConfig, load_run
from lorank.train.checkpoint import save_checkpoint

from .test_compress_core import TinyLM, _batches, _lm_loss


@pytest.mark.parametrize("method,gran", [("svd", "stacked"), ("svd+sparse", "per_gate"),
                                         ("whitened", "per_gate")])
def test_save_load_round_trips_outputs_exactly(method, gran, tmp_path, gen):
    model = TinyLM().eval()
    calib = _batches(gen)
    cm, report = compress(model, CompressConfig(method=method, param_reduction=0.5,
                                                rnn_granularity=gran), calibration=calib)
    save_compressed(cm, tmp_path / "c", report)
    fresh = TinyLM()  # dense skeleton with other random weights
    loaded = load_compressed(tmp_path / "c", fresh).eval()
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(cm(x), loaded(x))
    assert {n: type(m) for n, m in cm.named_modules()} == \
        {n: type(m) for n, m in loaded.named_modules()}
    meta = json.loads((tmp_path / "c" / "lorank_compress.json").read_text())
    assert "proj" in meta["modules"] and "rnn" in meta["modules"]
    rep = json.loads((tmp_path / "c" / "compress_report.json").read_text())
    assert rep["model_params_after"] == report.model_params_after


def test_save_load_tied_weights(tmp_path, gen):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.mid = nn.Linear(16, 16)
            self.out = nn.Linear(16, 30, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.tanh(self.mid(self.emb(x))))

    model = Tied()
    cm, _ = compress(model, CompressConfig(rank=4, target_modules=["mid"]))
    save_compressed(cm, tmp_path)
    loaded = load_compressed(tmp_path, Tied())
    assert loaded.out.weight is loaded.emb.weight
    x = torch.randint(0, 30, (5,), generator=gen)
    assert torch.equal(cm(x), loaded(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a lorank compressed model"):
        load_compressed(tmp_path)
    cm, _ = compress(TinyLM(), CompressConfig(rank=2, target_modules=["proj"]))
    save_compressed(cm, tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        load_compressed(tmp_path)
    with pytest.raises(ValueError, match="no module 'proj'"):
        load_compressed(tmp_path, nn.Sequential(nn.Linear(2, 2)))


def test_finetune_recovers_loss(gen):
    torch.manual_seed(0)
    model = TinyLM(vocab=20)
    data = _batches(gen, n=4, vocab=20)
    finetune(model, data, _lm_loss, steps=60, lr=1e-2)
    cm, _ = compress(model, CompressConfig(rank=2))
    with torch.no_grad():
        before = sum(float(_lm_loss(cm(b), b)) for b in data)
    losses = finetune(cm, data, _lm_loss, steps=40, lr=5e-3)
    assert len(losses) == 40
    with torch.no_grad():
        after = sum(float(_lm_loss(cm(b), b)) for b in data)
    assert after < before
    assert not cm.training


# ---- HMM transitions --------------------------------------------------------------------


def test_nmf_transition_full_rank_and_decreasing_error(gen):
    z = 12
    logits = torch.randn(z, z, generator=gen, dtype=torch.float64) * 2
    dense = lorank.Dense(logits)
    p = dense.to_dense()
    full = nmf_transition(dense, z)
    assert isinstance(full, lorank.LowRank) and full.rank == z
    assert torch.allclose(full.to_dense(), p, atol=1e-12)
    errs = [transition_error(p, nmf_transition(dense, r))["rel_frobenius"]
            for r in (1, 3, 6, 9, 11)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < errs[0]


@pytest.mark.parametrize("loss", ["frobenius", "kl"])
def test_nmf_transition_recovers_a_low_nonnegative_rank_matrix(loss, gen):
    z, r = 16, 4
    a = torch.rand(z, r, generator=gen, dtype=torch.float64)
    a[torch.rand(z, r, generator=gen) < 0.5] = 0
    a[:, 0] += 0.05
    c = torch.rand(z, r, generator=gen, dtype=torch.float64)
    c[torch.rand(z, r, generator=gen) < 0.5] = 0
    c = c / c.sum(0)
    p = a @ c.mT
    p = p / p.sum(-1, keepdim=True)
    low = nmf_transition(p, r, loss=loss, n_iter=2000, tol=0.0)
    got = low.to_dense()
    assert torch.allclose(got.sum(-1), torch.ones(z, dtype=torch.float64))
    err = transition_error(p, got)
    assert err["rel_frobenius"] < (1e-6 if loss == "frobenius" else 1e-2), err
    # the factor plugs into an HMM: forward algorithm over the compressed transition
    emission = torch.randn(2, 5, z, generator=gen, dtype=torch.float64).log_softmax(-1)
    init = torch.zeros(z, dtype=torch.float64)
    lp_low = lorank.HMM(init, low, emission).log_partition
    lp_dense = lorank.HMM(init, lorank.Dense(p.log()), emission).log_partition
    assert torch.allclose(lp_low, lp_dense, atol=1e-2 if loss == "kl" else 1e-5)


def test_nmf_transition_errors():
    with pytest.raises(ValueError, match="square"):
        nmf_transition(torch.rand(3, 4), 2)
    with pytest.raises(ValueError, match="nonnegative"):
        nmf_transition(-torch.rand(3, 3), 2)
    with pytest.raises(ValueError, match="rank"):
        nmf_transition(torch.rand(3, 3), 0)


# ---- Hugging Face ------------------------------------------------------------------------


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers, transformers.BertModel(cfg).eval()


def _bert_batches(gen, n=3):
    return [{"input_ids": torch.randint(0, 64, (4, 10), generator=gen),
             "attention_mask": torch.ones(4, 10, dtype=torch.long)} for _ in range(n)]


ATTENTION = ["query", "key", "value", "attention.output.dense"]


def test_hf_attention_projections(tmp_path, gen):
    transformers, model = _tiny_bert()
    calib = _bert_batches(gen)
    cm, rep = compress(model, CompressConfig(method="whitened", rank=32,
                                             target_modules=ATTENTION), calibration=calib)
    # rank 32 of a 32x32 projection would not save parameters: all kept dense, outputs equal
    assert all(r.status == "dense" for r in rep.layers) and len(rep.layers) == 8
    cm, rep = compress(model, CompressConfig(method="whitened", rank=6,
                                             target_modules=ATTENTION), calibration=calib)
    assert {r.name.rsplit(".", 1)[-1] for r in rep.layers} == {"query", "key", "value",
                                                                "dense"}
    assert isinstance(cm.encoder.layer[0].attention.self.query, LowRankLinear)
    assert isinstance(cm.encoder.layer[1].intermediate.dense, nn.Linear)  # not targeted
    with torch.no_grad():
        y0 = model(**calib[0]).last_hidden_state
        y1 = cm(**calib[0]).last_hidden_state
    assert y0.shape == y1.shape and torch.isfinite(y1).all()
    _, rep_svd = compress(model, CompressConfig(method="svd", rank=6,
                                                target_modules=ATTENTION), calibration=calib)
    werr = sum(r.output_error for r in rep.layers)
    serr = sum(r.output_error for r in rep_svd.layers)
    assert werr < serr
    # save + load from the directory alone (HF config beside the weights)
    model.config.save_pretrained(tmp_path)
    save_compressed(cm, tmp_path, rep, base={"kind": "hf", "auto_class": "AutoModel"})
    loaded = load_compressed(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**calib[0]).last_hidden_state, y1)


def test_hf_exact_rank_attention_is_lossless(gen):
    _, model = _tiny_bert()
    with torch.no_grad():
        for layer in model.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.value):
                w = torch.randn(32, 4, generator=gen) @ torch.randn(4, 32, generator=gen)
                lin.weight.copy_(w / 8)
    calib = _bert_batches(gen, 2)
    for method in ("svd", "asvd", "fwsvd"):
        cm, rep = compress(model, CompressConfig(method=method, rank=4,
                                                 target_modules=["query", "value"]),
                           calibration=calib,
                           loss_fn=lambda out, b: out.last_hidden_state.pow(2).mean())
        assert all(r.status == "factorized" for r in rep.layers)
        with torch.no_grad():
            assert torch.allclose(model(**calib[0]).last_hidden_state,
                                  cm(**calib[0]).last_hidden_state, atol=1e-5)


def test_hf_gpt2_conv1d(gen):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1,
                                  n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    x = torch.randint(0, 50, (2, 8), generator=gen)
    cm, rep = compress(model, CompressConfig(rank=32, target_modules=["c_attn"],
                                             layer_types=["linear"]))
    # 32 x 96 at rank 32 = min(m, n): factorized? 32*(128) = 4096 > 3072: kept dense
    assert rep.layers[0].status == "dense"
    cm, rep = compress(model, CompressConfig(rank=8, target_modules=["c_attn", "c_proj"]))
    assert all(r.status == "factorized" for r in rep.layers)
    with torch.no_grad():
        y = cm(x).last_hidden_state
    merged = lorank.compress.merge(cm)
    assert type(merged.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(merged(x).last_hidden_state, y, atol=1e-5)


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_on_a_hf_directory(tmp_path, gen, capsys):
    transformers, model = _tiny_bert()
    src = tmp_path / "bert"
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                             + [f"w{i}" for i in range(59)]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(src / "vocab.txt"))
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 59}" for j in range(8))
                              for i in range(20)) + "\n")
    out = tmp_path / "out"
    code = main(["compress", str(src), "-o", str(out), "--method", "whitened", "--param-reduction",
                     "0.5", "--calib-text", str(text), "--target", "query", "value",
                     "--batch-size", "8", "--no-latency"])
    assert code == 0
    assert "| encoder.layer.0.attention.self.query |" in capsys.readouterr().out
    for name in ("model.safetensors", "lorank_compress.json", "compress_report.json",
                 "compress_report.md", "config.json", "vocab.txt"):
        assert (out / name).is_file(), name
    loaded = load_compressed(out).eval()
    assert isinstance(loaded.encoder.layer[1].attention.self.value, LowRankLinear)
    # errors are reported, not raised
    code = main(["compress", str(src), "-o", str(tmp_path / "o2"), "--method", "asvd", "--rank",
                 "4"])
    assert code == 2
    assert "needs --calib-text" in capsys.readouterr().err
    # a previous output is replaced only when asked
    assert main(["compress", str(src), "-o", str(out), "--rank", "4", "--no-latency"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["compress", str(src), "-o", str(out), "--rank", "4", "--no-latency",
                 "--overwrite"]) == 0
    assert load_compressed(out).encoder.layer[1].attention.self.value.rank == 4
    code = main(["compress", str(tmp_path / "missing"), "-o", str(out), "--rank", "4"])
    assert code == 2


def _tiny_hmm_lm(model="hmm"):
    torch.manual_seed(0)
    return HMMLanguageModel(vocab_size=20, num_states=8, model=model, hidden=16).eval()


def test_compress_a_neural_hmm_language_model(gen):
    model = _tiny_hmm_lm()
    x = torch.randint(0, 20, (3, 6), generator=gen)
    with torch.no_grad():
        errs = [compress_hmm(model, r, loss="frobenius")[1]["rel_frobenius"] for r in (1, 2, 3)]
        assert errs[0] > errs[1] > errs[2]
        low, info = compress_hmm(model, 3)
        # a submodule swap: the transition network changes, nothing else
        assert isinstance(low.transition_net, FixedLowRankTransition)
        assert type(low) is HMMLanguageModel
        factor = low.transition()
        assert isinstance(factor, lorank.LowRank) and factor.rank == 3
        assert info["transition_params_after"] == 2 * 8 * 3 + 8
        assert info["transition_params_before"] == sum(
            p.numel() for p in model.transition_net.parameters())
        torch.testing.assert_close(low.init_logits(), model.init_logits())
        em = model.emission(model.state_emb, x)
        ref = lorank.HMM(model.init_logits(), factor, em).log_partition
        torch.testing.assert_close(low(x).log_partition, ref)
        # parameters are contiguous, as a model rebuilt for loading is: outputs then match
        # bit for bit on any CPU (a transposed layout picked other kernels on CI)
        assert all(p.is_contiguous() for p in low.transition_net.parameters())
        # weights restore onto a fresh model once the structure is applied
        fresh = _tiny_hmm_lm()
        apply_structure(fresh, compressed_structure(low))
        fresh.load_state_dict(low.state_dict())
        assert torch.equal(fresh.eval()(x).log_partition, low(x).log_partition)
    assert isinstance(model.transition(), lorank.Dense)  # the original is untouched


def test_compress_hmm_refuses_ranks_that_do_not_pay():
    dense = _tiny_hmm_lm("hmm")
    assert break_even_rank(8) == 3
    with pytest.raises(ValueError, match="break-even rank is 3"):
        compress_hmm(dense, 4)
    lhmm = _tiny_hmm_lm("lhmm")  # rank Z/4 = 2
    with pytest.raises(ValueError, match="already has rank 2"):
        compress_hmm(lhmm, 2)
    low, _ = compress_hmm(lhmm, 1)
    assert low.rank == 1
    with pytest.raises(TypeError, match="NeuralHMM"):
        compress_hmm(torch.nn.Linear(2, 2), 1)


def _save_run(run, model, task):
    save_checkpoint(run / "model.safetensors", model,
                    {"task": task.name, "data_config": task.data_config.to_dict(),
                     "model_config": task.model_config.to_dict(),
                     "task_meta": {"vocab": [f"w{i}" for i in range(20)]}}, rng=False)


def test_cli_on_a_lorank_hmm_checkpoint(tmp_path, gen, capsys):
    task = LMTask(TextDataConfig(vocab_size=20), HMMLMConfig(model="hmm", num_states=8,
                                                             hidden=16, mlp_layers=1,
                                                             vocab_size=20))
    torch.manual_seed(0)
    model = task.build_model().eval()
    run = tmp_path / "run"
    _save_run(run, model, task)
    out = tmp_path / "out"
    assert main(["compress", str(run), "-o", str(out), "--rank", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 3 and info["num_states"] == 8
    _, loaded, _ = load_run(out)
    assert isinstance(loaded.transition_net, FixedLowRankTransition)
    x = torch.randint(0, 20, (2, 5), generator=gen)
    with torch.no_grad():
        ref = model(x).log_partition
        got = loaded(x).log_partition
    assert torch.isfinite(got).all() and (got - ref).abs().max() < 5.0
    # the compressed run samples without its corpus (the vocabulary travels with it)
    assert main(["sample", str(out), "--num", "2", "--max-length", "4"]) == 0
    assert all(w.startswith("w") for w in capsys.readouterr().out.split())
    fresh = tmp_path / "fresh"
    assert main(["compress", str(run), "-o", str(fresh), "--energy", "0.9"]) == 2
    assert "--rank R" in capsys.readouterr().err
    assert main(["compress", str(run), "-o", str(fresh), "--rank", "5"]) == 2
    assert "break-even rank is 3" in capsys.readouterr().err
    # an existing output needs --overwrite; a training run is never an output
    assert main(["compress", str(run), "-o", str(out), "--rank", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["compress", str(run), "-o", str(out), "--rank", "2", "--overwrite"]) == 0
    task_out, loaded_out, _ = load_run(out)
    assert loaded_out.rank == 2
    summary = task_out.summary(loaded_out)  # what lorank eval prints: the rank of the weights
    assert summary["rank"] is None and summary["model_rank"] == 2
    other = tmp_path / "other_run"
    _save_run(other, model, task)
    (other / "metrics.json").write_text("{}")
    before_other = (other / "model.safetensors").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["compress", str(run), "-o", str(other), "--rank", "3", *extra]) == 2
        assert "holds a training run" in capsys.readouterr().err
    assert (other / "model.safetensors").read_bytes() == before_other
    # never into the input run: that would overwrite its trained model
    before = (run / "model.safetensors").read_bytes()
    assert main(["compress", str(run), "-o", str(run), "--rank", "3"]) == 2
    assert "overwrite the trained model" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before


def test_compress_options_land_in_their_config_fields():
    """Every `lorank compress` option that configures compression is checked against the
    CompressConfig field it sets (the two must not drift apart)."""
    import argparse

    from lorank.cli.compress import _config_from_args, _configure

    parser = _configure(argparse.ArgumentParser())
    args = parser.parse_args([
        "m", "-o", "o", "--method", "cospadi", "--rank", "5", "--target-regex", "a.*",
        "--exclude", "b", "--layer-types", "linear", "--rnn-matrices", "hh",
        "--rnn-granularity", "per_gate", "--conv-decomposition", "spatial",
        "--sparse-density", "0.2", "--seed", "3", "--no-latency", "--dict-sparsity", "0.25",
        "0.5", "--dict-nm", "1", "4", "--dict-iters", "2", "--no-lowrank-fallback",
        "--share-dictionary", "x(.*)"])
    c = _config_from_args(args)
    want = dict(method="cospadi", rank=5, target_modules="a.*", exclude_modules=["b"],
                layer_types=("linear",), rnn_matrices=("hh",), rnn_granularity="per_gate",
                conv_decomposition="spatial", sparse_density=0.2, seed=3,
                measure_latency=False, dict_sparsity=(0.25, 0.5), dict_nm=(1, 4),
                dict_iters=2, dict_lowrank_fallback=False, share_dictionary="x(.*)")
    for field, value in want.items():
        assert getattr(c, field) == value, field
    # the options' defaults are the config's defaults
    default = _config_from_args(parser.parse_args(["m", "-o", "o", "--rank", "2"]))
    for field in ("method", "rnn_matrices", "rnn_granularity", "conv_decomposition",
                  "sparse_density", "seed", "dict_sparsity", "dict_nm", "dict_iters",
                  "dict_lowrank_fallback", "share_dictionary"):
        assert getattr(default, field) == getattr(CompressConfig(rank=2), field), field


@pytest.mark.parametrize("method", ["trp", "maestro"])
def test_cli_trainable_methods_fine_tune_a_lorank_run(method, tiny_corpus, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["train", "--corpus", str(tiny_corpus), "--model", "hmm", "--states", "6",
                 "--hidden", "8", "--batch-size", "16", "--max-steps", "2", "--no-progress",
                 "--out", str(run)]) == 0
    _, dense, _ = load_run(run)
    capsys.readouterr()
    assert main(["compress", str(run), "-o", str(out), "--method", method, "--rank", "2",
                 "--steps", "4", "--trp-period", "2", "--no-latency"]) == 0
    info = json.loads((out / "train_low_rank.json").read_text())
    assert info["method"] == method and info["steps"] == 4
    assert info["params_before"] == sum(p.numel() for p in dense.parameters())
    task, small, _ = load_run(out, data=True)
    linears = [m for m in small.modules() if isinstance(m, LowRankLinear)]
    assert len(linears) == 8 and all(m.rank == 2 for m in linears)
    assert info["params_after"] == sum(p.numel() for p in small.parameters())
    assert info["params_after"] < info["params_before"]
    assert math.isfinite(info["valid_ppl_after"]) and info["valid_ppl_after"] > 1
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "valid", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["valid_ppl"] - info["valid_ppl_after"]) < 1e-6 * info["valid_ppl_after"]
    # overwritten by another kind of output: no file of the earlier one is left behind
    assert main(["compress", str(run), "-o", str(out), "--rank", "2", "--overwrite"]) == 0
    assert not (out / "train_low_rank.json").exists()
    assert not (out / "compress_report.md").exists()


def test_cli_trainable_methods_need_a_lorank_run_and_a_rank(tiny_corpus, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert main(["compress", str(hf), "-o", str(tmp_path / "o"), "--method", "trp",
                 "--rank", "2"]) == 2
    assert "lorank.compress.train_low_rank" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(tiny_corpus), "--model", "hmm", "--states", "4",
                 "--hidden", "8", "--max-steps", "1", "--no-progress", "--out", str(run)]) == 0
    assert main(["compress", str(run), "-o", str(tmp_path / "o"), "--method", "maestro",
                 "--energy", "0.9"]) == 2
    assert "--method maestro takes --rank" in capsys.readouterr().err
    # a rank that no prefix can have is refused before any training step
    assert main(["compress", str(run), "-o", str(tmp_path / "o"), "--method", "maestro",
                 "--rank", "99", "--steps", "1000"]) == 2
    err = capsys.readouterr().err
    assert "exceeds min" in err and "finetune step" not in err


def test_cli_hmm_run_kl_fit_then_fine_tuning(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(tiny_corpus), "--model", "hmm", "--states", "8",
                 "--hidden", "8", "--batch-size", "16", "--max-steps", "3", "--no-progress",
                 "--out", str(run)]) == 0
    fits = {}
    for fit in ("kl", "frobenius"):
        out = tmp_path / fit
        assert main(["compress", str(run), "-o", str(out), "--rank", "3", "--hmm-fit", fit,
                     "--steps", "4", "--trp-period", "2"]) == 0
        info = json.loads((out / "compress_report.json").read_text())
        assert info["fit"] == fit and info["finetune_steps"] == 4
        fits[fit] = info
        capsys.readouterr()
        assert main(["eval", str(out), "--split", "valid", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["valid_ppl"]
        assert abs(got - info["valid_ppl_after"]) < 1e-6 * got  # the saved model is the tuned one
    # two different fits (both fine-tuned from their own starting point)
    assert fits["kl"]["rel_frobenius"] != fits["frobenius"]["rel_frobenius"]
    assert fits["kl"]["valid_ppl_fit"] != fits["frobenius"]["valid_ppl_fit"]
