"""The flow's terminal output: library logs to files, a progress bar and one summary on the terminal.

The flow (``flows/pipeline.py``) runs each DVC stage with its output (DVC, the stage process, TVM,
the Meta Scheduler, Pyro, MLflow, warnings) in ``WORKSPACE/logs/STAGE.log``, and its own
process's (Prefect, MLflow) in ``WORKSPACE/logs/flow.log`` (:func:`redirect_output`). The
terminal gets a progress bar over the stages (:class:`StageProgress`), the summary table
(:func:`summary_table`) and, when a stage fails, the end of its log (:func:`tail`).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ["FLOW_LOG", "LOG_DIR", "Console", "StageFailed", "StageProgress", "duration", "progress_status", "redirect_output",
           "stage_log", "summary_table", "tail"]

#: the logs folder of a workspace, and the flow process's own log in it
LOG_DIR = "logs"
FLOW_LOG = "flow.log"
#: the metrics of the summary table: (key in metrics/evaluate.json, column title)
SUMMARY_METRICS = (("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"), ("auroc_mi", "OOD AUROC (MI)"),
                   ("auroc_sme", "OOD AUROC (SME)"))


def stage_log(log_dir: str | Path, stage: str) -> Path:
    """``log_dir/STAGE.log`` (a DVC stage name such as ``train@mlp`` is a valid file name)."""
    return Path(log_dir) / f"{stage}.log"


class StageFailed(RuntimeError):
    """A DVC stage exited with an error; its output is in ``log``."""

    def __init__(self, stage: str, returncode: int, log: str | Path | None = None, detail: str | None = None):
        self.stage, self.returncode, self.log, self.detail = stage, returncode, (str(log) if log else None), detail
        where = f"its log: {self.log}" if self.log else "its error is printed above"
        cause = f": {detail}" if detail else ""
        super().__init__(f"stage {stage} failed (exit {returncode}){cause}; {where}")

    def __reduce__(self):  # picklable with its fields (Prefect keeps a failed task's exception)
        return (StageFailed, (self.stage, self.returncode, self.log, self.detail))


@dataclass
class Console:
    """Streams on the terminal the process had before :func:`redirect_output` (out: results, err: progress, errors)."""

    out: TextIO
    err: TextIO


def redirect_output(log_file: str | Path) -> Console:
    """Send everything this process and its children write to stdout/stderr to ``log_file``, for good.

    File-descriptor level, so it catches what no logging setting reaches: C++ logs of TVM,
    warnings, Prefect's temporary server and its shutdown messages at exit. Returns streams on
    the original terminal for what the user should see.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return Console(out, err)


def _lines(text: str) -> list[str]:
    """Output lines as a terminal shows them: of a line a progress bar rewrote with ``\\r``, its last state."""
    lines = []
    for line in text.split("\n"):  # not splitlines(): it splits at "\r" too
        parts = [part for part in line.split("\r") if part.strip()]
        if parts:
            lines.append(parts[-1].rstrip())
    return lines


def _read_end(path: str | Path, size: int) -> str:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(file.tell() - size, 0))
        return file.read().decode("utf-8", errors="replace")


def tail(path: str | Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (progress bars collapsed to their last state)."""
    try:
        text = _read_end(path, 256 * 1024)
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(_lines(text)[-lines:])


# a tqdm bar: "DESC:  40%|████      | 4/10 [00:03<00:03, ...]" -> "DESC 4/10"
_TQDM = re.compile(r"^(?:(?P<desc>.*?):\s*)?\d+%\|[^|]*\|\s*(?P<count>\d+/\d+)")
# the stages' own progress lines: "[tune 3/8] mlp det batch 10 (...)", "benchmark mlp batch 1 ..."
_STEP = re.compile(r"^(?P<line>\[[a-z]+ \d+/\d+\][^(]*|benchmark \S+ batch \d+)")


def progress_status(text: str, width: int = 48) -> str | None:
    """The latest progress a stage's output shows (a tqdm bar or a ``[tune i/n]`` line), shortened; None if none."""
    for line in reversed(_lines(text)):
        line = line.strip()
        match = _TQDM.match(line)
        if match:
            status = f"{match['desc'] or ''} {match['count']}".strip()
        else:
            match = _STEP.match(line)
            if not match:
                continue
            status = match["line"].strip()
        return status if len(status) <= width else status[: width - 1] + "…"
    return None


class StageProgress:
    """A tqdm bar over the stages; while one runs, its log's latest progress line is shown beside the bar.

    On a terminal the bar redraws in place; otherwise (a pipe, a CI log) one line per finished stage.
    """

    def __init__(self, stages: list[str], stream: TextIO, *, interactive: bool | None = None, interval: float = 1.0):
        from tqdm import tqdm

        self.interactive = stream.isatty() if interactive is None else interactive
        self.stream, self.interval = stream, interval
        # the running stage and its progress go where tqdm puts the description, at the end of the line
        self.bar = tqdm(total=len(stages), unit="stage", file=stream, disable=not self.interactive, dynamic_ncols=True,
                        bar_format="pipeline {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}] {desc}")
        self.total, self.done = len(stages), 0
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._log: Path | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="stage-progress", daemon=True)
        if self.interactive:
            self._ticker.start()

    def start(self, stage: str, log: Path | None) -> None:
        with self._lock:
            self._stage, self._log, self._started = stage, log, time.monotonic()
            self.bar.set_description_str(stage, refresh=True)

    def finish(self, stage: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self._stage = self._log = None
            self.done += 1
            self.bar.update(1)
            if not self.interactive:
                count = f"[{self.done}/{self.total}]"
                self.stream.write(f"{count:<8}{stage:<18} {outcome:<7} {duration(seconds):>10}\n")
                self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._stage is None:
                    continue
                status = None
                if self._log is not None:
                    try:
                        status = progress_status(_read_end(self._log, 8192))
                    except OSError:
                        pass
                seconds = time.monotonic() - self._started
                self.bar.set_description_str(f"{self._stage} {seconds:.0f} s" + (f" · {status}" if status else ""), refresh=True)

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            self.bar.set_description_str("", refresh=False)
            self.bar.close()


def _format_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def duration(seconds: float) -> str:
    """``12.3 s`` or ``4 min 07 s``."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def summary_table(stages: Mapping[str, str], seconds: Mapping[str, float], metrics: Mapping[str, Mapping[str, Mapping]] | None,
                  *, promotion: Mapping[str, Mapping] | None = None, workspace: str | Path | None = None,
                  wall_seconds: float | None = None) -> str:
    """The end-of-run summary: per stage its outcome and time, per model and method the headline metrics.

    ``metrics``: metrics/evaluate.json (model -> method -> values; ``deployed``, the bundle, has an
    accuracy only). ``promotion``: model -> the promotion gate's decision (``GateDecision.to_dict()``).
    ``wall_seconds``: the whole run's time (with Prefect's start-up and MLflow), shown under the stages.
    """
    rows = [[stage, outcome, duration(seconds.get(stage, 0.0))] for stage, outcome in stages.items()]
    rows.append(["stages", f"{sum(o == 'ran' for o in stages.values())} ran", duration(sum(seconds.values()))])
    if wall_seconds is not None:
        rows.append(["whole run", "", duration(wall_seconds)])
    lines = [*_format_table(["stage", "outcome", "time"], rows, right={2}), ""]
    if metrics:
        header = ["model", "method", *(title for _, title in SUMMARY_METRICS)]
        table = []
        for model, methods in metrics.items():
            for method, values in methods.items():
                cells = [f"{values[key]:.4f}" if isinstance(values.get(key), (int, float)) else "-" for key, _ in SUMMARY_METRICS]
                table.append([model, method, *cells])
        lines += ["metrics (MNIST test set; OOD AUROC: MNIST vs Fashion-MNIST by mutual information / softmax entropy)", *_format_table(header, table, right=set(range(2, len(header)))), ""]
    if promotion:
        lines.append("promotion gate (registered models, champion alias)")
        for decision in promotion.values():
            verdict = "PROMOTED to champion" if decision.get("promoted") else "not promoted"
            lines.append(f"  {decision.get('registered_model')} v{decision.get('version')}: {verdict} ({decision.get('reason')}); "
                         f"champion v{decision.get('champion_after') or '-'}")
        lines.append("")
    if workspace is not None:
        lines.append(f"results: {workspace}/metrics/ (evaluate.json, latency.json), plots: {workspace}/plots/")
    return "\n".join(lines).rstrip() + "\n"
