"""Train an LHSMM (and a dense-transition HSMM) on a real series: weekly atmospheric CO2 at
Mauna Loa, 1958-2001 (2284 weeks), the ``co2`` data set shipped inside the PyPI package
``statsmodels`` (read straight from its CSV; statsmodels itself is not imported).

The series is differenced (weekly change, which carries the seasonal cycle), missing weeks are
linearly interpolated, the first 80% of the weeks train and the last 20% test, each cut into
104-week windows (train stride 26) and standardized with the training statistics.

    pip install statsmodels        # only its data file is used
    python benchmarks/lhsmm_co2.py [--states 64] [--rank 8] [--epochs 30] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import time
from pathlib import Path

import torch

from lorank.nn.hsmm import LHSMM


def co2_csv() -> Path:
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("statsmodels is not installed: pip install statsmodels (or --csv PATH)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "co2" / "co2.csv"


def load_series(path: Path) -> torch.Tensor:
    vals = []
    with open(path) as f:
        for row in csv.DictReader(f):
            vals.append(float(row["co2"]) if row["co2"] else float("nan"))
    x = torch.tensor(vals, dtype=torch.float64)
    idx = torch.arange(len(x), dtype=torch.float64)
    ok = ~torch.isnan(x)
    # linear interpolation of missing weeks
    x = torch.from_numpy(__import__("numpy").interp(idx.numpy(), idx[ok].numpy(), x[ok].numpy()))
    return x


def windows(x: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    return x.unfold(0, length, stride).unsqueeze(-1).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--states", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-duration", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the per-step ops are small: 1 thread is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    series = load_series(args.csv or co2_csv())
    diff = series[1:] - series[:-1]
    cut = int(0.8 * len(diff))
    mu, sd = diff[:cut].mean(), diff[:cut].std()
    z = (diff - mu) / sd
    train = windows(z[:cut], 104, 26)
    test = windows(z[cut:], 104, 104)
    print(f"co2: {len(series)} weeks; train windows {tuple(train.shape)}, "
          f"test windows {tuple(test.shape)}")
    results = {}
    for name, dense in (("lhsmm", False), ("dense_hsmm", True)):
        model = LHSMM(args.states, 1, rank=args.rank, max_duration=args.max_duration,
                      dense=dense, init_data=train, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        t0 = time.perf_counter()
        for epoch in range(args.epochs):
            perm = torch.randperm(train.shape[0])
            for i in range(0, len(perm), 8):
                xb = train[perm[i : i + 8]]
                opt.zero_grad()
                loss = model.loss(xb)
                loss.backward()
                opt.step()
            if epoch % 10 == 0 or epoch == args.epochs - 1:
                with torch.no_grad():
                    te = float(model.loss(test))
                print(f"{name} epoch {epoch:3d} train nll/step {float(loss.detach()):.4f} "
                      f"test nll/step {te:.4f}")
        secs = time.perf_counter() - t0
        with torch.no_grad():
            te = float(model.loss(test))
            segs = model(test[:1]).argmax.segments(0)
        results[name] = {"test_nll_per_step": te, "train_seconds": secs,
                         "mean_segment_length": 104 / len(segs)}
        print(f"{name}: test nll/step {te:.4f} in {secs:.1f}s; Viterbi segments in the first "
              f"test window: {len(segs)}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
