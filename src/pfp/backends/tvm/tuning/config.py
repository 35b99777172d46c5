"""Settings and results of a tuning run: :class:`TuneConfig`, :class:`TuneReport`, :class:`ScheduleSource`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pfp.backends.tvm.targets import TargetName

__all__ = ["ScheduleSource", "TuneConfig", "TuneReport", "parse_tracker", "switches"]


class ScheduleSource(str, Enum):
    """Where a task's schedule comes from (the ``kept`` / ``other_source`` of :class:`TuneReport`)."""

    HAND = "hand"  # the current hand rules (pfp.backends.tvm.schedules)
    #: an earlier version of the hand rules (databases keep every record)
    EARLIER_HAND = "earlier_hand"
    META_SCHEDULE = "meta_schedule"  # a Meta Scheduler search candidate
    DEFAULT = "default"  # no measured schedule: TVM's default lowering


def switches(other_ms: float, hand_ms: float, margin: float) -> bool:
    """Whether a record measured at ``other_ms`` replaces a hand schedule measured at ``hand_ms``."""
    return other_ms < hand_ms * (1.0 - margin)


@dataclass
class TuneConfig:
    """Settings of one tuning run.

    ``rpc_tracker`` ("host:port") and ``rpc_key`` together select the RPC runner; with both
    unset the candidates run on this machine. The RPC runner measures on every server the
    tracker reports under the key at once (``rpc_workers=None``), or on at most ``rpc_workers``
    at a time. ``cooldown_ms`` (RPC only) rests the board between repeats of a measurement. ``builder_timeout_sec`` must cover a builder
    worker's start: the default build function imports ``tvm.s_tir.tensor_intrin`` (~60 s on
    2 cores); ``lean_builder=True`` (default) uses :func:`lean_build`, which does not.
    """

    trials_per_task: int = 64
    max_trials_global: int = 512
    num_trials_per_iter: int = 64
    target: str | Mapping | Any = TargetName.HOST.value
    work_dir: str | os.PathLike = "tuning"
    builder_timeout_sec: float = 300.0
    builder_workers: int | None = None  # None: one per logical CPU
    lean_builder: bool = True
    runner_timeout_sec: float = 60.0
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    session_timeout_sec: float = 60.0
    rpc_workers: int | None = None  # measurements at once; None: one per server under the key
    cooldown_ms: int = 0  # RPC: the board sleeps this long between repeats (time_evaluator's cooldown)
    number: int = 3  # measurements of each candidate: number x repeat, at least min_repeat_ms each
    repeat: int = 1
    min_repeat_ms: int = 100
    seed: int | None = 0
    population_size: int = 512  # evolutionary search; smaller = faster candidate generation
    genetic_num_iters: int = 4
    init_min_unmeasured: int = 50
    num_threads: int | str = "physical"  # threads of the search (cost model, evolution)
    cross_compiler: str | None = None  # None: aarch64-linux-gnu-gcc for aarch64 targets
    search: bool = True  # False: only measure and record the hand schedules (no Meta Scheduler search)
    finalists: int = 2  # best other records per task re-measured beside the hand schedule; 0: no run-off
    selection_rounds: int = 3  # interleaved rounds of the run-off
    #: another record replaces the hand schedule only when its run-off median is at least this
    #: fraction faster: near-ties are noise, and the current hand rules then make the same choice every run
    switch_margin: float = 0.03

    def __post_init__(self) -> None:
        for name in ("trials_per_task", "max_trials_global", "num_trials_per_iter", "selection_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TuneConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.finalists, int) or self.finalists < 0:
            raise ValueError(f"TuneConfig.finalists must be an int >= 0, got {self.finalists!r}")
        if not 0.0 <= self.switch_margin <= 1.0:
            raise ValueError(f"TuneConfig.switch_margin must be a fraction in [0, 1], got {self.switch_margin!r}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ValueError("set both rpc_tracker ('host:port') and rpc_key for the RPC runner, or neither "
                             f"(got rpc_tracker={self.rpc_tracker!r}, rpc_key={self.rpc_key!r})")
        if self.rpc_tracker is not None:
            parse_tracker(self.rpc_tracker)
        if self.rpc_workers is not None and (not isinstance(self.rpc_workers, int) or self.rpc_workers < 1):
            raise ValueError(f"TuneConfig.rpc_workers must be a positive int or None, got {self.rpc_workers!r}")
        if not isinstance(self.cooldown_ms, int) or self.cooldown_ms < 0:
            raise ValueError(f"TuneConfig.cooldown_ms must be an int >= 0, got {self.cooldown_ms!r}")
        if self.cooldown_ms and self.rpc_tracker is None:
            raise ValueError("TuneConfig.cooldown_ms rests an RPC board between repeats: set rpc_tracker and rpc_key")

    @property
    def uses_rpc(self) -> bool:
        return self.rpc_tracker is not None

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir)


@dataclass
class TuneReport:
    """What :func:`tune_module` did: tasks tuned or skipped, records before and after, seconds."""

    tasks: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    untunable: list[str] = field(default_factory=list)
    records_before: int = 0
    records_after: int = 0
    seconds: float = 0.0
    #: per task: the current hand schedule's measured ms, and the best other record's ms and
    #: source (side by side for the tasks in ``side_by_side``, see :func:`run_off`)
    hand_ms: dict[str, float] = field(default_factory=dict)
    other_ms: dict[str, float] = field(default_factory=dict)
    other_source: dict[str, ScheduleSource] = field(default_factory=dict)
    side_by_side: list[str] = field(default_factory=list)
    #: the run-off's :attr:`TuneConfig.switch_margin` (0 without a run-off)
    switch_margin: float = 0.0
    #: measurements the runner made at once (RPC: the servers under the key; 1 for the local runner)
    rpc_workers: int = 1
    #: every measurement: ``{"phase": "hand" | "search" | "run_off", "task", "board" ("host:port" the
    #: tracker handed out, or "local"), "ms" (median; None: failed), "start", "end" (the board's
    #: session, epoch seconds; None for the local runner)}`` (:class:`~.boards.BoardRecorder`)
    measurements: list[dict] = field(default_factory=list)
    #: wall-clock seconds of the Meta Scheduler's search (search, build and measure of every trial)
    search_seconds: float = 0.0

    def boards(self, phase: str | None = None) -> dict[str, int]:
        """Successful measurements per board (of ``phase``, or all)."""
        counts: dict[str, int] = {}
        for item in self.measurements:
            if item["ms"] is not None and phase in (None, item["phase"]):
                counts[item["board"]] = counts.get(item["board"], 0) + 1
        return dict(sorted(counts.items()))

    @property
    def search_trials(self) -> int:
        """Search candidates measured (successfully or not)."""
        return sum(item["phase"] == "search" for item in self.measurements)

    @property
    def trials_per_second(self) -> float | None:
        """Search trials per wall-clock second of the search (None without a search)."""
        return self.search_trials / self.search_seconds if self.search_trials and self.search_seconds else None

    def kept(self) -> dict[str, ScheduleSource]:
        """Per task, the source of the schedule the compiled module uses: the other record when it
        is faster than the hand schedule by ``switch_margin``, else the hand schedule."""
        choice = {}
        for name in self.tasks:
            hand, other = self.hand_ms.get(name), self.other_ms.get(name)
            if other is not None and (hand is None or switches(other, hand, self.switch_margin)):
                choice[name] = self.other_source[name]
            elif hand is not None:
                choice[name] = ScheduleSource.HAND
            else:
                choice[name] = ScheduleSource.DEFAULT
        return choice

    def table(self) -> list[dict]:
        kept = self.kept()
        return [{"task": name, "hand_ms": self.hand_ms.get(name), "other_ms": self.other_ms.get(name),
                 "other_source": self.other_source[name].value if name in self.other_source else None,
                 "kept": kept[name].value, "side_by_side": name in self.side_by_side} for name in self.tasks]

    @property
    def new_records(self) -> int:
        return self.records_after - self.records_before


def parse_tracker(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc_tracker must be 'host:port', got {address!r}")
    return host, int(port)
