"""The compression report: a table per matrix plus model totals and latency."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorank._io import atomic_write_bytes


@dataclass
class LayerReport:
    """One weight matrix.

    ``params_*`` count the matrix's weights only (biases are untouched and excluded);
    ``flops_*`` are per input vector (token / time step): ``2 m n`` dense, ``2 r (m + n)``
    factorized (+ ``2 nnz`` sparse); an embedding lookup counts 0 dense and ``2 r dim``
    factorized.  Convolutions (kind ``"conv"``, shape that of the factorized matrix) count
    both from the modules (:func:`lorank.compress.conv.conv_costs`), FLOPs per example at the
    input size seen by ``example_input`` (per output position when none was given).
    ``weight_error`` is ``||W - W'||_F / ||W||_F``; ``output_error`` is
    ``||(W - W') X^T||_F / ||W X^T||_F`` over the calibration inputs X (when collected).
    Dictionary layers (CoSpaDi, DSFormer) count ``params_after`` as their ``storage_bytes`` in
    values of the layer's dtype (rounded up)."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int | None
    status: str  # "factorized" or "dense"
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    weight_error: float = 0.0
    output_error: float | None = None
    blocks: int = 1
    note: str = ""
    #: bytes of the stored factors when they are not all dense values of the layer's dtype
    #: (dictionary layers: dictionary + nonzero values + support bitmask)
    storage_bytes: int | None = None


@dataclass
class CompressionReport:
    method: str
    rank_mode: str
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    # ---- summaries -----------------------------------------------------------------------
    @property
    def target_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def target_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def target_reduction(self) -> float:
        """Fraction of the selected matrices' weights removed."""
        b = self.target_params_before
        return 1 - self.target_params_after / b if b else 0.0

    @property
    def model_reduction(self) -> float:
        b = self.model_params_before
        return 1 - self.model_params_after / b if b else 0.0

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    # ---- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
            "target_reduction": self.target_reduction,
            "model_reduction": self.model_reduction,
        }
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_bytes(path, (text + "\n").encode())
        return text

    @classmethod
    def from_dict(cls, d: dict) -> CompressionReport:
        d = dict(d)
        d.pop("summary", None)
        layers = [LayerReport(**{**x, "shape": tuple(x["shape"])}) for x in d.pop("layers")]
        return cls(layers=layers, **d)

    def table(self) -> str:
        """A Markdown table, one row per matrix, then totals."""
        unit = "token" if all(x.kind != "conv" for x in self.layers) else \
            "token (conv: per example or position, see note)"
        head = ("| layer | kind | shape | rank | params before | params after | "
                f"MFLOPs/{unit} before | after | weight err | output err | note |")
        rows = [head, "|" + "---|" * 11]
        for x in self.layers:
            rank = "-" if x.rank is None else (f"{x.rank}x{x.blocks}" if x.blocks > 1
                                               else str(x.rank))
            out = "-" if x.output_error is None else f"{x.output_error:.4f}"
            rows.append(
                f"| {x.name} | {x.kind} | {x.shape[0]}x{x.shape[1]} | {rank} | "
                f"{x.params_before:,} | {x.params_after:,} | {x.flops_before / 1e6:.3f} | "
                f"{x.flops_after / 1e6:.3f} | {x.weight_error:.4f} | {out} | {x.note} |"
            )
        lines = ["\n".join(rows), ""]
        lines.append(
            f"selected matrices: {self.target_params_before:,} -> {self.target_params_after:,} "
            f"weights ({100 * self.target_reduction:.1f}% removed); whole model: "
            f"{self.model_params_before:,} -> {self.model_params_after:,} parameters "
            f"({100 * self.model_reduction:.1f}% removed)"
        )
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            lines.append(f"latency (median forward of the example batch): "
                         f"{self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
