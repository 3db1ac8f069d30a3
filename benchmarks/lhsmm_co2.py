"""Train an LHSMM (and a dense-transition HSMM) on a real series: weekly atmospheric CO2 at
Mauna Loa, 1958-2001 (2284 weeks), the ``co2`` data set shipped inside the PyPI package
``statsmodels`` (read straight from its CSV by :func:`lorank.data.series.load_co2`;
statsmodels itself is not imported).

The series is differenced (weekly change, which carries the seasonal cycle), missing weeks are
linearly interpolated, the first 80% of the weeks train and the last 20% test, each cut into
104-week windows (train stride 26; the test's last partial window is dropped) and standardized
with the training statistics: :func:`lorank.data.series.co2_splits` with ``valid_fraction=0``.
(``lorank train --task hsmm`` uses the same data with a validation split.)

    pip install statsmodels        # only its data file is used
    python benchmarks/lhsmm_co2.py [--states 64] [--rank 8] [--epochs 30] [--csv PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lorank.data.series import co2_splits
from lorank.nn.hsmm import LHSMM, HSMMConfig


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
    try:
        data = co2_splits(104, 26, valid_fraction=0.0, test_fraction=0.2, path=args.csv,
                          eval_remainder=False)
    except ModuleNotFoundError as err:
        raise SystemExit(f"{err} (or --csv PATH)") from None
    train, test = data.windows["train"], data.windows["test"]
    print(f"co2: {sum(data.weeks.values()) + 1} weeks; train windows {tuple(train.shape)}, "
          f"test windows {tuple(test.shape)}")
    results = {}
    for name, dense in (("lhsmm", False), ("dense_hsmm", True)):
        config = HSMMConfig(model="hsmm" if dense else "lhsmm", num_states=args.states,
                            rank=None if dense else args.rank, max_duration=args.max_duration)
        model = LHSMM(config, init_data=train, seed=0)
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
