"""Serving many requests (lesson 10): request state, batching policies, the
step runner, the engine and its HTTP front end.

Data flow: :class:`Engine.add_request` -> :class:`Scheduler` (which
sequences run next) -> :class:`ModelRunner` (one packed step over the paged
KV pool) -> sampling -> :class:`RequestOutput` snapshots.
"""

from .engine import Engine, EngineStats
from .runner import ModelRunner
from .scheduler import POLICIES, ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import RequestOutput, Sequence, Status

__all__ = ["Engine", "EngineStats", "ModelRunner", "POLICIES", "ScheduledBatch", "Scheduler",
           "SchedulerConfig", "RequestOutput", "Sequence", "Status"]
