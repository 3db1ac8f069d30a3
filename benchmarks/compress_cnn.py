"""Low-rank convolutions on a small CNN trained on scikit-learn's handwritten digits.

A three-convolution CNN is trained on ``sklearn.datasets.load_digits`` (1,797 8x8 images
shipped inside scikit-learn, no download), then every convolution is compressed at 20%, 40%
and 60% parameter reduction (``param_reduction``, per layer) with each method, in the channel
decomposition (C_in -> r with the kernel, then a 1x1 convolution) and, for SVD and whitened
SVD, the spatial one (3x1 then 1x3); once with all three convolutions compressed, once with
the first one (1 input channel, 0.5% of the convolution weights) kept dense.  Reported: test
accuracy before and after a short fine-tune (the original model gets the same fine-tune),
parameters and FLOPs per image from the compression report, and CPU latency (1 thread) of a
batch of test images, timed alternately with the original.

    python benchmarks/compress_cnn.py          # writes benchmarks/compress_cnn.{json,md,png}
    python benchmarks/compress_cnn.py --quick  # tiny run (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _common import alternating_min_ms, machine_description
from torch import nn

from lorank.compress import (
    CompressConfig,
    compress,
    count_parameters,
    default_forward,
    finetune,
)
from lorank.compress.conv import conv_costs, record_input_sizes

HERE = Path(__file__).resolve().parent
# (method, conv_decomposition)
VARIANTS = [("svd", "channel"), ("randomized_svd", "channel"), ("fwsvd", "channel"),
            ("asvd", "channel"), ("whitened", "channel"), ("svd+sparse", "channel"),
            ("svd", "spatial"), ("whitened", "spatial")]
# scope name -> exclude_modules
SCOPES = {"all convolutions": None, "conv1 kept dense": ["conv1"]}


class DigitsCNN(nn.Module):
    """conv 1->w, conv w->2w, pool, conv 2w->2w, pool, linear 8w->10 (3x3 kernels, padded)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv3(h)), 2)
        return self.head(h.flatten(1))


def load_data(test_size: int, seed: int = 0):
    """(train_x, train_y, test_x, test_y): images scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    return x[train], y[train], x[test], y[test]


def batches(x, y, size: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` shuffled (images, labels) minibatches, the same for every model."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < count:
        perm = torch.randperm(len(y), generator=gen)
        out += [(x[perm[i:i + size]], y[perm[i:i + size]])
                for i in range(0, len(y) - size + 1, size)]
    return out[:count]


def ce_loss(out, batch):
    return nn.functional.cross_entropy(out, batch[1])


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--test-size", type=int, default=600)
    ap.add_argument("--latency-batch", type=int, default=256)
    ap.add_argument("--latency-repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "compress_cnn"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_steps, args.finetune_steps, args.reductions = 40, 5, [0.4]
        args.latency_repeats, args.width = 3, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    train_x, train_y, test_x, test_y = load_data(args.test_size)
    print(f"digits: {len(train_y)} training, {len(test_y)} test images", flush=True)

    model = DigitsCNN(args.width)
    finetune(model, batches(train_x, train_y, args.batch, args.train_steps, seed=1), ce_loss,
             steps=args.train_steps, lr=2e-3, clip_norm=None)
    ft_data = batches(train_x, train_y, args.batch, args.finetune_steps, seed=2)
    calib = batches(train_x, train_y, 32, args.calib_batches, seed=3)
    lat_x = test_x[:args.latency_batch]

    def tune(m):
        finetune(m, ft_data, ce_loss, steps=args.finetune_steps, lr=5e-4, clip_norm=None)
        return m

    base_acc = accuracy(model, test_x, test_y)
    base_ft_acc = accuracy(tune(copy.deepcopy(model)), test_x, test_y)
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    print(f"original: test accuracy {base_acc:.4f} ({base_ft_acc:.4f} after the same "
          f"fine-tuning); {count_parameters(model):,} parameters, {conv_params:,} in "
          f"convolution weights", flush=True)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    sizes = record_input_sizes(model, convs, lat_x[:1], default_forward)
    dense_flops = {name: conv_costs(m, sizes[name])[1] for name, m in convs.items()}
    rows = []
    grid = [(scope, reduction, method, decomposition) for scope in SCOPES
            for reduction in args.reductions for method, decomposition in VARIANTS]
    for scope, reduction, method, decomposition in grid:
        t0 = time.time()
        cfg = CompressConfig(method=method, param_reduction=reduction, layer_types=("conv",),
                             conv_decomposition=decomposition, exclude_modules=SCOPES[scope],
                             measure_latency=False)
        cm, rep = compress(model, cfg, calibration=calib, loss_fn=ce_loss,
                           example_input=lat_x[:1])
        acc = accuracy(cm, test_x, test_y)
        with torch.no_grad():
            orig_ms, ms = alternating_min_ms([lambda: model(lat_x), lambda m=cm: m(lat_x)],
                                             args.latency_repeats)
        ft_acc = accuracy(tune(cm), test_x, test_y)
        removed = sum(r.params_before - r.params_after for r in rep.layers)
        flops = {**dense_flops, **{r.name: r.flops_after for r in rep.layers}}
        row = {"scope": scope, "method": method, "decomposition": decomposition,
               "reduction": reduction, "ranks": [r.rank for r in rep.layers],
               "conv_weights": conv_params - removed,
               "conv_weights_removed": removed / conv_params,
               "params": rep.model_params_after, "conv_flops": sum(flops.values()),
               "mean_output_error": sum(r.output_error for r in rep.layers) / len(rep.layers),
               "accuracy": acc, "accuracy_finetuned": ft_acc,
               "latency_ms": ms, "original_latency_ms": orig_ms,
               "seconds": time.time() - t0}
        rows.append(row)
        print(f"{scope}, {reduction:.0%} {method:14s} {decomposition:7s} ranks {row['ranks']}: "
              f"acc {acc:.4f} -> {ft_acc:.4f}; {ms:.2f} ms ({orig_ms:.2f}) "
              f"[{row['seconds']:.1f}s]", flush=True)
    result = {
        "data": "sklearn.datasets.load_digits", "train_images": len(train_y),
        "test_images": len(test_y), "width": args.width, "train_steps": args.train_steps,
        "finetune_steps": args.finetune_steps, "batch": args.batch,
        "calibration_images": 32 * args.calib_batches, "params": count_parameters(model),
        "conv_weights": conv_params, "conv_flops": sum(dense_flops.values()), "accuracy": base_acc,
        "accuracy_finetuned": base_ft_acc, "latency_batch": len(lat_x),
        "latency_repeats": args.latency_repeats, "threads": args.threads, "rows": rows,
        "machine": machine_description(),
        "command": "python benchmarks/compress_cnn.py" + (" --quick" if args.quick else ""),
        "total_seconds": time.time() - t_start,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result) + "\n")
    plot(result, out.with_suffix(".png"))
    print(to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    w = res["width"]
    lines = [
        f"CNN (conv 1->{w}->{2 * w}->{2 * w}, 3x3, linear head; {res['params']:,} parameters, "
        f"{res['conv_weights']:,} in convolution weights, {res['conv_flops'] / 1e6:.2f} conv "
        f"MFLOPs per image) trained {res['train_steps']} Adam steps (batch {res['batch']}) on "
        f"{res['train_images']:,} digits images, test accuracy on {res['test_images']}; "
        f"calibration: {res['calibration_images']} training images; fine-tuning: "
        f"{res['finetune_steps']} Adam steps (lr 5e-4, batch {res['batch']}), the same for "
        f"every model; latency: fastest of {res['latency_repeats']} forwards of "
        f"{res['latency_batch']} test images, {res['threads']} thread, timed alternately with "
        "the original.  \"conv weights removed\" and \"conv MFLOPs\" are over all three "
        "convolutions; \"output err\" is the mean over the factorized ones of the relative "
        "output error on the calibration images.",
    ]
    for scope in SCOPES:
        lines += [
            "",
            f"**{scope}**",
            "",
            "| reduction | method | decomposition | ranks | conv weights removed | params | "
            "conv MFLOPs/image | output err | test acc | acc after fine-tune | latency ms "
            "(original) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| - | original | - | - | 0% | {res['params']:,} | "
            f"{res['conv_flops'] / 1e6:.2f} | - | {res['accuracy']:.4f} | "
            f"{res['accuracy_finetuned']:.4f} | - |",
        ]
        for r in (r for r in res["rows"] if r["scope"] == scope):
            lines.append(
                f"| {r['reduction']:.0%} | {r['method']} | {r['decomposition']} | "
                f"{'/'.join(map(str, r['ranks']))} | {100 * r['conv_weights_removed']:.1f}% | "
                f"{r['params']:,} | {r['conv_flops'] / 1e6:.2f} | "
                f"{r['mean_output_error']:.3f} | {r['accuracy']:.4f} | "
                f"{r['accuracy_finetuned']:.4f} | {r['latency_ms']:.2f} "
                f"({r['original_latency_ms']:.2f}) |")
    lines.append("")
    lines.append(f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); machine: "
                 f"{res['machine']}.")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SCOPES), 3, figsize=(15, 4.2 * len(SCOPES)), squeeze=False)
    for axrow, scope in zip(axes, SCOPES, strict=True):
        for k, (method, dec) in enumerate(VARIANTS):
            rows = [r for r in res["rows"] if r["scope"] == scope and r["method"] == method
                    and r["decomposition"] == dec]
            if not rows:
                continue
            xs = [100 * r["conv_weights_removed"] for r in rows]
            style = {"color": f"C{k}", "marker": "o", "ls": "-" if dec == "channel" else "--",
                     "label": f"{method} ({dec})"}
            axrow[0].plot(xs, [r["accuracy"] for r in rows], **style)
            axrow[1].plot(xs, [r["accuracy_finetuned"] for r in rows], **style)
            axrow[2].plot(xs, [r["latency_ms"] / r["original_latency_ms"] for r in rows],
                          **style)
        axrow[0].axhline(res["accuracy"], color="k", ls=":", label="original")
        axrow[1].axhline(res["accuracy_finetuned"], color="k", ls=":",
                         label="original, fine-tuned")
        axrow[2].axhline(1.0, color="k", ls=":")
        axrow[2].set_yscale("log", base=2)
        titles = ["test accuracy after compression", "after fine-tuning",
                  "CPU latency / original (1 thread)"]
        for ax, title in zip(axrow, titles, strict=True):
            ax.set_xlabel("convolution weights removed (%)")
            ax.set_title(f"{scope}: {title}", fontsize=10)
        axrow[0].set_ylabel("accuracy")
        axrow[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
