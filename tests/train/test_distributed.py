"""Two gloo processes launched by torchrun take the same steps as one process that
accumulates the same global batch (up to float error)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lorank.cli import main
from lorank.data import load_corpus
from lorank.data._batching import length_batches
from lorank.train import load_checkpoint
from lorank.train.checkpoint import CHECKPOINT_NAME, model_state


def _args(corpus, out, batch_size):
    return ["train", "--corpus", str(corpus), "--model", "lhmm", "--states", "8", "--rank", "4",
            "--hidden", "12", "--mlp-layers", "1", "--batch-size", str(batch_size),
            "--max-steps", "3", "--eval-every", "2", "--lr", "0.05", "--state-dropout", "0.25",
            "--seed", "3", "--device", "cpu", "--no-progress", "--out", str(out)]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tiny_corpus, tmp_path, capsys):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    corpus = load_corpus(str(tiny_corpus))
    lengths = corpus.lengths("train")
    # a batch size whose global batch list has an even length (the same list for 1 and 2
    # processes: the 2-process sharding only re-splits batches to reach a multiple of 2)
    bs = next(b for b in range(10, 40)
              if len(length_batches(lengths, b, shuffle=True, seed=3)) % 2 == 0)
    assert len(length_batches(lengths, bs, shuffle=True, seed=3)) >= 6

    one = tmp_path / "one"
    assert main(_args(tiny_corpus, one, bs) + ["--accumulate", "2"]) == 0

    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "lorank"] + _args(tiny_corpus, two, bs)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    a, meta_a = load_checkpoint(one / CHECKPOINT_NAME)
    b, meta_b = load_checkpoint(two / CHECKPOINT_NAME)
    assert meta_b["state"]["step"] == meta_a["state"]["step"] == 3
    pa, pb = model_state(a), model_state(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)
    # the same units were seen and evaluation (sharded over ranks) gives the same numbers
    sa, sb = meta_a["state"], meta_b["state"]
    assert sa["units"] == sb["units"]
    for ha, hb in zip(sa["history"], sb["history"], strict=True):
        assert abs(ha["val_ppl"] - hb["val_ppl"]) < 1e-3 * ha["val_ppl"]
