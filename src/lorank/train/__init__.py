"""lorank.train: a generic trainer (AdamW, clipping, reduce-on-plateau, periodic evaluation),
atomic resumable safetensors checkpoints, metrics.json, and torchrun data parallelism.

Tasks (:mod:`lorank.train.tasks`) plug models and data into the trainer; ``lm`` (HMM language
models) is built in.
"""

from lorank.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from lorank.train.distributed import DistContext
from lorank.train.metrics import Throughput, write_metrics
from lorank.train.tasks import TASKS, LMTask, Task, get_task, register_task
from lorank.train.trainer import TrainConfig, Trainer, TrainState, step_generator

__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainState",
    "step_generator",
    "Task",
    "LMTask",
    "TASKS",
    "register_task",
    "get_task",
    "DistContext",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "Throughput",
    "write_metrics",
]
