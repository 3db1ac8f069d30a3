"""The generic training loop: AdamW, gradient clipping, reduce-on-plateau, periodic evaluation,
atomic resumable checkpoints, ``metrics.json``, and data parallelism over processes.

Determinism and data parallelism.  One optimizer step consumes ``accumulate x world_size``
consecutive batches of the global (seeded, per-epoch) batch list: rank r's micro-batch m of a
step is global batch ``(step * accumulate + m) * world_size + r``.  Each micro-batch draws its
training randomness (state/feature dropout) from a generator seeded by
``(seed, step, m * world_size + r)``, and its loss is scaled by the step's *global* unit count,
so a step's gradient is the gradient of ``sum NLL / units`` over the whole global batch.
Hence ``world_size=2, accumulate=1`` and ``world_size=1, accumulate=2`` take the same steps up
to float error when each epoch's batch count is a multiple of ``accumulate x world_size``
(otherwise the two settings drop different leftover batches at the end of an epoch), and a
resumed run (which skips the batches already used in the current epoch) takes exactly the
steps an uninterrupted run would.

Run directories.  While training, the main process holds ``RUN/.lock`` (a second run into the
same directory fails at once) and first removes temporary files a killed run left behind.
Without a terminal, progress is a log line every ``log_every`` seconds.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorank.config import Config, option
from lorank.train.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    load_checkpoint,
    model_state,
    optimizer_from_flat,
    restore_rng,
    save_checkpoint,
)
from lorank.train.distributed import DistContext
from lorank.train.metrics import Throughput, write_metrics
from lorank.train.rundir import RunLock, remove_orphans

if TYPE_CHECKING:  # the protocol the trainer calls; tasks live above this package
    from lorank.tasks.base import Task


@dataclass(frozen=True)
class TrainConfig(Config):
    """Options of the training loop (the task's configs hold the data and model options)."""

    out: str | None = option(None, "output directory (default runs/<model>; the main job: "
                                   "runs/main)")
    epochs: int = option(1, "passes over the training data")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    max_seconds: float | None = option(None, "stop once training (evaluation excluded) has "
                                             "taken this many seconds")
    batch_size: int = option(1024, "sequences per batch and process (--max-tokens binds first "
                                   "for all but the shortest sequences)")
    max_tokens: int | None = option(4096, "cap on padded units (sequences x longest) per batch")
    eval_batch_size: int | None = option(None, "batch size of evaluation (default "
                                               "--batch-size)", compute_only=True)
    eval_max_tokens: int | None = option(None, "cap of evaluation batches (default "
                                               "--max-tokens)", compute_only=True)
    accumulate: int = option(1, "batches per optimizer step (per process)")
    lr: float = option(1e-2, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(5.0, "gradient-norm clipping")
    schedule: str = option("plateau", "learning-rate schedule: plateau (multiply by --lr-factor "
                                      "after --patience evaluations without improvement) or "
                                      "linear (from --lr to --min-lr over the run's steps)",
                           choices=("plateau", "linear"))
    lr_factor: float = option(0.5, "reduce-on-plateau factor")
    patience: int = option(1, "evaluations without improvement before the lr is reduced")
    min_lr: float = option(1e-5, "smallest learning rate of the schedule")
    eval_per_epoch: int = option(4, "evaluations per epoch")
    eval_every: int | None = option(None, "steps between evaluations (overrides "
                                          "--eval-per-epoch)")
    eval_test: bool = option(True, "evaluate the best model on the test split at the end",
                             flag="--test", compute_only=True)
    checkpoint_every: int | None = option(None, "also checkpoint every this many steps",
                                          compute_only=True)
    seed: int = option(0, "random seed (initialization, batch order, dropout)")
    resume: bool = option(False, "continue the run in --out (its own settings are reused)",
                          compute_only=True)
    overwrite: bool = option(False, "start over even if --out holds a checkpoint",
                             compute_only=True)
    device: str = option("auto", "auto (cuda if present), cpu, cuda, cuda:1", compute_only=True)
    progress: bool = option(True, "progress bar (on a terminal) and periodic log lines",
                            compute_only=True)
    threads: int | None = option(None, "torch CPU threads", compute_only=True)
    log_every: float = option(30.0, "seconds between log lines when stderr is not a terminal",
                              compute_only=True)

    def __post_init__(self) -> None:
        self._positive_int("epochs", "batch_size", "accumulate", "eval_per_epoch", "patience")
        self._positive_int("max_steps", "max_tokens", "eval_batch_size", "eval_max_tokens",
                           "eval_every", "checkpoint_every", "threads", optional=True)
        self._positive_float("lr", "clip", "min_lr", "log_every")
        self._positive_float("max_seconds", optional=True)
        self._choice("schedule", ("plateau", "linear"))
        self._probability("lr_factor")
        if not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            raise self._error("weight_decay", f"weight_decay must be >= 0, got "
                                              f"{self.weight_decay!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise self._error("seed", f"seed must be an integer, got {self.seed!r}")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  #: optimizer steps done in the current epoch
    best: float | None = None
    best_step: int | None = None
    units: float = 0.0  #: training units (global) seen
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    #: training NLL and units since the last evaluation: this process's share while training;
    #: in a checkpoint, the global sums (read back by rank 0, the others start from 0)
    window_nll: float = 0.0
    window_units: float = 0.0
    window_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def check_resumable(meta: dict[str, Any], task: Task, path: Path | str) -> None:
    """Raise unless the checkpoint ``meta`` was written by the same task with the same data
    and model settings; the error names the fields that differ (compute-only ones may)."""
    if meta.get("task") != task.name:
        raise ValueError(f"cannot resume {str(path)!r}: it is a {meta.get('task')!r} run, not "
                         f"{task.name!r}")
    for key in ("data_config", "model_config"):
        mine = getattr(task, key)
        theirs = type(mine).from_dict(meta[key])
        diff = mine.differences(theirs)
        if diff:
            shown = ", ".join(f"{f}: {getattr(theirs, f)!r} in the run, {getattr(mine, f)!r} now"
                              for f in diff)
            raise ValueError(f"cannot resume {str(path)!r} with different settings ({shown}); "
                             f"resume without these options, or start a new run (--out)")


def step_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one micro-batch's training randomness (see the module docstring)."""
    key = ((seed * 1_000_003 + step) * 1_009 + index) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


class _NLLModule(nn.Module):
    """``(batch, generator) -> summed NLL``: what DistributedDataParallel wraps."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch, generator):
        return self.task.nll(self.model, batch, generator)


class Trainer:
    """Train ``task``'s model with ``config``; :meth:`fit` returns the final metrics.

    ``model``: train this module (e.g. a compressed model being fine-tuned) instead of
    ``task.build_model()``.

    With ``dist`` None the context comes from torchrun's environment variables
    (:meth:`DistContext.from_env`).  Only rank 0 writes files and shows progress.
    """

    def __init__(self, task: Task, config: TrainConfig, dist: DistContext | None = None,
                 model: nn.Module | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.task = task
        self.config = config
        self.dist = dist
        self.model: nn.Module | None = None
        self._given_model = model  # train this model instead of task.build_model()
        self.state = TrainState()
        self._lock: RunLock | None = None
        self.out = Path(config.out or f"runs/{task.model_name()}")

    # ---- set-up ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "data_config": self.task.data_config.to_dict(),
            "model_config": self.task.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "task_meta": self.task.metadata(),
            "state": asdict(self.state),
            "summary": self.task.summary(self.model),
        }

    def setup(self) -> None:
        """Lock the run directory, load data, build model and optimizer (resume if asked)."""
        try:
            self._setup()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self) -> None:
        cfg = self.config
        if self.dist is None:
            self.dist = DistContext.from_env(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        ckpt = self.out / CHECKPOINT_NAME
        if self.dist.is_main:
            self._lock = RunLock(self.out).acquire()
            removed = remove_orphans(self.out)
            if removed:
                tqdm.write(f"removed {len(removed)} temporary file(s) a stopped run left in "
                           f"{self.out}: {', '.join(removed)}")
        if ckpt.exists() and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(
                f"{str(ckpt)!r} exists: pass --resume to continue that run, --overwrite to "
                f"start over, or choose another --out"
            )
        torch.manual_seed(cfg.seed)
        self.task.load_data()
        model = self.task.build_model() if self._given_model is None else self._given_model
        self.model = model.to(self.dist.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.patience,
            min_lr=cfg.min_lr,
        )
        self.best_state: dict[str, torch.Tensor] | None = None
        if cfg.resume and ckpt.exists():
            self._load(ckpt)
        elif cfg.resume:
            raise FileNotFoundError(f"resume: no checkpoint at {str(ckpt)!r} to continue")
        module = _NLLModule(self.model, self.task)
        if self.dist.distributed:
            ids = [self.dist.device] if self.dist.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.module = module

    def _load(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path, device=self.dist.device)
        check_resumable(meta, self.task, path)
        self.task.check_metadata(meta)
        version = int(meta.get("format_version", 1))
        self.model.load_state_dict(self.task.upgrade_state(model_state(tensors), version))
        self.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.state = TrainState(**meta["state"])
        if self.dist.rank != 0:  # the stored window is global: count it once
            self.state.window_nll = self.state.window_units = 0.0
        restore_rng(tensors)
        best = self.out / BEST_NAME
        if best.exists():
            bt, bmeta = load_checkpoint(best)
            self.best_state = self.task.upgrade_state(model_state(bt),
                                                      int(bmeta.get("format_version", 1)))

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, model: nn.Module | None = None) -> dict[str, float]:
        """``{"nll", "units", <metric>}`` of ``split`` (sharded over ranks, summed)."""
        model = self.model if model is None else model
        cfg, d = self.config, self.dist
        was_training = model.training
        model.eval()
        nll, units = 0.0, 0
        batches = self.task.batches(
            split,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            max_tokens=cfg.eval_max_tokens or cfg.max_tokens,
            shuffle=False,
            rank=d.rank,
            world_size=d.world_size,
        )
        for batch in batches:
            units += self.task.count(batch)
            nll += float(self.task.nll(model, self.task.to_device(batch, d.device), None))
        model.train(was_training)
        tot_nll, tot_units = d.all_reduce_sum([nll, units]).tolist()
        return {
            "nll": tot_nll,
            "units": int(tot_units),
            self.task.metric: self.task.metric_value(tot_nll, int(tot_units)),
        }

    # ---- training --------------------------------------------------------------------------
    def _train_batches(self, epoch: int):
        d, cfg = self.dist, self.config
        return self.task.batches(
            "train",
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            shuffle=True,
            seed=cfg.seed + epoch,
            rank=d.rank,
            world_size=d.world_size,
        )

    def _step(self, micro: list) -> tuple[float, float]:
        """One optimizer step on this rank's micro-batches; returns (local NLL, global
        units)."""
        d, cfg, st = self.dist, self.config, self.state
        counts = [self.task.count(b) for b in micro]
        total = float(d.all_reduce_sum([sum(counts)])[0])
        self.model.train()
        local_nll = 0.0
        for m, batch in enumerate(micro):
            gen = step_generator(cfg.seed, st.step, m * d.world_size + d.rank)
            batch = self.task.to_device(batch, d.device)
            sync = m == len(micro) - 1 or not d.distributed
            ctx = contextlib.nullcontext() if sync else self.module.no_sync()
            with ctx:
                with self._divergence_hint():
                    nll = self.module(batch, gen)
                if not torch.isfinite(nll):
                    raise FloatingPointError(
                        f"non-finite training loss {float(nll)} at step {st.step} (micro-batch "
                        f"{m}); lower --lr or check the data"
                    )
                (nll * (d.world_size / total)).backward()
            local_nll += float(nll.detach())
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return local_nll, total

    @contextlib.contextmanager
    def _divergence_hint(self):
        """Turn the input checks' complaint about non-finite model outputs (parameters that
        training made NaN/inf) into a FloatingPointError that says what to change."""
        try:
            yield
        except ValueError as e:
            if "NaN" not in str(e) and "inf" not in str(e):
                raise
            raise FloatingPointError(
                f"training diverged at step {self.state.step}: {e}; the parameters are no longer "
                f"finite: lower --lr (now {self.config.lr:g}) or raise --clip"
            ) from e

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _after_eval(self, val: dict[str, float], bar) -> None:
        st, d = self.state, self.dist
        metric = self.task.metric
        value = val[metric]
        if self.config.schedule == "plateau":
            self.scheduler.step(value)
        window = d.all_reduce_sum([st.window_nll, st.window_units]).tolist()
        train_value = self.task.metric_value(window[0], int(window[1])) if window[1] else None
        window_steps = st.window_steps
        st.window_nll = st.window_units = 0.0
        st.window_steps = 0
        improved = st.best is None or value < st.best
        if improved:
            st.best, st.best_step = value, st.step
            self.best_state = {k: v.detach().cpu().clone()
                               for k, v in self.model.state_dict().items()}
        rate = st.units / st.train_seconds if st.train_seconds > 0 else 0.0
        st.history.append({
            "step": st.step,
            "epoch": st.epoch + st.batch_in_epoch / max(1, self._steps_per_epoch),
            f"val_{metric}": value,
            f"train_{metric}": train_value,
            "train_window_steps": window_steps,
            "train_seconds": st.train_seconds,
            "lr": self.optimizer.param_groups[0]["lr"],
            f"{self.task.unit}_per_s": rate,
        })
        if d.is_main:
            tqdm.write(
                f"step {st.step}: val {metric} {value:.2f}"
                + (f", train {metric} {train_value:.2f} (last {window_steps} steps)"
                   if train_value is not None else "")
                + f", {self.task.unit}/s {rate:,.0f}, lr {self.optimizer.param_groups[0]['lr']:.2g}"
                + (" *" if improved else "")
            )
            sys.stdout.flush()
            if improved:
                save_checkpoint(self.out / BEST_NAME, self.model, self._meta(), rng=False)
            self._save()
            write_metrics(self.out, self.metrics())
        bar.set_postfix({f"val_{metric}": f"{value:.1f}"})

    def _save(self, window: list[float] | None = None) -> None:
        """Write the resumable checkpoint; ``window``: the global (NLL, units) of the current
        training window when it is not empty (every rank must have summed it)."""
        meta = self._meta()
        if window is not None:
            meta["state"]["window_nll"], meta["state"]["window_units"] = window
        save_checkpoint(self.out / CHECKPOINT_NAME, self.model, meta, self.optimizer,
                        self.scheduler)

    def metrics(self, test: dict[str, float] | None = None) -> dict[str, Any]:
        st, metric = self.state, self.task.metric
        out = dict(self.task.summary(self.model))
        out.update({
            "task": self.task.name,
            "metric": metric,
            f"val_{metric}": st.best,
            f"last_val_{metric}": st.history[-1][f"val_{metric}"] if st.history else None,
            "best_step": st.best_step,
            f"{self.task.unit}_per_s": st.units / st.train_seconds if st.train_seconds else 0.0,
            "steps": st.step,
            "epochs": st.epoch + st.batch_in_epoch / max(1, self._steps_per_epoch),
            "train_seconds": st.train_seconds,
            "eval_seconds": st.eval_seconds,
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
            "history": st.history,
            "data_config": self.task.data_config.to_dict(),
            "model_config": self.task.model_config.to_dict(),
            "train_config": self.config.to_dict(),
        })
        if test is not None:
            out[f"test_{metric}"] = test[metric]
        return out

    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; evaluate; return the metrics."""
        if self.model is None:
            self.setup()
        try:
            return self._fit()
        finally:
            self._release()

    def _fit(self) -> dict[str, Any]:
        cfg, st, d = self.config, self.state, self.dist
        acc = cfg.accumulate
        self._steps_per_epoch = len(self._train_batches(0)) // acc
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"the training split has fewer batches per process than accumulate={acc}"
            )
        total = cfg.epochs * self._steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        eval_every = cfg.eval_every or max(1, self._steps_per_epoch // cfg.eval_per_epoch)
        bar = tqdm(total=total, initial=min(st.step, total), unit="step", dynamic_ncols=True,
                   disable=True if not (cfg.progress and d.is_main) else None,
                   leave=False)  # None: no bar off a terminal
        thr = Throughput(st.units, st.train_seconds)
        log = _LogLines(cfg.log_every if cfg.progress and d.is_main and bar.disable else None)
        if d.is_main and cfg.progress:
            tqdm.write(f"training {self.task.model_name()} ({self.task.name}): steps "
                       f"{st.step + 1}..{total}, evaluation every {eval_every} steps -> "
                       f"{self.out}")
        out_of_time = False
        while st.step < total and not out_of_time:
            it = iter(self._train_batches(st.epoch))
            for _ in range(st.batch_in_epoch * acc):  # resume inside an epoch
                next(it)
            while st.batch_in_epoch < self._steps_per_epoch and st.step < total:
                micro = [next(it) for _ in range(acc)]
                if cfg.schedule == "linear":
                    self._set_lr(cfg.lr + (cfg.min_lr - cfg.lr) * st.step / max(1, total - 1))
                thr.start()
                local_nll, units = self._step(micro)
                thr.stop(units)
                st.step += 1
                st.batch_in_epoch += 1
                st.units, st.train_seconds = thr.units, thr.seconds
                st.window_nll += local_nll
                st.window_units += units / d.world_size  # summed over ranks at evaluation
                st.window_steps += 1
                end_epoch = st.batch_in_epoch == self._steps_per_epoch
                out_of_time = cfg.max_seconds is not None and st.train_seconds >= cfg.max_seconds
                due = (st.batch_in_epoch % eval_every == 0 or end_epoch or st.step == total
                       or out_of_time)
                if end_epoch:
                    st.epoch += 1
                    st.batch_in_epoch = 0
                bar.update(1)
                bar.set_postfix({f"{self.task.unit}/s": f"{thr.rate:,.0f}",
                                 "loss": f"{local_nll / max(units / d.world_size, 1):.3f}"})
                if due:
                    t0 = time.perf_counter()
                    with self._divergence_hint():
                        val = self.evaluate("valid")
                    st.eval_seconds += time.perf_counter() - t0
                    self._after_eval(val, bar)
                elif cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                    window = d.all_reduce_sum([st.window_nll, st.window_units]).tolist()
                    if d.is_main:
                        self._save(window)
                if log.due():
                    log.write(f"step {st.step}/{total} (epoch {st.epoch + 1}): loss "
                              f"{local_nll / max(units / d.world_size, 1):.3f}, "
                              f"{self.task.unit}/s {thr.rate:,.0f}")
                if end_epoch or out_of_time:
                    break
        bar.close()
        if not st.history:  # resumed a finished run: evaluate once for the record
            self._after_eval(self.evaluate("valid"), bar)
        test = None
        if cfg.eval_test:
            model = self.model
            if self.best_state is not None:  # the best model: same modules, best weights
                model = copy.deepcopy(self.model)
                model.load_state_dict(self.best_state)
            test = self.evaluate("test", model)
        metrics = self.metrics(test)
        if d.is_main:
            write_metrics(self.out, metrics)
        d.barrier()
        return metrics


class _LogLines:
    """A clock for plain progress lines (every ``seconds``; never if None)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._last = time.perf_counter()

    def due(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self._last >= self.seconds

    def write(self, line: str) -> None:
        self._last = time.perf_counter()
        print(line, flush=True)


__all__ = ["Trainer", "TrainConfig", "TrainState", "step_generator", "check_resumable"]
