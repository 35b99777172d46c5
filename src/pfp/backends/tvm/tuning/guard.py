"""The whole-model guard after tuning: the tuned module against the all-hand build, on the runner that tuned.

The run-off (:mod:`~.runoff`) picks each function's schedule from per-function medians; under a
busy host those can favour a schedule that makes the whole model slower (the main job once shipped
a LeNet batch-1 PFP library at 0.265 ms against 0.068 ms for the all-hand build). :func:`guard_modules`
times both whole modules in interleaved rounds (every other round in reverse order; the median of
each), locally in this process or on the RPC board, and keeps the tuned module only when its median
is at most ``margin`` above the hand build's.

While measuring locally it samples the host (:class:`HostLoad`): CPU time of every other process
from ``/proc/stat`` minus this process's own. When other processes used more than
``busy_fraction`` of the cores, the measurement is repeated (at most ``busy_retries`` times, after
``busy_wait_sec``); if the host stayed busy the hand build is kept: its schedules do not depend on
figures measured under load. A board over RPC is not sampled (``host_busy`` is None).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["GuardConfig", "HostLoad", "choose", "guard_modules"]

logger = logging.getLogger(__name__)

TUNED, HAND = "tuned", "hand"
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class GuardConfig:
    rounds: int = 9  # interleaved rounds; each runs both modules once
    margin: float = 0.03  # the tuned module is kept when its median is at most this fraction above the hand build's
    turn_ms: float = 50.0  # one module's turn in a round lasts about this long (calls averaged)
    busy_fraction: float = 0.25  # busy host: other processes used more than this fraction of all cores
    busy_retries: int = 2  # measurements repeated on a busy host before the hand build is kept
    busy_wait_sec: float = 10.0  # pause before such a repeat
    rpc_tracker: str | None = None  # "host:port": measure on the board under rpc_key, as the tuning did
    rpc_key: str | None = None
    session_timeout_sec: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"guard rounds must be a positive int, got {self.rounds!r}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"guard margin must be a fraction in [0, 1], got {self.margin!r}")
        if self.busy_fraction <= 0 or self.turn_ms <= 0 or self.busy_wait_sec < 0 or self.busy_retries < 0:
            raise ValueError("guard busy_fraction and turn_ms must be > 0, busy_wait_sec and busy_retries >= 0")


# --------------------------------------------------------------------------- host load

def _system_cpu() -> tuple[float, float, int]:
    """(busy CPU seconds of all cores, of which stolen by the hypervisor; cores) from ``/proc/stat``."""
    lines = Path("/proc/stat").read_text().splitlines()
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    values = [int(v) for v in lines[0].split()[1:9]]
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    busy = sum(values[:3]) + sum(values[5:8])
    return busy / _TICK, values[7] / _TICK, cores


def _own_cpu() -> float:
    times = os.times()  # every thread of this process (the TVM thread pool), and waited-for children
    return times.user + times.system + times.children_user + times.children_system


def _processes() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds) of every process readable now."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        name, _, rest = text.partition(" (")[2].rpartition(")")
        fields = rest.split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def _command(pid: int) -> str:
    """The start of a process's command line (evidence for the warning), or "" once it ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return ""


class HostLoad:
    """Samples the host around a ``with`` block: how much CPU other processes used meanwhile.

    :attr:`evidence` (after the block): ``other_cpu_fraction`` (other processes' CPU seconds per
    wall second and core, stolen time included), ``busy`` (above ``busy_fraction``), the seconds,
    the load averages and the processes that used the most CPU.
    """

    def __init__(self, busy_fraction: float) -> None:
        self.busy_fraction = busy_fraction
        self.evidence: dict[str, Any] = {}

    def __enter__(self) -> HostLoad:
        self._procs = _processes()
        self._system, self._steal, _ = _system_cpu()
        self._own = _own_cpu()
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._wall
        system, steal, cores = _system_cpu()
        own = _own_cpu() - self._own
        other = max(0.0, system - self._system - own)
        after = _processes()
        me = os.getpid()
        used = sorted(((cpu - self._procs.get(pid, (name, 0.0))[1], pid, name) for pid, (name, cpu) in after.items()
                       if pid != me), reverse=True)
        fraction = other / (wall * cores) if wall > 0 and cores else 0.0
        self.evidence = {"busy": fraction > self.busy_fraction, "other_cpu_fraction": round(fraction, 4),
                         "busy_fraction": self.busy_fraction, "cores": cores, "seconds": round(wall, 3),
                         "other_cpu_seconds": round(other, 3), "own_cpu_seconds": round(own, 3),
                         "steal_seconds": round(steal - self._steal, 3), "loadavg": list(os.getloadavg()),
                         "top_processes": [{"pid": pid, "name": name, "cpu_seconds": round(cpu, 3),
                                            "command": _command(pid)} for cpu, pid, name in used[:5] if cpu > 0]}


# --------------------------------------------------------------------------- contenders

class _Contender(Protocol):
    def call_ms(self, number: int) -> float:
        """Milliseconds per call of the module's ``main``, averaged over ``number`` calls."""


class _Local:
    """A compiled module (:class:`pfp.backends.tvm.runtime.CompiledModel`) run in this process."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        compiled.run(np.zeros(compiled.input_shape, np.float32))  # warm: the VM allocates on its first call

    def call_ms(self, number: int) -> float:
        return self.compiled.time(number=number, repeat=1)["median_ms"]


class _Remote:
    """A compiled module uploaded to the board of an RPC session and timed there (the round trip is not in the figure)."""

    def __init__(self, session, compiled, name: str) -> None:
        import tvm
        from tvm import relax

        from pfp.backends.tvm.runtime import export_library

        with tempfile.TemporaryDirectory(prefix="pfp_guard_") as folder:
            path = export_library(compiled.module, Path(folder) / f"{name}.so", compiled.target)
            session.upload(str(path), path.name)
        self.device = session.cpu()
        self.vm = relax.VirtualMachine(session.load_module(path.name), self.device)
        self.vm.set_input("main", tvm.runtime.tensor(np.zeros(compiled.input_shape, np.float32), self.device))
        self.vm.invoke_stateful("main")

    def call_ms(self, number: int) -> float:
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=1)
        return float(timer("main").results[0]) * 1e3


def _rounds(contenders: dict[str, _Contender], config: GuardConfig) -> dict[str, list[float]]:
    """Each contender's ms per call in ``config.rounds`` interleaved rounds (every other round reversed)."""
    # calls per turn: the same for both, from the faster one, so a turn lasts about turn_ms
    estimate = min(min(c.call_ms(1) for _ in range(3)) for c in contenders.values())
    number = max(1, math.ceil(config.turn_ms / max(estimate, 1e-6)))
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(config.rounds):
        for name in names[::-1] if index % 2 else names:
            samples[name].append(contenders[name].call_ms(number))
    return samples


def choose(tuned_ms: float, hand_ms: float, margin: float, *, busy: bool = False) -> str:
    """``"tuned"`` when the tuned module's median is at most ``margin`` above the hand build's, else ``"hand"``;
    ``"hand"`` on a host that stayed busy (those figures cannot be trusted)."""
    if busy:
        return HAND
    return TUNED if tuned_ms <= hand_ms * (1.0 + margin) else HAND


def guard_modules(tuned, hand, config: GuardConfig, *, label: str = "") -> dict[str, Any]:
    """Time ``tuned`` against ``hand`` (compiled models), interleaved, and say which to keep.

    ``hand=None``: the tuned module has every hand schedule, so it *is* the all-hand build; it is
    timed alone and kept (``identical: true``). Returns the report's ``guard`` entry: ``kept``,
    ``tuned_ms``, ``hand_ms`` (medians), ``ratio`` (tuned / hand), ``rounds``, ``margin``,
    ``runner``, ``host_busy`` (None: a board, not sampled) with ``busy_evidence``, ``attempts`` (one
    per measurement: medians and the host sample) and ``reason``.
    """
    session = None
    runner = "local"
    if config.rpc_tracker:
        session = _rpc_session(config)
        runner = f"rpc:{config.rpc_key}@{config.rpc_tracker}"
    try:
        if session is not None:
            contenders = {TUNED: _Remote(session, tuned, f"guard_{os.getpid()}_tuned")}
            if hand is not None:
                contenders[HAND] = _Remote(session, hand, f"guard_{os.getpid()}_hand")
        else:
            contenders = {TUNED: _Local(tuned)}
            if hand is not None:
                contenders[HAND] = _Local(hand)
        attempts = []
        # nothing to choose between identical builds: their figures are recorded, never re-measured
        for attempt in range(config.busy_retries + 1 if hand is not None else 1):
            if attempt:
                logger.warning("%shost busy while measuring (other processes used %.0f %% of %d cores; top: %s); "
                               "measuring again in %.0f s", f"{label}: " if label else "",
                               100 * attempts[-1]["host"]["other_cpu_fraction"], attempts[-1]["host"]["cores"],
                               _top(attempts[-1]["host"]), config.busy_wait_sec)
                time.sleep(config.busy_wait_sec)
            if session is None:
                with HostLoad(config.busy_fraction) as load:
                    samples = _rounds(contenders, config)
                host = load.evidence
            else:
                samples, host = _rounds(contenders, config), None
            medians = {name: float(np.median(values)) for name, values in samples.items()}
            attempts.append({"tuned_ms": medians[TUNED], "hand_ms": medians.get(HAND, medians[TUNED]),
                             "samples_ms": {name: [round(v, 5) for v in values] for name, values in samples.items()},
                             "host": host})
            if host is None or not host["busy"]:
                break
    finally:
        contenders = None
        if session is not None:
            import gc

            session = None
            gc.collect()  # the remote VMs hold the session; the board serves one at a time
    last = attempts[-1]
    busy = last["host"]["busy"] if last["host"] is not None else None
    tuned_ms, hand_ms = last["tuned_ms"], last["hand_ms"]
    if hand is None:
        kept, reason = TUNED, "every task kept its hand schedule: the tuned module is the all-hand build"
    else:
        kept = choose(tuned_ms, hand_ms, config.margin, busy=bool(busy))
        reason = ("the host stayed busy through every measurement: hand schedules kept" if busy else
                  f"tuned {'within' if kept == TUNED else 'more than'} {config.margin:.0%} of hand")
    if busy:
        logger.warning("%shost busy through %d measurement(s) (other processes used %.0f %% of %d cores; top: %s)%s",
                       f"{label}: " if label else "", len(attempts), 100 * last["host"]["other_cpu_fraction"],
                       last["host"]["cores"], _top(last["host"]),
                       "; keeping the hand schedules: re-run tuning on a quiet host" if hand is not None else "")
    return {"kept": kept, "tuned_ms": tuned_ms, "hand_ms": hand_ms, "ratio": tuned_ms / hand_ms,
            "rounds": config.rounds, "margin": config.margin, "identical": hand is None, "runner": runner,
            "host_busy": busy, "busy_evidence": last["host"], "attempts": attempts, "reason": reason}


def _top(host: dict) -> str:
    return ", ".join(f"{p['command'][:60] or p['name']} (pid {p['pid']}, {p['cpu_seconds']:.1f} s)"
                     for p in host["top_processes"][:3]) or "none"


def _rpc_session(config: GuardConfig):
    import tvm

    from pfp.backends.tvm.tuning.config import parse_tracker
    from pfp.backends.tvm.tuning.measure import check_tracker

    check_tracker(config.rpc_tracker, config.rpc_key)
    host, port = parse_tracker(config.rpc_tracker)
    return tvm.rpc.connect_tracker(host, port).request(config.rpc_key, priority=1,
                                                       session_timeout=config.session_timeout_sec)
