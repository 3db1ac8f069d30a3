"""lorank.train: a generic trainer (AdamW, clipping, reduce-on-plateau, periodic evaluation),
atomic resumable safetensors checkpoints, metrics.json, and torchrun data parallelism.

The trainer runs any task (:mod:`lorank.tasks`): a task supplies the data, the model and the
loss; the trainer owns the loop, the checkpoints and the metrics.
"""

from lorank.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from lorank.train.distributed import DistContext
from lorank.train.metrics import Throughput, write_metrics
from lorank.train.trainer import TrainConfig, Trainer, TrainState, check_resumable, step_generator

__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainState",
    "step_generator",
    "check_resumable",
    "DistContext",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "Throughput",
    "write_metrics",
]
