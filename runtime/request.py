"""A request's life in the engine, and what the engine reports about it.

    WAITING ──schedule──▶ RUNNING ──stop/length──▶ FINISHED
       ▲                     │
       └──── preempted ──────┘  (blocks freed; recomputed from prompt + output so far)

Aborted requests finish with reason "abort" from any state.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class RequestMetrics:
    arrival_time: float                      # time.monotonic() at add_request
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0               # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to the first step that ran it."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def tpot(self, num_generated: int) -> float | None:
        """Mean seconds per output token after the first."""
        if num_generated < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (num_generated - 1)

    def as_dict(self, num_generated: int) -> dict:
        return {"arrival_time": self.arrival_time, "queue_time": self.queue_time,
                "ttft": self.ttft, "tpot": self.tpot(num_generated),
                "num_cached_tokens": self.num_cached_tokens,
                "num_preemptions": self.num_preemptions}


@dataclass
class RequestOutput:
    """One request's state as the engine reports it after a step (or at the end).

    `token_ids`/`text` are everything generated so far (text with a stop string cut
    off); `new_token_ids`/`new_text` are what this report adds to the previous one.
    """
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None         # "stop", "length" or "abort" once finished
    stop_reason: int | str | None = None     # the stop token id or stop string that ended it
    metrics: dict = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def now() -> float:
    return time.monotonic()
