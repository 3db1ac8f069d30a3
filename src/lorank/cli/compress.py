"""``lorank compress``: compress a model directory and write the result, report included.

``lorank compress MODEL_DIR -o OUT --method whitened --param-reduction 0.4 --calib-text
sentences.txt``.  The output directory must lie outside the input and be new or empty
(``--overwrite`` replaces a previous compress output; a training run is never replaced).

Inputs understood:

* a Hugging Face model directory (``config.json`` + weights; sentence-transformers
  directories too): loaded offline with ``transformers.<auto-class>.from_pretrained``;
  calibration text is tokenized with the directory's tokenizer.  The output directory holds
  the compressed weights, ``lorank_compress.json``, the report, and every non-weight file of
  the input (configs, tokenizer), so ``lorank.compress.load_compressed(OUT)`` rebuilds it.
* a lorank checkpoint (``lorank train``'s run directory or a ``.safetensors`` checkpoint
  file).  For a neural HMM (``lorank.nn.NeuralHMM``, e.g. the dense ``hmm`` language model)
  ``--rank R`` replaces its transition by a rank-R nonnegative factorization
  (:func:`lorank.compress.compress_hmm`); other lorank models get the layer compression
  selected by the options.  ``lorank eval OUT`` / ``lorank sample OUT`` use the result and
  ``lorank.tasks.load_run(OUT)`` rebuilds it.

``--method trp`` / ``--method maestro`` (lorank checkpoints only) make the selected layers
low-rank while fine-tuning on the run's own training data (``--steps`` AdamW steps), with
TRP (``--rank`` or ``--energy``) or Maestro (``--rank``: the prefix kept after training),
and report the validation metric before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from lorank._io import atomic_write_bytes, atomic_write_json
from lorank.compress.config import DATA_AWARE, LAYER_TYPES, METHODS, CompressConfig
from lorank.compress.core import compress, count_parameters, output_tensor
from lorank.compress.finetune import finetune
from lorank.compress.hmm import compress_hmm
from lorank.compress.io import META as COMPRESS_META
from lorank.compress.io import REPORT as COMPRESS_REPORT
from lorank.compress.io import WEIGHTS as COMPRESS_WEIGHTS
from lorank.compress.io import save_compressed
from lorank.compress.trainable import Maestro, MaestroConfig, TRPConfig, train_low_rank
from lorank.nn.hmm import NeuralHMM
from lorank.tasks import load_run
from lorank.tasks.base import Task
from lorank.train.checkpoint import CHECKPOINT_NAME, FORMAT_VERSION
from lorank.train.distributed import DistContext, resolve_device
from lorank.train.trainer import TrainConfig, Trainer

__all__ = ["add_parser", "run"]

#: the files lorank compress writes (the model's, the structure, the reports)
_OWN_OUTPUTS = (COMPRESS_WEIGHTS, COMPRESS_META, COMPRESS_REPORT, "compress_report.md",
                "train_low_rank.json")

#: methods that fine-tune (lorank.compress.trainable); the others factorize in one shot
TRAINABLE = ("trp", "maestro")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", help="Hugging Face / sentence-transformers model directory, or a "
                                 "lorank checkpoint (run directory or .safetensors file)")
    p.add_argument("-o", "--out", required=True,
                   help="output directory: new or empty (see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous lorank compress output in --out")
    p.add_argument("--method", default="svd", choices=METHODS + TRAINABLE,
                   help="factorization (default svd); trp and maestro fine-tune a lorank run")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="fixed rank for every matrix")
    g.add_argument("--param-reduction", type=float,
                   help="fraction of each matrix's weights removed (0.4: keep <= 60%%)")
    g.add_argument("--energy", type=float, help="fraction of squared singular values kept")
    g.add_argument("--budget-reduction", type=float,
                   help="fraction of all selected weights removed, ranks allocated by "
                        "measured sensitivity")
    p.add_argument("--target", nargs="+", default=None,
                   help="module names (or name suffixes) to compress; default: all")
    p.add_argument("--target-regex", default=None, help="regex over full module names")
    p.add_argument("--exclude", nargs="+", default=None, help="module names to skip")
    p.add_argument("--layer-types", nargs="+", choices=LAYER_TYPES, default=["linear"],
                   help="layer types to compress (default: linear)")
    p.add_argument("--rnn-matrices", nargs="+", choices=["ih", "hh"], default=["ih", "hh"])
    p.add_argument("--rnn-granularity", choices=["stacked", "per_gate"], default="stacked")
    p.add_argument("--conv-decomposition", choices=["channel", "spatial", "auto"],
                   default="channel",
                   help="convolutions: channel (C_in -> r with the kernel, then 1x1), spatial "
                        "(k x 1 then 1 x k), or auto (per layer, the smaller weight error at "
                        "--param-reduction, the fewer parameters at --energy)")
    p.add_argument("--calib-text", default=None,
                   help="text file, one calibration example per line (needed by "
                        f"{', '.join(sorted(DATA_AWARE))})")
    p.add_argument("--calib-samples", type=int, default=128, help="lines used (default 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per calibration line")
    p.add_argument("--auto-class", default="AutoModel",
                   help="transformers auto class used to load the model (default AutoModel)")
    p.add_argument("--sparse-density", type=float, default=0.01,
                   help="svd+sparse: fraction of the entries kept in S")
    p.add_argument("--dict-sparsity", type=float, nargs="+", default=[0.5],
                   help="cospadi: candidate nonzeros-per-atom ratios s/k")
    p.add_argument("--dict-nm", type=int, nargs=2, default=[2, 4], metavar=("N", "M"),
                   help="dsformer: N nonzeros in every M consecutive atoms")
    p.add_argument("--dict-iters", type=int, default=6, help="dictionary update sweeps")
    p.add_argument("--no-lowrank-fallback", action="store_true",
                   help="cospadi: do not also try the low-rank solution at the same storage")
    p.add_argument("--share-dictionary", default=None,
                   help="regex over layer names: layers whose match captures the same groups "
                        "share one dictionary")
    t = p.add_argument_group("fine-tuning a lorank run (--method trp|maestro, or after an HMM "
                             "run's transition is factorized)")
    t.add_argument("--steps", type=int, default=None,
                   help="fine-tuning steps on the run's training split (default: 200 for trp "
                        "and maestro, none after an HMM fit)")
    t.add_argument("--hmm-fit", choices=["kl", "frobenius"], default="kl",
                   help="an HMM run's transition: positive rank-R factorization by row KL "
                        "(default) or Frobenius error")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    t.add_argument("--train-batch-size", type=int, default=64,
                   help="sequences per fine-tuning batch")
    t.add_argument("--max-tokens", type=int, default=4096,
                   help="padded units per fine-tuning / evaluation batch")
    t.add_argument("--device", default="auto",
                   help="where to fine-tune: auto (a GPU when present), cpu, cuda, cuda:N")
    d_trp, d_mae = TRPConfig(rank=1), MaestroConfig()
    t.add_argument("--trp-period", type=int, default=d_trp.period,
                   help="trp: steps between projections")
    t.add_argument("--nuclear-weight", type=float, default=d_trp.nuclear_weight,
                   help="trp: weight of the nuclear-norm subgradient")
    t.add_argument("--maestro-sampler", choices=["single", "independent"],
                   default=d_mae.sampler, help="maestro: ordered-dropout sampler")
    t.add_argument("--group-lasso", type=float, default=d_mae.group_lasso,
                   help="maestro: hierarchical group-lasso weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compress`` on an ``argparse`` subparsers object; returns the parser (its
    ``func`` default is :func:`run`)."""
    p = subparsers.add_parser("compress", help="low-rank compression of a trained model",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run)
    return p


def _selection_from_args(args) -> dict:
    """The layer-selection fields shared by every compression config."""
    return dict(target_modules=args.target_regex or args.target, exclude_modules=args.exclude,
                layer_types=tuple(args.layer_types), rnn_matrices=tuple(args.rnn_matrices),
                rnn_granularity=args.rnn_granularity)


def _config_from_args(args) -> CompressConfig:
    return CompressConfig(
        method=args.method, rank=args.rank, param_reduction=args.param_reduction,
        energy=args.energy, budget_reduction=args.budget_reduction, **_selection_from_args(args),
        conv_decomposition=args.conv_decomposition,
        sparse_density=args.sparse_density, seed=args.seed,
        dict_sparsity=tuple(args.dict_sparsity), dict_nm=tuple(args.dict_nm),
        dict_iters=args.dict_iters, dict_lowrank_fallback=not args.no_lowrank_fallback,
        share_dictionary=args.share_dictionary,
        measure_latency=not args.no_latency, inplace=True,
    )


def _trainable_config_from_args(args) -> TRPConfig | MaestroConfig:
    """The TRP / Maestro config of ``--method trp|maestro`` and the layer-selection options."""
    if args.param_reduction is not None or args.budget_reduction is not None:
        raise ValueError(f"--method {args.method} takes --rank (or, for trp, --energy)")
    sel = _selection_from_args(args)
    if args.method == "trp":
        return TRPConfig(rank=args.rank, energy=args.energy, period=args.trp_period,
                         nuclear_weight=args.nuclear_weight, **sel)
    if args.energy is not None:
        raise ValueError("--method maestro takes --rank (the prefix kept), not --energy")
    return MaestroConfig(sampler=args.maestro_sampler, group_lasso=args.group_lasso,
                         seed=args.seed, inplace=True, **sel)


class _RunTraining:
    """A lorank run's training split as fine-tuning data (the task's batches and loss) and
    its validation metric, on the model's device."""

    def __init__(self, args, task: Task, model: torch.nn.Module):
        self.args, self.task = args, task
        self.device = next(model.parameters()).device
        self.trainer = Trainer(task, TrainConfig(batch_size=args.train_batch_size,
                                                 max_tokens=args.max_tokens, progress=False),
                               DistContext(device=self.device))
        self.data = list(task.batches("train", batch_size=args.train_batch_size,
                                      max_tokens=args.max_tokens, shuffle=True,
                                      seed=args.seed))

    def valid(self, model: torch.nn.Module) -> float:
        return self.trainer.evaluate("valid", model)[self.task.metric]

    def loss(self, nll: torch.Tensor, batch) -> torch.Tensor:
        return nll / self.task.count(batch)

    def forward(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return self.task.nll(model, self.task.to_device(batch, self.device), None)

    def kwargs(self, steps: int) -> dict:
        """Keyword arguments of :func:`finetune` / :func:`train_low_rank`."""
        return dict(steps=steps, lr=self.args.lr, forward_fn=self.forward,
                    log_every=max(steps // 10, 1),
                    log=lambda line: print(line, file=sys.stderr))


def _train_lorank(args, task: Task, model: torch.nn.Module, config: TRPConfig | MaestroConfig):
    """Fine-tune a lorank run's model with TRP / Maestro on its training split; returns
    ``(model, report, info)`` with the validation metric before and after."""
    if isinstance(config, MaestroConfig) and args.rank is not None:
        # the prefix kept must fit every selected matrix: say so before training, not after
        Maestro(model, dataclasses.replace(config, rank=args.rank, inplace=False))
    run = _RunTraining(args, task, model)
    steps = 200 if args.steps is None else args.steps
    before, params_before = run.valid(model), count_parameters(model)
    torch.manual_seed(args.seed)
    small, report, losses = train_low_rank(
        model, run.data, run.loss, config,
        rank=args.rank if args.method == "maestro" else None, **run.kwargs(steps))
    after = run.valid(small)
    info = {"method": args.method, "steps": steps, "lr": args.lr,
            "params_before": params_before, "params_after": count_parameters(small),
            f"valid_{task.metric}_before": before, f"valid_{task.metric}_after": after,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}
    return small.cpu(), report, info


def _compress_hmm_run(args, task: Task, model: NeuralHMM) -> tuple[NeuralHMM, dict]:
    """Rank-R factorization of a trained HMM's transition (``--hmm-fit``), then ``--steps``
    of fine-tuning on the run's training split if asked; info with the validation metric
    of the source, of the fit, and after fine-tuning."""
    if args.rank is None:
        raise ValueError("a lorank HMM run takes --rank R: the rank of the nonnegative "
                         "factorization of its transition")
    run = _RunTraining(args, task, model) if args.steps else None
    before = run.valid(model) if run else None
    model, info = compress_hmm(model, args.rank, loss=args.hmm_fit, inplace=True)
    info["fit"] = args.hmm_fit
    if run:
        info[f"valid_{task.metric}_before"] = before
        info[f"valid_{task.metric}_fit"] = run.valid(model)
        torch.manual_seed(args.seed)
        losses = finetune(model, run.data, run.loss, **run.kwargs(args.steps))
        info.update({"finetune_steps": args.steps, "lr": args.lr,
                     f"valid_{task.metric}_after": run.valid(model),
                     "first_loss": losses[0], "last_loss": losses[-1]})
    return model.cpu().eval(), info


def _read_lines(path: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"--calib-text {path} has no non-empty line")
    return lines[:n]


def _random_projection_loss(seed: int):
    """Fisher proxy for models without a loss: ``<output, z>`` for a fixed Gaussian z; its
    squared gradients estimate diag(J^T J), the Fisher information of a Gaussian output."""
    cache: dict[tuple, torch.Tensor] = {}

    def loss_fn(out, batch):
        t = output_tensor(out)
        key = tuple(t.shape)
        if key not in cache:
            g = torch.Generator().manual_seed(seed)
            cache[key] = torch.randn(t.shape, generator=g).to(t)
        return (t * cache[key]).sum() / t.shape[0]

    return loss_fn


def _hf_inputs(args):
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("lorank compress: loading a Hugging Face directory needs "
                         "`pip install transformers`") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto = getattr(transformers, args.auto_class, None)
    if auto is None:
        raise SystemExit(f"lorank compress: transformers has no {args.auto_class}")
    model = auto.from_pretrained(args.model)
    model.eval()
    calib = None
    if args.calib_text:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        lines = _read_lines(args.calib_text, args.calib_samples)
        calib = []
        for i in range(0, len(lines), args.batch_size):
            enc = tok(lines[i:i + args.batch_size], padding=True, truncation=True,
                      max_length=args.max_length, return_tensors="pt")
            calib.append(dict(enc))
    return model, calib, {"kind": "hf", "auto_class": args.auto_class}


def _is_lorank_checkpoint(src: Path) -> bool:
    if src.is_file():
        return src.suffix == ".safetensors"
    return not (src / "config.json").is_file() and any(
        (src / n).is_file() for n in ("model.safetensors", "checkpoint.safetensors"))


def _output_problem(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` may not receive a compressed model, or None: it must be new or empty, or
    (with ``--overwrite``) a previous ``lorank compress`` output; never a training run."""
    if out.exists() and not out.is_dir():
        return f"the output {out} is a file; -o names a directory"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if (out / CHECKPOINT_NAME).exists() or (out / "metrics.json").exists():
        return (f"the output {out} holds a training run ({CHECKPOINT_NAME} / metrics.json): "
                f"writing there would replace its model; choose another -o")
    if not overwrite:
        return (f"the output {out} is not empty; choose a new directory, or pass --overwrite "
                f"to replace a previous lorank compress output there")
    if not (out / COMPRESS_META).exists():
        return (f"the output {out} is not a previous lorank compress output (no "
                f"{COMPRESS_META}); --overwrite replaces only those")
    return None


def _same_place(a: Path, b: Path) -> bool:
    """Whether ``b`` is ``a`` or lies inside it (or the reverse)."""
    ra, rb = a.resolve(), b.resolve()
    ra = ra.parent if ra.is_file() else ra
    return ra == rb or ra in rb.parents or rb in ra.parents


def _run_lorank(args, src: Path, config: CompressConfig | TRPConfig | MaestroConfig):
    trainable = not isinstance(config, CompressConfig)
    needs_data = trainable or bool(args.steps)  # an HMM fit fine-tunes with --steps
    device = resolve_device(args.device) if needs_data else "cpu"
    task, model, meta = load_run(src, data=needs_data, device=device)
    base = {"kind": "lorank", "format_version": FORMAT_VERSION, "task": task.name,
            "data_config": task.data_config.to_dict(),
            "model_config": task.model_config.to_dict(),
            "task_meta": meta.get("task_meta", {})}
    if args.calib_text:
        raise ValueError("--calib-text is for Hugging Face directories; use the Python API "
                         "(calibration=...) for lorank models")
    if trainable:
        return _train_lorank(args, task, model, config) + (base,)
    if isinstance(model, NeuralHMM):
        model, info = _compress_hmm_run(args, task, model)
        return model, None, info, base
    if args.steps:
        raise ValueError("--steps fine-tunes with --method trp|maestro or after an HMM run's "
                         "transition fit; after a one-shot layer compression use "
                         "lorank.compress.finetune")
    if config.data_aware:
        raise ValueError(f"--method {config.method} needs calibration data: use the Python "
                         f"API for lorank models")
    model, report = compress(model, config)
    return model, report, None, base


def run(args) -> int:
    """Run ``lorank compress`` for parsed ``args``; returns the exit code."""
    src = Path(args.model)
    lorank_ckpt = src.exists() and _is_lorank_checkpoint(src)
    if not lorank_ckpt and not src.is_dir():
        print(f"lorank compress: {src} is not a model directory or checkpoint",
              file=sys.stderr)
        return 2
    if not lorank_ckpt and not (src / "config.json").is_file():
        print(f"lorank compress: {src} has no config.json (not a model directory)",
              file=sys.stderr)
        return 2
    if _same_place(src, Path(args.out)):
        print(f"lorank compress: the output {args.out} is (inside) the input {src}: writing "
              f"there would overwrite the trained model; choose another -o", file=sys.stderr)
        return 2
    problem = _output_problem(Path(args.out), args.overwrite)
    if problem:
        print(f"lorank compress: {problem}", file=sys.stderr)
        return 2
    if args.overwrite:  # an earlier output's own files go, so none of them is left stale
        for name in _OWN_OUTPUTS:
            (Path(args.out) / name).unlink(missing_ok=True)
    try:
        if args.method in TRAINABLE:
            if not lorank_ckpt:
                raise ValueError(f"--method {args.method} fine-tunes on a lorank run's training "
                                 f"data; for other models use lorank.compress.train_low_rank")
            config = _trainable_config_from_args(args)
        else:
            config = _config_from_args(args)
        if lorank_ckpt:
            model, report, info, base = _run_lorank(args, src, config)
            out = Path(args.out)
            save_compressed(model, out, report, base=base)
            if info is not None:  # the HMM factorization's report, or the fine-tuning's
                name = "compress_report.json" if report is None else "train_low_rank.json"
                atomic_write_json(out / name, info)
            if report is not None:
                atomic_write_bytes(out / "compress_report.md", (report.table() + "\n").encode())
                print(report.to_json() if args.json else report.table())
            if info is not None:
                print(json.dumps(info, indent=2))
            print(f"wrote {out}", file=sys.stderr)
            return 0
        model, calib, base = _hf_inputs(args)
        if config.data_aware and calib is None:
            raise ValueError(f"--method {config.method} needs --calib-text")
        loss_fn = _random_projection_loss(args.seed) if config.method == "fwsvd" else None
        if loss_fn is not None:
            inner = loss_fn

            def loss_fn(out, batch):  # a model loss when the head computes one
                if getattr(out, "loss", None) is not None:
                    return out.loss
                return inner(out, batch)
        model, report = compress(model, config, calibration=calib, loss_fn=loss_fn)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        print(f"lorank compress: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.rglob("*"):
        rel = item.relative_to(src)
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and \
                not rel.parts[0].startswith("."):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest)
    save_compressed(model, out, report, base=base)
    atomic_write_bytes(out / "compress_report.md", (report.table() + "\n").encode())
    print(report.to_json() if args.json else report.table())
    print(f"wrote {out}", file=sys.stderr)
    return 0
