"""flows.console: what the pipeline's terminal shows (progress, summary, a failed stage's log) and what goes to log files."""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

from flows import console as logs

REPO = Path(__file__).resolve().parents[1]
TQDM_OUTPUT = ("Running stage 'train@mlp':\n> python -m tasks.train mlp\n"
               "SVI mlp:   0%|          | 0/1065 [00:00<?, ?step/s]\rSVI mlp:   3%|▎         | 27/1065 [00:00<00:03, 267.01step/s]"
               "\rSVI mlp:   7%|▋         | 71/1065 [00:00<00:03, 274.73step/s, elbo_loss=11.0813]")


def test_progress_status_reads_the_last_tqdm_state_and_the_stages_own_steps():
    assert logs.progress_status(TQDM_OUTPUT) == "SVI mlp 71/1065"
    tune = "[tune 2/8] mlp pfp batch 10 (host, 0 trials/task)\n2026-12-04 INFO task fc1: hand schedule 0.1 ms\n"
    assert logs.progress_status(tune) == "[tune 2/8] mlp pfp batch 10"
    assert logs.progress_status("x\nbenchmark lenet batch 10 ...\nsome library line\n") == "benchmark lenet batch 10"
    assert logs.progress_status("  0%|          | 0/10 [00:00<?, ?it/s]") == "0/10"  # a bar without description
    assert logs.progress_status("Running stage 'report':\n> python -m tasks.report\n") is None
    assert len(logs.progress_status("[tune 1/2] " + "x" * 100)) == 48


def test_tail_shows_the_last_lines_with_progress_bars_collapsed(tmp_path):
    log = tmp_path / "train@mlp.log"
    log.write_text(TQDM_OUTPUT + "\n" + "\n".join(f"line {i}" for i in range(50)) + "\nerror: the last line\n")
    shown = logs.tail(log, lines=5).splitlines()
    assert shown == ["line 46", "line 47", "line 48", "line 49", "error: the last line"]
    log.write_text(TQDM_OUTPUT + "\nerror: boom\n")
    assert "\r" not in logs.tail(log) and "SVI mlp:   7%" in logs.tail(log) and "SVI mlp:   3%" not in logs.tail(log)
    assert "no log" in logs.tail(tmp_path / "missing.log")


def test_stage_failed_names_the_stage_and_its_log_and_survives_pickling():
    error = logs.StageFailed("tune@mlp", 2, "/w/logs/tune@mlp.log")
    assert str(error) == "stage tune@mlp failed (exit 2); its log: /w/logs/tune@mlp.log"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.stage, copy.returncode, copy.log, str(copy)) == ("tune@mlp", 2, "/w/logs/tune@mlp.log", str(error))
    assert "printed above" in str(logs.StageFailed("report", 1))


def test_stages_wait_passively_except_the_timed_benchmark(monkeypatch):
    from flows.workspace import stage_env as _stage_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert _stage_env("train@mlp")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in _stage_env("benchmark") and "OMP_WAIT_POLICY" not in _stage_env()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's choice stands
    assert _stage_env("train@mlp")["OMP_WAIT_POLICY"] == "ACTIVE"


def test_duration_reads_as_seconds_or_minutes():
    assert [logs.duration(s) for s in (0.04, 59.94, 60, 247.2)] == ["0.0 s", "59.9 s", "1 min 00 s", "4 min 07 s"]


def test_summary_table_lists_stages_with_times_and_metrics_per_model_and_method():
    stages = {"prepare": "ran", "train@mlp": "skipped"}
    seconds = {"prepare": 21.84, "train@mlp": 2.0}
    metrics = {"mlp": {"svi": {"accuracy": 0.928, "nll": 0.2682, "ece": 0.0566, "auroc_mi": 0.7516, "auroc_sme": 0.8157, "sets": {}},
                       "det": {"accuracy": 0.928, "nll": 0.2678, "ece": 0.0554, "auroc_mi": 0.5, "auroc_sme": 0.8156},
                       "deployed": {"score": "mi", "accuracy": 0.93, "flagged": {"mnist": 0.05}}}}
    promotion = {"mlp": {"registered_model": "pfp-mlp", "version": "2", "promoted": False, "reason": "ece rose 0.02 > 0.01",
                         "champion_after": "1"}}
    text = logs.summary_table(stages, seconds, metrics, promotion=promotion, workspace="runs/embedded", wall_seconds=95)
    lines = text.splitlines()
    assert any(line.split() == ["prepare", "ran", "21.8", "s"] for line in lines)
    assert any(line.split() == ["train@mlp", "skipped", "2.0", "s"] for line in lines)
    assert any(line.split() == ["stages", "1", "ran", "23.8", "s"] for line in lines)
    assert any(line.split() == ["whole", "run", "1", "min", "35", "s"] for line in lines)
    header = next(line for line in lines if line.startswith("model"))
    assert header.split()[:5] == ["model", "method", "accuracy", "NLL", "ECE"] and "OOD AUROC (MI)" in header
    assert any(line.split() == ["mlp", "svi", "0.9280", "0.2682", "0.0566", "0.7516", "0.8157"] for line in lines)
    assert any(line.split() == ["mlp", "deployed", "0.9300", "-", "-", "-", "-"] for line in lines)
    assert "  pfp-mlp v2: not promoted (ece rose 0.02 > 0.01); champion v1" in lines
    assert lines[-1] == "results: runs/embedded/metrics/ (evaluate.json, latency.json), plots: runs/embedded/plots/"


def test_progress_prints_one_line_per_stage_off_a_terminal():
    stream = io.StringIO()
    progress = logs.StageProgress(["prepare", "report"], stream)
    assert not progress.interactive
    progress.start("prepare", None)
    progress.finish("prepare", "ran", 1.25)
    progress.start("report", None)
    progress.finish("report", "skipped", 0.5)
    progress.close()
    assert [line.split() for line in stream.getvalue().splitlines()] == [["[1/2]", "prepare", "ran", "1.2", "s"],
                                                                        ["[2/2]", "report", "skipped", "0.5", "s"]]


def test_progress_bar_shows_the_running_stage_and_its_latest_progress(tmp_path):
    stream = io.StringIO()
    log = tmp_path / "train@mlp.log"
    log.write_text(TQDM_OUTPUT)
    progress = logs.StageProgress(["train@mlp"], stream, interactive=True, interval=0.05)
    progress.start("train@mlp", log)
    time.sleep(0.5)
    progress.finish("train@mlp", "ran", 0.5)
    progress.close()
    shown = stream.getvalue()
    assert "train@mlp" in shown and "SVI mlp 71/1065" in shown and "1/1" in shown


def test_redirect_output_sends_the_process_and_its_children_to_the_log(tmp_path):
    log = tmp_path / "logs" / "flow.log"
    script = textwrap.dedent(f"""
        import logging, subprocess, sys, warnings
        from flows import console as logs
        console = logs.redirect_output({str(log)!r})
        print("library print")
        logging.getLogger("tvm").warning("library warning")
        warnings.warn("a deprecation")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
        console.out.write("summary\\n")
        console.err.write("progress\\n")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "summary\n" and result.stderr == "progress\n"
    text = log.read_text()
    for line in ("library print", "library warning", "a deprecation", "child out", "child err"):
        assert line in text


def test_a_failing_stage_shows_its_error_and_log_tail_not_library_logs(tmp_path):
    """The real flow (Prefect, DVC, MLflow) on a corrupt data file: prepare fails; the terminal says which stage, where
    its log is and shows its end (the stage's own error line); Prefect's traceback stays in flow.log."""
    mnist = tmp_path / "mnist"
    shutil.copytree(REPO / "data/embedded/mnist", mnist)
    (mnist / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    params = tmp_path / "broken.yaml"
    config = yaml.safe_load((REPO / "configs/embedded.yaml").read_text())
    config["data"].update(mnist_dir=str(mnist), ood_dir=str(REPO / "data/embedded/fashion-mnist"))
    params.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "workspace"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(tmp_path / "prefect"), "PFP_MLFLOW_EXPERIMENT": "pfp-failing"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--workdir", str(workdir), "--params", str(params)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = workdir / "logs" / "prepare.log"
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""  # no summary table
    lines = result.stderr.splitlines()
    assert lines[0] == f"pfp pipeline in {workdir}; library logs: {workdir / 'logs'}/"
    # the stage's own error line (what the Prefect state says too), then where its whole output is
    assert any(re.fullmatch(rf"error: stage prepare failed \(exit \d+\): error: .+; its log: {re.escape(str(log))}", line)
               for line in lines), lines
    tail = lines[lines.index(f"--- last lines of {log} ---") + 1:]
    assert any("train-labels-idx1-ubyte.gz: corrupt or truncated gzip data" in line and line.startswith("error:") for line in tail)
    assert "Traceback" not in result.stderr and "Flow run" not in result.stderr and "prefect" not in result.stderr.lower()
    assert "corrupt or truncated gzip data" in log.read_text()
    flow_log = (workdir / "logs" / "flow.log").read_text()
    assert "StageFailed" in flow_log and "Finished in state Failed" in flow_log
