"""``compress(model, config)``: factorize the selected layers of a trained network."""

from __future__ import annotations

import contextlib
import copy
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lorank import linalg
from lorank.compress._hooks import hooked_eval
from lorank.compress.config import DICTIONARY_METHODS, LAYER_TYPES, CompressConfig
from lorank.compress.conv import (
    ConvFactorization,
    ConvSpec,
    LowRankConv,
    SparseLowRankConv,
    conv_costs,
    is_conv,
    record_input_sizes,
)
from lorank.compress.dictionary import SparseDictionaryLinear, dictionary_layers
from lorank.compress.modules import (
    FACTORIZED_TYPES,
    LowRankEmbedding,
    LowRankLinear,
    LowRankRNN,
    SparseLowRankLinear,
    is_hf_conv1d,
)
from lorank.compress.report import CompressionReport, LayerReport

__all__ = ["compress", "merge", "find_targets", "default_forward", "output_tensor",
           "measure_latency", "count_parameters"]

ForwardFn = Callable[[nn.Module, object], object]
LossFn = Callable[[object, object], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# calling the model on calibration batches


def default_forward(model: nn.Module, batch: object) -> object:
    """``model(**batch)`` for a dict, ``model(batch[0])`` for a tuple/list ``(inputs, ...)``,
    else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(batch[0])
    return model(batch)


def output_tensor(out: object) -> torch.Tensor:
    """The tensor to compare in a model output: itself, ``sentence_embedding``, ``logits`` or
    ``last_hidden_state`` of a mapping / ModelOutput, or the first item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        for key in ("sentence_embedding", "logits", "last_hidden_state"):
            if key in out and isinstance(out[key], torch.Tensor):
                return out[key]
    if isinstance(out, tuple | list) and out:
        return output_tensor(out[0])
    raise TypeError(
        f"cannot find the output tensor in a {type(out).__name__}; pass forward_fn returning "
        f"a tensor"
    )


def count_parameters(model: nn.Module) -> int:
    """``sum(p.numel())`` over distinct parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def measure_latency(model: nn.Module, batch: object, forward_fn: ForwardFn = default_forward,
                    repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time in milliseconds of ``forward_fn(model, batch)`` under no_grad."""
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            out = forward_fn(model, batch)
            try:
                t = output_tensor(out)
                if t.is_cuda:
                    torch.cuda.synchronize(t.device)
            except TypeError:
                pass
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
    model.train(was_training)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# layer selection


@dataclass
class _Target:
    name: str
    kind: str  # linear | conv1d (HF Conv1D) | conv (nn.Conv1d/2d) | embedding | rnn
    module: nn.Module

    @property
    def layer_type(self) -> str:
        if self.kind == "conv1d":
            return "linear"
        if self.kind == "rnn":
            return self.module.mode.lower()
        return self.kind


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, LowRankLinear | LowRankEmbedding | LowRankConv | SparseDictionaryLinear):
        return None  # already factorized
    if isinstance(module, LowRankRNN):
        return "rnn"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LSTM | nn.GRU):
        return "rnn"
    if is_conv(module):
        return "conv"
    return None


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _selected(name: str, target_modules, exclude_modules) -> bool:
    """Whether ``name`` passes ``target_modules`` (None: all) and not ``exclude_modules``."""
    if target_modules is not None and not _matches(name, target_modules):
        return False
    return not _matches(name, exclude_modules)


def find_targets(model: nn.Module, config: CompressConfig) -> list[_Target]:
    """The modules ``config`` selects, in ``named_modules`` order."""
    types = config.layer_types or LAYER_TYPES
    out = []
    factorized: list[str] = []  # prefixes of factorized modules: their factors are not targets
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in factorized):
            continue
        if isinstance(mod, FACTORIZED_TYPES):
            factorized.append(f"{name}." if name else "")
        kind = _kind(mod)
        if kind is None:
            continue
        t = _Target(name, kind, mod)
        if t.layer_type not in types:
            continue
        if not _selected(name, config.target_modules, config.exclude_modules):
            continue
        out.append(t)
    return out


def _candidates_description(model: nn.Module) -> str:
    names = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules()
             if _kind(m) is not None]
    more = f" ... ({len(names)} in all)" if len(names) > 12 else ""
    return ", ".join(names[:12]) + more if names else "none"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


# ---------------------------------------------------------------------------------------------
# matrices and their calibration statistics


@dataclass
class _Stats:
    gram: torch.Tensor | None = None  # (in, in) float64 sum of x x^T
    abs_sum: torch.Tensor | None = None  # (in,) sum |x|
    count: int = 0
    counts: torch.Tensor | None = None  # embeddings: token counts (num,)
    fisher: torch.Tensor | None = None  # (m, n) sum of squared gradients of the matrix

    def add(self, x: torch.Tensor, want_gram: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        if want_gram:
            g = x.mT @ x
            self.gram = g if self.gram is None else self.gram + g
        self.count += x.shape[0]

    def add_tokens(self, idx: torch.Tensor, num: int) -> None:
        c = torch.bincount(idx.detach().reshape(-1).cpu(), minlength=num).to(torch.float64)
        self.counts = c if self.counts is None else self.counts + c
        self.count += idx.numel()


@dataclass(eq=False)
class _Matrix:
    """One weight matrix ``M`` (out x in, in the ``y = x M^T`` convention)."""

    key: str  # report name
    target: _Target
    rnn_name: str | None
    weight: torch.Tensor  # the dense M, detached (out x in)
    blocks: int = 1
    stats: _Stats = field(default_factory=_Stats)
    chols: dict[int, torch.Tensor] = field(default_factory=dict)
    spectra: list[torch.Tensor] | None = None
    #: convolutions: the weight <-> matrix map, per-group input statistics (each group sees
    #: other input channels) and, when the matrix's inputs are not the convolution's patches
    #: (spatial decomposition), per-group statistics of those patches for the output error
    conv: ConvFactorization | None = None
    block_stats: list[_Stats] | None = None
    error_stats: list[_Stats] | None = None
    #: what the report says about choices made before factorizing (conv "auto")
    notes: list[str] = field(default_factory=list)

    def input_stats(self, g: int) -> _Stats:
        """Statistics of the inputs of block g."""
        return self.stats if self.block_stats is None else self.block_stats[g]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def block_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return m // self.blocks, n

    def block(self, g: int) -> torch.Tensor:
        hb = self.block_shape[0]
        return self.weight[g * hb:(g + 1) * hb]

    def param(self) -> nn.Parameter:
        """The live parameter holding M (transposed for Conv1D / Embedding)."""
        t = self.target
        if t.kind == "rnn":
            return getattr(t.module, self.rnn_name)
        return t.module.weight

    def set_dense(self, w: torch.Tensor) -> None:
        """Overwrite the live parameter with the out x in matrix ``w``."""
        p = self.param()
        if self.conv is not None:
            w = self.conv.weight(w)
        elif self.target.kind in ("conv1d", "embedding"):
            w = w.mT
        with torch.no_grad():
            p.copy_(w)


def _matrices(targets: list[_Target], config: CompressConfig) -> list[_Matrix]:
    out = []
    for t in targets:
        if t.kind == "linear":
            out.append(_Matrix(t.name, t, None, t.module.weight.detach()))
        elif t.kind in ("conv1d", "embedding"):
            out.append(_Matrix(t.name, t, None, t.module.weight.detach().mT))
        elif t.kind == "conv":
            dec, note = _conv_decomposition(t, config)
            fac = ConvFactorization(ConvSpec.of(t.module), dec)
            g = fac.blocks
            out.append(_Matrix(t.name, t, None, fac.matrix(t.module.weight.detach()), g,
                               conv=fac, block_stats=[_Stats() for _ in range(g)],
                               error_stats=[_Stats() for _ in range(g)]
                               if dec == "spatial" else None,
                               notes=[note] if note else []))
        else:
            g = t.module.num_gates if config.rnn_granularity == "per_gate" else 1
            for name in t.module.matrix_names():
                part = name.split("_")[1]
                if part in config.rnn_matrices and name not in t.module.factorized:
                    key = f"{t.name}.{name}" if t.name else name
                    out.append(_Matrix(key, t, name, getattr(t.module, name).detach(), g))
    return out


def _conv_decomposition(t: _Target, config: CompressConfig) -> tuple[str, str | None]:
    """The decomposition of a convolution and, for ``"auto"``, a note saying why.

    ``"auto"`` compares the two forms on the weights (plain SVD, before any calibration): at
    ``param_reduction`` each form gets the rank of that budget and the smaller relative
    weight error wins; at ``energy`` each keeps the energy fraction and the one with fewer
    parameters wins.  Conv1d, kernels with a side of 1 and layers given a rank by
    ``rank_pattern`` use ``"channel"``."""
    dec = config.conv_decomposition
    if t.module.weight.dim() != 4:
        return "channel", None
    if dec != "auto":
        return dec, None
    spec = ConvSpec.of(t.module)
    if min(spec.kernel_size) == 1:
        return "channel", "auto: channel (a kernel side of 1 has no spatial form)"
    if any(_matches(t.name, [p]) or re.fullmatch(p, t.name) for p in config.rank_pattern):
        return "channel", "auto: channel (rank fixed by rank_pattern)"
    w = t.module.weight.detach().to(torch.float64).cpu()
    scores = {}
    for form in ("channel", "spatial"):
        fac = ConvFactorization(spec, form)
        (m, n), mat = fac.block_shape, fac.matrix(w)
        spectra = [torch.linalg.svdvals(mat[g * m:(g + 1) * m]) for g in range(fac.blocks)]
        if config.rank_mode == "param_reduction":
            r = max(1, linalg.rank_for_param_reduction(m, n, config.param_reduction))
        else:
            r = max(linalg.rank_for_energy(sv, config.energy) for sv in spectra)
        total = sum(float((sv ** 2).sum()) for sv in spectra)
        lost = sum(float((sv[r:] ** 2).sum()) for sv in spectra)
        error = math.sqrt(lost / total) if total > 0 else 0.0
        scores[form] = (error, fac.blocks * r * (m + n))  # (weight error, factor weights)
    # errors equal to 1e-9 (both exact) compare by size, and the other way round
    if config.rank_mode == "param_reduction":
        form = min(scores, key=lambda f: (round(scores[f][0], 9), scores[f][1]))
    else:
        form = min(scores, key=lambda f: (scores[f][1], round(scores[f][0], 9)))
    (e_c, p_c), (e_s, p_s) = scores["channel"], scores["spatial"]
    return form, (f"auto: {form} (relative weight error channel {e_c:.3f}, spatial "
                  f"{e_s:.3f}; factor weights {p_c:,} vs {p_s:,})")


def _restore_after_calibration(model: nn.Module, matrices: list, flags: dict) -> None:
    """Undo the calibration set-up: RNN statistics hooks off, ``requires_grad`` restored."""
    for mx in matrices:
        if mx.target.kind == "rnn":
            mx.target.module.stats_hook = None
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))


def _collect_stats(model, matrices, calibration, forward_fn, config, loss_fn, need_fisher):
    """Run the calibration batches once, recording input statistics of every matrix (and,
    for FWSVD, squared gradients of the loss)."""
    hooks = []
    by_rnn: dict[int, dict[str, _Matrix]] = {}
    for mx in matrices:
        t = mx.target
        want_gram = mx.shape[1] <= config.max_gram_features
        if t.kind in ("linear", "conv1d"):
            def pre(mod, args, mx=mx, want_gram=want_gram):
                mx.stats.add(args[0], want_gram)
            hooks.append(t.module.register_forward_pre_hook(pre))
        elif t.kind == "embedding":
            def pre_emb(mod, args, mx=mx):
                mx.stats.add_tokens(args[0], mod.num_embeddings)
            hooks.append(t.module.register_forward_pre_hook(pre_emb))
        elif t.kind == "conv":
            def pre_conv(mod, args, mx=mx):
                _add_conv_stats(mx, args[0], config.max_gram_features)
            hooks.append(t.module.register_forward_pre_hook(pre_conv))
        else:
            table = by_rnn.setdefault(id(t.module), {})
            table[mx.rnn_name] = mx

            def hook(name, x, table=table):
                if name in table:
                    table[name].stats.add(x, table[name].shape[1] <= config.max_gram_features)
            t.module.stats_hook = hook
    params = [mx.param() for mx in matrices]
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    n_batches = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(hooked_eval(model, hooks))
        stack.callback(_restore_after_calibration, model, matrices, saved_flags)
        if need_fisher:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
                p.grad = None
        for batch in calibration:
            n_batches += 1
            if need_fisher:
                out = forward_fn(model, batch)
                loss = _loss(out, batch, loss_fn)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for mx, g in zip(matrices, grads, strict=True):
                    if g is None:
                        continue
                    g = g.detach().to(torch.float64) ** 2
                    if mx.conv is not None:
                        g = mx.conv.matrix(g)
                    elif mx.target.kind in ("conv1d", "embedding"):
                        g = g.mT
                    mx.stats.fisher = g if mx.stats.fisher is None else mx.stats.fisher + g
            else:
                with torch.no_grad():
                    forward_fn(model, batch)
    if n_batches == 0:
        raise ValueError("the calibration data yielded no batch")


def _add_conv_stats(mx: _Matrix, x: torch.Tensor, max_gram_features: int) -> None:
    """Per-group statistics of the im2col patches the factorized matrix sees (and of the
    original convolution's patches when they differ)."""
    pairs = [(mx.block_stats, mx.conv.features)]
    if mx.error_stats is not None:
        pairs.append((mx.error_stats, mx.conv.full_features))
    for stats, features in pairs:
        feats = features(x.detach())
        for g, st in enumerate(stats):
            st.add(feats[:, g], feats.shape[-1] <= max_gram_features)


def _loss(out, batch, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(out, batch)
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    elif isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        loss = out["loss"]
    else:
        raise ValueError("fwsvd needs a loss: pass loss_fn(output, batch) -> scalar tensor "
                         "(or use a model whose output has .loss)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss.reshape(())


# ---------------------------------------------------------------------------------------------
# factorization of one matrix


def _needs_stats(mx: _Matrix, method: str) -> None:
    s = mx.input_stats(0)
    if method == "fwsvd" and mx.stats.fisher is None:
        raise ValueError(f"{mx.key}: no Fisher information collected")
    if method in ("asvd", "whitened") and s.count == 0:
        raise ValueError(f"{mx.key}: no calibration input reached this layer (was it called "
                         f"by forward_fn?); exclude it or fix the calibration data")
    if method == "whitened" and mx.target.kind != "embedding" and s.gram is None:
        raise ValueError(f"{mx.key}: whitening needs the input Gram matrix but the layer has "
                         f"{mx.shape[1]} input features > max_gram_features")


def _col_scale_embedding(mx: _Matrix, config: CompressConfig, method: str) -> torch.Tensor:
    """Embeddings see one-hot inputs: the Gram matrix is diag(counts) and the mean absolute
    activation is counts / N, so whitening and ASVD become column scalings."""
    c = mx.stats.counts
    if method == "whitened":
        damp = max(config.whiten_damp, 1e-8) * float(c.mean())
        return (c + damp).sqrt()
    freq = c / max(mx.stats.count, 1)
    s = freq ** config.asvd_alpha
    return s.clamp_min(float(s.max()) * 1e-6 if float(s.max()) > 0 else 1.0)


def _chol(mx: _Matrix, config: CompressConfig, g: int) -> torch.Tensor:
    if g not in mx.chols:
        mx.chols[g] = linalg.whitening_factor(mx.input_stats(g).gram, config.whiten_damp)
    return mx.chols[g]


def _act_scale(mx: _Matrix, g: int) -> torch.Tensor:
    st = mx.input_stats(g)
    return st.abs_sum / st.count


def _spectrum(mx: _Matrix, g: int, config: CompressConfig) -> torch.Tensor:
    """Singular values of the matrix the method truncates for block g."""
    if mx.spectra is None:
        mx.spectra = [None] * mx.blocks
    if mx.spectra[g] is None:
        w = mx.block(g).to(torch.float64).cpu()
        method = config.method
        if method == "fwsvd":
            rw = linalg.fisher_row_weights(_fisher_block(mx, g)).cpu()
            w = rw.unsqueeze(-1) * w
        elif method in ("asvd", "whitened") and mx.target.kind == "embedding":
            w = w * _col_scale_embedding(mx, config, method).cpu()
        elif method == "asvd":
            s = _act_scale(mx, g).cpu() ** config.asvd_alpha
            w = w * s.clamp_min(max(float(s.max()), 1.0) * 1e-6)
        elif method == "whitened":
            w = w @ _chol(mx, config, g).cpu()
        mx.spectra[g] = torch.linalg.svdvals(w)
    return mx.spectra[g]


def _fisher_block(mx: _Matrix, g: int) -> torch.Tensor:
    hb = mx.block_shape[0]
    return mx.stats.fisher[g * hb:(g + 1) * hb]


def _factor_block(mx: _Matrix, g: int, rank: int, config: CompressConfig, gen):
    """``(A, B, S or None)`` for block g at ``rank``."""
    w = mx.block(g)
    method = config.method
    if method == "svd":
        return (*linalg.truncated_svd(w, rank), None)
    if method == "randomized_svd":
        return (*linalg.randomized_svd(w, rank, oversample=config.randomized_oversample,
                                       n_iter=config.randomized_iters, generator=gen), None)
    if method == "snmf":
        return (*linalg.semi_nmf(w, rank, n_iter=config.snmf_iters, generator=gen), None)
    if method == "svd+sparse":
        nnz = linalg.nnz_for_density(tuple(w.shape), config.sparse_density)
        return linalg.sparse_plus_low_rank(w, rank, nnz)
    _needs_stats(mx, method)
    if method == "fwsvd":
        return (*linalg.fisher_weighted_svd(w, rank, _fisher_block(mx, g).to(w.device)), None)
    if mx.target.kind == "embedding":
        cs = _col_scale_embedding(mx, config, method).to(w.device)
        return (*linalg.scaled_svd(w, rank, col_scale=cs), None)
    if method == "asvd":
        act = _act_scale(mx, g).to(w.device)
        return (*linalg.activation_aware_svd(w, rank, act, alpha=config.asvd_alpha), None)
    return (*linalg.whitened_svd(w, rank, chol=_chol(mx, config, g).to(w.device)), None)


def _factorize(mx: _Matrix, rank: int, config: CompressConfig, gen):
    parts = [_factor_block(mx, g, rank, config, gen) for g in range(mx.blocks)]
    a = torch.stack([p[0] for p in parts])  # (G, Hb, r)
    b = torch.stack([p[1] for p in parts])  # (G, r, in)
    s = None
    if parts[0][2] is not None:
        s = torch.cat([p[2] for p in parts], 0)
    return a, b, s


def _reconstruct(a, b, s):
    w = (a @ b).reshape(-1, b.shape[-1])
    return w if s is None else w + s


# ---------------------------------------------------------------------------------------------
# rank rules


def _pattern_rank(mx: _Matrix, config: CompressConfig) -> int | None:
    for pat, r in config.rank_pattern.items():
        if _matches(mx.key, [pat]) or _matches(mx.target.name, [pat]) or \
                re.fullmatch(pat, mx.key):
            return r
    return None


def _rank_for(mx: _Matrix, config: CompressConfig, notes: list[str]) -> int | None:
    """The rule's rank for this matrix (None: leave dense, reason appended to notes)."""
    m, n = mx.block_shape
    fixed = _pattern_rank(mx, config)
    mode = config.rank_mode
    if fixed is None and mode == "rank":
        fixed = config.rank
    if fixed is not None:
        if fixed > min(m, n):
            raise ValueError(
                f"rank {fixed} > min(m, n) = {min(m, n)} for {mx.key} (matrix shape "
                f"{m}x{n}); use a smaller rank, rank_pattern, or exclude_modules"
            )
        return fixed
    if mode == "param_reduction":
        r = linalg.rank_for_param_reduction(m, n, config.param_reduction)
        if r < 1:
            notes.append(f"rank clipped to 1 (rank 1 removes less than "
                         f"{config.param_reduction:.0%})")
            r = 1
        return r
    if mode == "energy":
        return max(linalg.rank_for_energy(_spectrum(mx, g, config), config.energy)
                   for g in range(mx.blocks))
    raise AssertionError(mode)


# ---------------------------------------------------------------------------------------------
# budget allocation by measured sensitivity


def _budget_ranks(model, matrices, config, calibration, forward_fn, loss_fn, gen):
    """Per-matrix ranks (None = dense) meeting the global budget, by greedy allocation over
    measured sensitivity curves."""
    batches = None
    ref = None
    if calibration is not None:
        batches = list(calibration) if not isinstance(calibration, list) else calibration
        if config.sensitivity_batches is not None:
            batches = batches[:config.sensitivity_batches]
        ref = _evaluate(model, batches, forward_fn, loss_fn, None)
    all_cands = []
    total_dense = 0
    for mx in matrices:
        m, n = mx.block_shape
        g = mx.blocks
        total_dense += g * m * n
        rmax = linalg.max_useful_rank(m, n)
        cands = [linalg.RankCandidate(None, g * m * n, 0.0)]
        k = config.budget_candidates
        ranks = sorted({max(1, round(rmax * (i + 1) / (k + 1))) for i in range(k)}) \
            if rmax >= 1 else []
        for r in ranks:
            params = g * linalg.lowrank_params(m, n, r)
            if config.method == "svd+sparse":
                params += g * linalg.nnz_for_density((m, n), config.sparse_density)
            if batches is None:
                cost = sum(linalg.tail_energy(_spectrum(mx, b, config), r) ** 2
                           for b in range(g)) / g
            else:
                a, b_, s = _factorize(mx, r, config, gen)
                orig = mx.weight.clone()
                mx.set_dense(_reconstruct(a, b_, s).to(orig.dtype))
                try:
                    cost = _evaluate(model, batches, forward_fn, loss_fn, ref)
                finally:
                    mx.set_dense(orig)
            cands.append(linalg.RankCandidate(r, params, cost))
        all_cands.append(cands)
    budget = int(math.floor((1 - config.budget_reduction) * total_dense))
    chosen = linalg.allocate_ranks(all_cands, budget)
    return [c.rank for c in chosen]


def _evaluate(model, batches, forward_fn, loss_fn, ref):
    """Mean loss (if loss_fn) minus the reference, or the mean relative squared change of
    the output tensor against reference outputs (returned when ref is None)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [forward_fn(model, b) for b in batches]
            if loss_fn is not None:
                val = sum(float(loss_fn(o, b)) for o, b in zip(outs, batches, strict=True))
                val /= len(batches)
                return val if ref is None else val - ref
            ts = [output_tensor(o).detach().float() for o in outs]
            if ref is None:
                return ts
            err = sum(float(((t - r) ** 2).sum() / (r ** 2).sum().clamp_min(1e-30))
                      for t, r in zip(ts, ref, strict=True))
            return err / len(ts)
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------
# module replacement


def _build_replacement(t: _Target, factors: dict[str, tuple]) -> nn.Module:
    """The factorized module for target t given {matrix key: (a, b, s)}."""
    mod = t.module
    if t.kind in ("linear", "conv1d"):
        (a, b, s), = factors.values()
        a, b = a[0], b[0]
        orig = "Conv1D" if t.kind == "conv1d" else "Linear"
        bias = mod.bias.detach() if mod.bias is not None else None
        if s is not None:
            return SparseLowRankLinear.from_factors(a, b, s, bias, orig=orig)
        return LowRankLinear.from_factors(a, b, bias, orig=orig)
    if t.kind == "embedding":
        (a, b, _), = factors.values()
        # M = W^T (dim x num) = A B  =>  W = B^T A^T: table = B^T (num x r), proj = A
        return LowRankEmbedding.from_factors(b[0].mT.contiguous(), a[0].contiguous(),
                                             padding_idx=mod.padding_idx)
    for key, (a, b, _) in factors.items():
        mod.factorize(key.rsplit(".", 1)[-1], a, b)
    return mod


def _matrix_flops(kind: str, m: int, n: int) -> int:
    return 0 if kind == "embedding" else 2 * m * n


def _conv_module(mx: _Matrix, a: torch.Tensor, b: torch.Tensor,
                 s: torch.Tensor | None) -> LowRankConv:
    bias = mx.target.module.bias
    bias = None if bias is None else bias.detach()
    if s is not None:
        return SparseLowRankConv.from_sparse_factors(mx.conv, a, b, s, bias)
    return LowRankConv.from_factors(mx.conv, a, b, bias)


def _conv_note(fac: ConvFactorization, size: tuple[int, ...] | None) -> str:
    where = "per output position (no input size recorded)" if size is None else \
        f"per example at input {'x'.join(map(str, size))}"
    return f"{fac.decomposition} decomposition; FLOPs {where}"


def _conv_break_even(mx: _Matrix, rank: int, config: CompressConfig,
                     size: tuple[int, ...] | None) -> str | None:
    """Why a rank-``rank`` factorization of a convolution would not save parameters or
    FLOPs (counted on the modules it would build), or None."""
    nnz = 0
    if config.method == "svd+sparse":
        nnz = mx.blocks * linalg.nnz_for_density(mx.block_shape, config.sparse_density)
    skeleton = SparseLowRankConv(mx.conv, rank, nnz, device="meta") if nnz else \
        LowRankConv(mx.conv, rank, device="meta")
    (p0, f0), (p1, f1) = conv_costs(mx.target.module, size), conv_costs(skeleton, size)
    for what, old, new in (("parameters", p0, p1), ("FLOPs", f0, f1)):
        if new >= old:
            return f"rank {rank} would not save {what} ({new:,} >= {old:,}): kept dense"
    return None


# ---------------------------------------------------------------------------------------------
# the public entry points


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    calibration: Iterable | None = None,
    *,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    example_input: object | None = None,
    **overrides,
) -> tuple[nn.Module, CompressionReport]:
    """Factorize the layers of ``model`` selected by ``config``; return ``(model, report)``.

    ``calibration``: an iterable of batches (re-iterated: a list or a DataLoader), required
    by ``fwsvd``, ``asvd`` and ``whitened``, optional otherwise (it adds the output-error
    column and lets ``budget_reduction`` measure sensitivity).  Each batch is fed as
    ``forward_fn(model, batch)`` (default :func:`default_forward`).  ``loss_fn(output, batch)``
    gives FWSVD its gradients (HF outputs with ``.loss`` need none).  Latency is measured on
    ``example_input`` (default: the first calibration batch), and convolutions' FLOPs are
    counted at the input sizes it produces.

    ``config`` fields may also be given as keyword arguments (``compress(m, rank=8)``).
    The model is copied first unless ``config.inplace``.
    """
    if config is None:
        config = CompressConfig(**overrides)
    elif overrides:
        config = CompressConfig.from_dict({**config.to_dict(), **overrides})
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    forward_fn = forward_fn or default_forward
    if config.data_aware and calibration is None:
        raise ValueError(
            f"method {config.method!r} is data-aware: pass calibration data "
            f"(compress(model, config, calibration=loader))"
        )
    if calibration is not None and not isinstance(calibration, list | tuple):
        calibration_list = list(calibration)
    else:
        calibration_list = list(calibration) if calibration is not None else None
    if example_input is None and calibration_list:
        example_input = calibration_list[0]

    targets = find_targets(model, config)
    if not targets:
        raise ValueError(
            f"no layer matches the configuration (layer_types={config.layer_types}, "
            f"target_modules={config.target_modules!r}, exclude_modules="
            f"{config.exclude_modules!r}); candidate layers: {_candidates_description(model)}"
        )
    params_before = count_parameters(model)
    latency_before = None
    if config.measure_latency and example_input is not None:
        latency_before = measure_latency(model, example_input, forward_fn,
                                         config.latency_repeats)
    if not config.inplace:
        model = copy.deepcopy(model)
        targets = find_targets(model, config)
    # RNNs are run through LowRankRNN (identical math) so per-layer inputs can be observed
    for t in targets:
        if t.kind == "rnn" and not isinstance(t.module, LowRankRNN):
            new = LowRankRNN.from_rnn(t.module)
            model = _set_module(model, t.name, new)
            t.module = new
    matrices = _matrices(targets, config)
    convs = {t.name: t.module for t in targets if t.kind == "conv"}
    sizes = record_input_sizes(model, convs, example_input, forward_fn) \
        if convs and example_input is not None else {}
    if calibration_list is not None:
        _collect_stats(model, matrices, calibration_list, forward_fn, config, loss_fn,
                       need_fisher=config.method == "fwsvd")
    gen = torch.Generator().manual_seed(config.seed)

    notes_by_key: dict[str, list[str]] = {mx.key: list(mx.notes) for mx in matrices}
    unused: set[int] = set()
    if config.data_aware:
        # layers the calibration never reached (or the loss does not depend on) cannot be
        # weighed: they stay dense, with a note
        for mx in matrices:
            missing = mx.stats.fisher is None if config.method == "fwsvd" else \
                mx.input_stats(0).count == 0
            if missing:
                unused.add(id(mx))
                why = "the loss has no gradient" if config.method == "fwsvd" else \
                    "no calibration input reached it"
                notes_by_key[mx.key].append(f"{why}: kept dense")
        if len(unused) == len(matrices):
            raise ValueError(f"{config.method}: no selected layer was reached by the "
                             f"calibration data through forward_fn")
    if config.method in DICTIONARY_METHODS:
        rows, modules = dictionary_layers(matrices, config, gen, notes_by_key, unused)
        report = CompressionReport(method=config.method, rank_mode=config.rank_mode,
                                   config=config.to_dict())
        for t in targets:
            if id(t) in modules:
                model = _set_module(model, t.name, modules[id(t)])
        return _finish(model, report, rows, bool(modules), config, params_before,
                       latency_before, example_input, forward_fn, [])
    if config.rank_mode == "budget_reduction":
        live = [mx for mx in matrices if id(mx) not in unused]
        live_ranks = iter(_budget_ranks(model, live, config, calibration_list, forward_fn,
                                        loss_fn, gen))
        ranks = [None if id(mx) in unused else next(live_ranks) for mx in matrices]
        for mx, r in zip(matrices, ranks, strict=True):
            if r is None and id(mx) not in unused:
                notes_by_key[mx.key].append("kept dense by the budget allocation")
    else:
        ranks = [None if id(mx) in unused else _rank_for(mx, config, notes_by_key[mx.key])
                 for mx in matrices]

    report = CompressionReport(method=config.method, rank_mode=config.rank_mode,
                               config=config.to_dict())
    factors_by_target: dict[int, dict[str, tuple]] = {}
    built: dict[int, nn.Module] = {}  # convolutions, built to count their costs
    rows: list[LayerReport] = []
    for mx, r in zip(matrices, ranks, strict=True):
        m, n = mx.shape
        mb, nb = mx.block_shape
        kind = mx.target.layer_type
        before = m * n
        flops_before = _matrix_flops(mx.target.kind, m, n)
        notes = notes_by_key[mx.key]
        if mx.conv is not None:
            size = sizes.get(mx.target.name)
            flops_before = conv_costs(mx.target.module, size)[1]
            notes.append(_conv_note(mx.conv, size))
            if r is not None:
                why = _conv_break_even(mx, r, config, size)
                if why:
                    notes.append(why)
                    r = None
        elif r is not None and not linalg.saves_parameters(mb, nb, r):
            notes.append(f"rank {r} >= {mb}*{nb}/({mb}+{nb}) = {mb * nb / (mb + nb):.1f} "
                         f"would not save parameters: kept dense")
            r = None
        if r is None:
            rows.append(LayerReport(mx.key, kind, (m, n), None, "dense", before, before,
                                    flops_before, flops_before, 0.0, None, mx.blocks,
                                    "; ".join(notes)))
            continue
        a, b, s = _factorize(mx, r, config, gen)
        a = a.to(mx.weight.dtype)
        b = b.to(mx.weight.dtype)
        s = None if s is None else s.to(mx.weight.dtype)
        w2 = _reconstruct(a, b, s)
        diff = (mx.weight - w2).to(torch.float64)
        werr = float(diff.norm() / mx.weight.to(torch.float64).norm().clamp_min(1e-300))
        oerr = _output_error(mx, diff)
        nnz = 0 if s is None else int((s != 0).sum())
        after = a.numel() + b.numel() + nnz
        flops_after = 2 * (mx.blocks * r * (mb + nb) + nnz)
        if mx.target.kind == "embedding":
            flops_after = 2 * r * m  # r x dim projection per token; the lookup is free
        if mx.conv is not None:
            built[id(mx.target)] = _conv_module(mx, a, b, s)
            after, flops_after = conv_costs(built[id(mx.target)], size)
        factors_by_target.setdefault(id(mx.target), {})[mx.key] = (a, b, s)
        rows.append(LayerReport(mx.key, kind, (m, n), r, "factorized", before, after,
                                flops_before, flops_after, werr, oerr, mx.blocks,
                                "; ".join(notes)))
    for t in targets:
        facs = factors_by_target.get(id(t))
        if id(t) in built:
            model = _set_module(model, t.name, built[id(t)])
        elif facs:
            model = _set_module(model, t.name, _build_replacement(t, facs))
        elif t.kind == "rnn" and not t.module.factorized:
            model = _set_module(model, t.name, t.module.merge())
    embedded = [t for t in targets if t.kind == "embedding" and id(t) in factors_by_target]
    return _finish(model, report, rows, bool(factors_by_target), config, params_before,
                   latency_before, example_input, forward_fn, embedded)


def _finish(model, report, rows, any_factorized, config, params_before, latency_before,
            example_input, forward_fn, embedded):
    """Fill the report's totals, latency and notes; return ``(model, report)``."""
    report.layers = rows
    report.model_params_before = params_before
    report.model_params_after = count_parameters(model)
    if not any_factorized:
        report.notes.append("no layer was factorized: every selected rank would not save "
                            "parameters")
    if config.measure_latency and example_input is not None:
        report.latency_after_ms = measure_latency(model, example_input, forward_fn,
                                                  config.latency_repeats)
        report.latency_before_ms = latency_before
    elif config.measure_latency:
        report.notes.append("latency not measured: no example_input or calibration data")
    if embedded:
        report.notes.append("a factorized embedding no longer shares its weight with a tied "
                            "output layer")
    return model, report


def _output_error(mx: _Matrix, diff: torch.Tensor) -> float | None:
    s = mx.stats
    w = mx.weight.to(torch.float64)
    if mx.target.kind == "embedding" and s.counts is not None:
        c = s.counts.to(diff.device)
        num = float(((diff ** 2).sum(0) * c).sum())
        den = float(((w ** 2).sum(0) * c).sum())
    else:
        stats = mx.block_stats or [s]
        if mx.error_stats is not None:  # spatial convolution: the error of its output
            stats = mx.error_stats
            cout = mx.conv.spec.out_channels
            diff, w = (mx.conv.weight(t).reshape(cout, -1) for t in (diff, w))
        if any(st.gram is None for st in stats):
            return None
        rows = w.shape[0] // len(stats)
        num = den = 0.0
        for g, st in enumerate(stats):
            gram = st.gram.to(diff.device)
            d, wg = diff[g * rows:(g + 1) * rows], w[g * rows:(g + 1) * rows]
            num += float(((d @ gram) * d).sum())
            den += float(((wg @ gram) * wg).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else None


def merge(model: nn.Module, names: Iterable[str] | None = None) -> nn.Module:
    """Replace factorized modules (all, or those named) by their dense equivalents, in place;
    returns the model (a new object only if the model itself was factorized)."""
    wanted = None if names is None else set(names)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (*FACTORIZED_TYPES, SparseDictionaryLinear))
             and (wanted is None or n in wanted)]
    if wanted is not None:
        missing = wanted - {n for n, _ in found}
        if missing:
            raise KeyError(f"no factorized module named {sorted(missing)}")
    for name, mod in found:
        model = _set_module(model, name, mod.merge())
    return model
