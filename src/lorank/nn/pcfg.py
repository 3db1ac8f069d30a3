"""Neural PCFGs as language models: ``forward(tokens, lengths) -> lorank.PCFG``.

One module, four rule parametrizations (``rule_type``):

* ``"dense"``      -- the neural PCFG of Kim, Dyer & Rush (2019): rule logits from nonterminal
  embeddings, ``T[A] = softmax(W f(e_A))`` over all S x S children;
* ``"low_rank"``   -- the LPCFG of Chiu, Deng & Rush (2021): ``T[A, BC] ∝ phi(u_A)^T phi(v_BC)``
  with ``phi(x) = exp(x W)`` (W initialized with orthogonal random features) and ``v_BC`` an
  MLP of the children's embeddings;
* ``"cp"``         -- TN-PCFG (Yang, Zhao & Tu 2021): ``T = sum_r H[A,r] L[B,r] R[C,r]`` with
  H, L, R from MLPs of symbol embeddings;
* ``"rank_space"`` -- the same CP grammar with rank-space inference (Yang, Liu & Tu 2022).

Root and preterminal-emission distributions are MLPs of embeddings as in Kim et al.  The root
covers all symbols, so one-word sentences have a preterminal root.  The language-model loss is
``-dist.log_partition.sum() / num_tokens`` (per-token perplexity ``exp(loss)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorank.config import Config, option
from lorank.distributions.pcfg import PCFG, generate
from lorank.factors import orthogonal_random_features
from lorank.rules import CPRules, DenseRules, LowRankRules, RankSpaceRules, Rules

RULE_TYPES = ("dense", "low_rank", "cp", "rank_space")
RULE_ALIASES = {"lpcfg": "low_rank", "lowrank": "low_rank", "tn": "cp", "tnpcfg": "cp",
                "tn_pcfg": "cp", "rankspace": "rank_space", "kim": "dense"}


class ResidualMLP(nn.Module):
    """``Linear -> [ReLU Linear ReLU Linear + skip] x 2`` as in Kim et al. (2019)."""

    def __init__(self, d_in: int, d: int, d_out: int, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
            for _ in range(layers)
        )
        self.out = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h)


@dataclass(frozen=True)
class PCFGConfig(Config):
    """Settings of a :class:`NeuralPCFG` (``vocab_size`` comes from the corpus)."""

    rule_type: str = option("dense", "dense, low_rank, cp or rank_space", flag="--rules",
                            choices=RULE_TYPES)
    num_nonterminals: int = option(30, "nonterminals m", flag="--nonterminals")
    num_preterminals: int = option(60, "preterminals p", flag="--preterminals")
    rank: int | None = option(None, "rank of low_rank/cp/rank_space rules (default 64)")
    hidden: int = option(256, "embedding size")
    vocab_size: int | None = option(None, "number of word types V", cli=False)
    max_length: int | None = option(None, "longest sentence accepted", cli=False)

    def __post_init__(self) -> None:
        rt = self._choice("rule_type", RULE_TYPES, RULE_ALIASES)
        self._positive_int("num_nonterminals", "num_preterminals", "hidden")
        self._positive_int("vocab_size", "max_length", optional=True)
        self._rank(rt != "dense", 64, None, "rank applies to factored rules (low_rank, cp, "
                                            "rank_space), not to dense rules")


class NeuralPCFG(nn.Module):
    """A neural PCFG language model with dense, low-rank, CP or rank-space rules.

    Build it from a :class:`PCFGConfig` or from its fields:
    ``NeuralPCFG(vocab_size=10000, rule_type="cp", rank=64)``.  ``seed`` seeds the
    parameter initialization (None: the global generator).
    """

    def __init__(self, config: PCFGConfig | None = None, seed: int | None = None, **fields):
        super().__init__()
        config = PCFGConfig.resolve(config, **fields)
        if config.vocab_size is None:
            raise ValueError("PCFGConfig.vocab_size must be set to build a NeuralPCFG")
        self.config = config
        vocab_size, hidden, rank = config.vocab_size, config.hidden, config.rank or 1
        rule_type, max_length = config.rule_type, config.max_length
        num_nonterminals, num_preterminals = config.num_nonterminals, config.num_preterminals
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        m, p = num_nonterminals, num_preterminals
        s = m + p
        self.vocab_size, self.m, self.p, self.rank = vocab_size, m, p, rank
        self.rule_type, self.max_length = rule_type, max_length
        self.root_emb = nn.Parameter(torch.randn(1, hidden, generator=gen) * 0.1)
        self.nt_emb = nn.Parameter(torch.randn(m, hidden, generator=gen) * 0.1)
        self.sym_emb = nn.Parameter(torch.randn(s, hidden, generator=gen) * 0.1)
        self.term_emb = nn.Parameter(torch.randn(p, hidden, generator=gen) * 0.1)
        self.root_mlp = ResidualMLP(hidden, hidden, s)
        self.term_mlp = ResidualMLP(hidden, hidden, vocab_size)
        if rule_type == "dense":
            self.rule_out = nn.Linear(hidden, s * s)
        elif rule_type == "low_rank":
            self.head_mlp = ResidualMLP(hidden, hidden, hidden, layers=1)
            self.child_left = nn.Linear(hidden, hidden)
            self.child_right = nn.Linear(hidden, hidden)
            self.child_mlp = ResidualMLP(hidden, hidden, hidden, layers=1)
            w = orthogonal_random_features(hidden, rank, generator=gen) / hidden**0.5
            self.projection = nn.Parameter(w)
        else:
            self.head_mlp = ResidualMLP(hidden, hidden, rank, layers=1)
            self.left_mlp = ResidualMLP(hidden, hidden, rank, layers=1)
            self.right_mlp = ResidualMLP(hidden, hidden, rank, layers=1)

    # ---- grammar -------------------------------------------------------------------------
    def rules(self) -> Rules:
        """The binary-rule factor of the current parameters (shared by all sentences)."""
        m, s = self.m, self.m + self.p
        if self.rule_type == "dense":
            return DenseRules(self.rule_out(self.nt_emb).view(m, s, s))
        if self.rule_type == "low_rank":
            head = self.head_mlp(self.nt_emb) @ self.projection  # (m, R)
            pair = self.child_left(self.sym_emb).unsqueeze(1) + \
                self.child_right(self.sym_emb).unsqueeze(0)  # (S, S, h)
            children = self.child_mlp(torch.relu(pair)) @ self.projection  # (S, S, R)
            return LowRankRules(head, children)
        cls = CPRules if self.rule_type == "cp" else RankSpaceRules
        return cls(self.head_mlp(self.nt_emb), self.left_mlp(self.sym_emb),
                   self.right_mlp(self.sym_emb))

    def root_logits(self) -> torch.Tensor:
        """Root logits over all S symbols: (S,)."""
        return self.root_mlp(self.root_emb)[0]

    def emission_logits(self) -> torch.Tensor:
        """Preterminal-to-word logits: (p, V)."""
        return self.term_mlp(self.term_emb)

    def forward(self, tokens, lengths: torch.Tensor | None = None) -> PCFG:
        """tokens (B, T) word ids (padding anything in range, or negative), lengths (B,);
        also accepts one ``(tokens, lengths)`` tuple.  Returns the :class:`lorank.PCFG` whose
        ``log_partition`` is ``log p(sentence)``."""
        if isinstance(tokens, (tuple, list)):
            tokens, lengths = tokens[0], tokens[1]
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long,
                                 device=tokens.device)
        ids = tokens.clamp_min(0)
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {int(ids.max())}")
        logp = torch.log_softmax(self.emission_logits(), -1)  # (p, V)
        terminal = logp.T[ids]  # (B, T, p)
        return PCFG(self.root_logits(), self.rules(), terminal, lengths,
                    max_length=self.max_length)

    def loss(self, tokens, lengths=None) -> torch.Tensor:
        """Per-token negative log-likelihood (the trainer's contract)."""
        dist = self(tokens, lengths)
        return -dist.log_partition.sum() / dist.lengths.sum()

    @torch.no_grad()
    def sample_sentences(self, num: int, max_length: int = 40,
                         generator: torch.Generator | None = None):
        """Sentences and their trees drawn from the grammar: ``[(word_ids, tree_rows)]``."""
        return generate(self.root_logits(), self.rules(), self.emission_logits(), num,
                        max_length=max_length, generator=generator)


__all__ = ["NeuralPCFG", "PCFGConfig", "ResidualMLP", "RULE_TYPES"]
