"""Emission heads: state embeddings (Z', d) and observations -> (B, T, Z') ``log p(x_t | z)``.

A head never sees the transition, so every head works with dense, low-rank, banded and
rank-space transitions alike (see :class:`lorank.nn.hmm.NeuralHMM`).  Heads take the *rows*
of the state-embedding table that a batch uses, so state dropout (a sampled subset of states)
costs nothing extra here.

* :class:`SoftmaxEmission`: words.  ``p(w | z) = softmax_w(f(e_z) . u_w + b_w)`` with a
  residual MLP ``f`` (Chiu & Rush 2020).  The V x Z' logits are built once per batch and only
  the log-softmax rows of the batch's distinct tokens are gathered into (B, T, Z') (a custom
  backward writes the logits' gradient in one softmax pass and a row scatter).
* :class:`Bernoulli88Emission`: piano rolls.  88 independent keys per state,
  ``p(x | z) = prod_k sigmoid(l_zk)^x_k sigmoid(-l_zk)^(1 - x_k)``, with logits ``l = g(e_z)``
  from an optional MLP; the log-likelihood of all B x T frames against all Z' states is two
  GEMMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorank._checks import check_nonnegative_int, check_positive_int
from lorank._gemm import matmul


class _LogSoftmaxRows(torch.autograd.Function):
    """``log_softmax(x, 0)[rows]`` with a one-buffer backward: ``dx = scatter(g, rows) -
    softmax(x, 0) * colsum(g)``, one softmax pass into the gradient and a row scatter, instead
    of autograd's zero-filled index gradient plus the log-sum-exp's own passes."""

    @staticmethod
    def forward(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x[rows] - torch.logsumexp(x, 0, keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, rows = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        s = g.sum(0, keepdim=True)
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            return (torch.softmax(x, 0) * -s).index_add(0, rows, g), None
        return torch.softmax(x, 0).mul_(-s).index_add_(0, rows, g), None

    @staticmethod
    def jvp(ctx, dx, _):
        x, rows = ctx.saved_tensors
        return dx[rows] - (torch.softmax(x, 0) * dx).sum(0, keepdim=True)


def log_softmax_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``log_softmax(x, 0)[rows]`` for 2-D ``x`` (V, n) and row ids (U,): (U, n)."""
    return _LogSoftmaxRows.apply(x, rows)


class ResLayer(nn.Module):
    """``LayerNorm(x + ReLU(W2 ReLU(W1 x)))``: the residual layer of Chiu & Rush (2020);
    ``norm=False`` drops the LayerNorm (the layers of Chiu, Deng & Rush 2021's code)."""

    def __init__(self, d: int, norm: bool = True):
        super().__init__()
        self.lin1 = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.relu(self.lin2(F.relu(self.lin1(x)))))


def residual_mlp(d: int, layers: int, norm: bool = True) -> nn.Module:
    """``layers`` residual layers of width d (``nn.Identity`` for 0)."""
    check_nonnegative_int("mlp layers", layers)
    if layers == 0:
        return nn.Identity()
    return nn.Sequential(*[ResLayer(d, norm) for _ in range(layers)])


class EmissionHead(nn.Module):
    """Base class.  Subclasses implement :meth:`forward` and :meth:`sample`."""

    #: the state-embedding width the head expects
    hidden: int

    def forward(self, state_emb: torch.Tensor, x) -> torch.Tensor:  # pragma: no cover
        """``log p(x_t | z)`` for every state row of ``state_emb`` (Z', d): (B, T, Z')."""
        raise NotImplementedError

    def sample(
        self, state_emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:  # pragma: no cover
        """One observation per row of ``state_emb`` (n, d)."""
        raise NotImplementedError


class SoftmaxEmission(EmissionHead):
    """Softmax over a vocabulary: ``log p(w | z) = log_softmax_w(f(e_z) @ U^T + b)``.

    Args:
        vocab_size: V.
        hidden: d, the state- and word-embedding size.
        mlp_layers: residual layers of ``f`` (0: the state embedding itself).
    """

    def __init__(self, vocab_size: int, hidden: int = 256, mlp_layers: int = 2):
        super().__init__()
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.hidden = check_positive_int("hidden", hidden)
        self.vocab_size, self.hidden = vocab_size, hidden
        self.mlp = residual_mlp(hidden, mlp_layers)
        self.word_emb = nn.Parameter(torch.randn(vocab_size, hidden) / math.sqrt(hidden))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    @torch.no_grad()
    def init_unigram(self, counts: torch.Tensor, smoothing: float = 0.5) -> None:
        """Set the output bias to the log unigram distribution of ``counts`` (V,), so training
        starts near the unigram model instead of the uniform one."""
        if counts.shape != (self.vocab_size,):
            raise ValueError(
                f"counts must have shape ({self.vocab_size},), got {tuple(counts.shape)}"
            )
        p = counts.double() + smoothing
        self.bias.copy_((p / p.sum()).log().to(self.bias))

    def logits(self, state_emb: torch.Tensor) -> torch.Tensor:
        """Unnormalized emission logits (Z', V): a transposed view of :meth:`word_logits`."""
        return self.word_logits(state_emb).T

    def word_logits(self, state_emb: torch.Tensor) -> torch.Tensor:
        """The logits word-major (V, Z'): a word's row is contiguous, so gathering the
        batch's words (and scattering their gradient) moves whole rows."""
        return matmul(self.word_emb, self.mlp(state_emb).T) + self.bias.unsqueeze(-1)

    def log_probs(self, state_emb: torch.Tensor) -> torch.Tensor:
        """The full (Z', V) table ``log p(w | z)``."""
        return self.logits(state_emb).log_softmax(-1)

    def forward(self, state_emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, T) long -> (B, T, Z').  Builds the V x Z' logits once, gathers the
        batch's distinct tokens' rows of their log-softmax, then indexes them by position."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(
                f"tokens must be a (B, T) LongTensor, got {getattr(tokens, 'shape', tokens)}"
            )
        if tokens.is_floating_point():
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got "
                f"{int(tokens.min())}..{int(tokens.max())}"
            )
        logits = self.word_logits(state_emb)  # (V, Z')
        uniq, inverse = torch.unique(tokens, return_inverse=True)
        return log_softmax_rows(logits, uniq)[inverse]  # (U, Z') -> (B, T, Z')

    def sample(
        self, state_emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One word id per state row: (n,) long."""
        probs = self.log_probs(state_emb).softmax(-1)
        return torch.multinomial(probs.float().cpu(), 1, generator=generator).squeeze(-1)


class Bernoulli88Emission(EmissionHead):
    """Factored Bernoulli emission over ``num_keys`` (88) piano keys.

    ``log p(x | z) = sum_k x_k log sigmoid(l_zk) + (1 - x_k) log sigmoid(-l_zk)`` with logits
    ``l = Linear(g(e_z))``, ``g`` an optional residual MLP (``mlp_layers=0``: a linear map
    of the state embedding).  Observations are (B, T, num_keys) in {0, 1} (bool or float).
    """

    def __init__(self, hidden: int = 256, num_keys: int = 88, mlp_layers: int = 1):
        super().__init__()
        self.hidden = check_positive_int("hidden", hidden)
        self.num_keys = check_positive_int("num_keys", num_keys)
        self.hidden, self.num_keys = hidden, num_keys
        self.mlp = residual_mlp(hidden, mlp_layers)
        self.out = nn.Linear(hidden, num_keys)
        with torch.no_grad():  # keys are mostly off: start near the usual ~4 % density
            self.out.bias.fill_(-3.0)

    def key_logits(self, state_emb: torch.Tensor) -> torch.Tensor:
        """(Z', num_keys) Bernoulli logits."""
        return self.out(self.mlp(state_emb))

    def forward(self, state_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.num_keys:
            raise ValueError(
                f"piano rolls must have shape (B, T, {self.num_keys}), got "
                f"{tuple(getattr(x, 'shape', ()))}"
            )
        logits = self.key_logits(state_emb)
        on, off = F.logsigmoid(logits), F.logsigmoid(-logits)  # (Z', K)
        xf = x.to(on.dtype)
        # x log s + (1 - x) log(1 - s) = x (log s - log(1 - s)) + sum_k log(1 - s)
        scores = matmul(xf.reshape(-1, xf.shape[-1]), (on - off).T)  # (B T, Z')
        return scores.view(*xf.shape[:-1], -1) + off.sum(-1)

    def sample(
        self, state_emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One frame per state row: (n, num_keys) bool."""
        p = torch.sigmoid(self.key_logits(state_emb)).float().cpu()
        return torch.rand(p.shape, generator=generator) < p


__all__ = ["EmissionHead", "SoftmaxEmission", "Bernoulli88Emission", "ResLayer", "residual_mlp"]
