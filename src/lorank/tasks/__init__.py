"""lorank.tasks: the tasks ``lorank train --task NAME`` runs (one module each) and the registry.

* ``lm``: word-level HMM language models (:mod:`lorank.tasks.lm`);
* ``music``: HMMs on 88-key piano rolls (:mod:`lorank.tasks.music`);
* ``pcfg``: neural PCFG language models (:mod:`lorank.tasks.pcfg`);
* ``hsmm``: (low-rank) HSMMs on the CO2 series (:mod:`lorank.tasks.hsmm`).

:func:`load_run` rebuilds a task and its trained model from a checkpoint or a ``lorank
compress`` output directory.
"""

from lorank.tasks.base import TASKS, Task, get_task, register_task
from lorank.tasks.hsmm import HSMMTask, SeriesDataConfig
from lorank.tasks.lm import LMTask, TextDataConfig
from lorank.tasks.music import MusicDataConfig, MusicTask
from lorank.tasks.pcfg import PCFGDataConfig, PCFGTask
from lorank.tasks.runs import load_run, task_from_meta

__all__ = [
    "Task",
    "TASKS",
    "register_task",
    "get_task",
    "LMTask",
    "MusicTask",
    "PCFGTask",
    "HSMMTask",
    "TextDataConfig",
    "PCFGDataConfig",
    "MusicDataConfig",
    "SeriesDataConfig",
    "load_run",
    "task_from_meta",
]
