"""Pipeline faults against real DVC, MLflow and Prefect processes (issue 22).

One tiny DVC workspace (prepare + train@mlp, SQLite tracking) is built once per module and copied
per test. The stages run as ``dvc repro`` runs them; faults are real: a tracking server that is
not there or is SIGKILLed, a stage process SIGKILLed while it writes its output, a full tmpfs,
two ``python -m flows.pipeline`` processes in one workspace.

What the project does about each (README "Reliability"):
- tracking server gone: the stage fails fast with one ``error:`` line naming the server (no
  buffering); the flow retries that error with backoff; outputs are not recorded in dvc.lock.
- a failed or killed stage: DVC deletes a stage's outputs before it runs it; the flow puts the
  previous ones back (``flows.pipeline.previous_outputs_kept``), and a killed writer's temp file
  is never an output and is removed by the next write (``pfp.io``).
- a full disk: ``error: cannot write PATH: No space left on device ...`` (exit 2), no temp left.
- two runs of one workspace: the second is refused (exit 3) before it touches the workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.reliability.report import record
from tests.servers import BIN, _process, _wait_healthy, free_port, source_env

REPO = Path(__file__).resolve().parents[2]

# the e2e tests' tiny params, smaller still (prepare: 6.5 s CPU instead of 10), one model, a few SVI steps
TINY = {
    "seed": 0, "models": ["mlp"],
    "data": {"mnist_dir": str(REPO / "data/embedded/mnist"), "ood_dir": str(REPO / "data/embedded/fashion-mnist"),
             "val_size": 100, "train_size": 300, "test_size": 100, "ood_size": 100},
    "ambiguous": {"train_images": 20, "val_images": 10, "test_images": 10, "labels_per_image": 5, "min_entropy": 0.05,
                  "max_mi": 0.5, "vae": {"epochs": 1, "hidden": [64], "latent_dim": 8}, "ensemble": {"members": 2, "epochs": 1}},
    "train": {"mlp": {"epochs": 1, "max_steps": 3}},
}
POSTERIOR = Path("models/mlp/posterior.npz")

# Loaded into every Python process of a stage (PYTHONPATH): SIGKILLs the process when it writes to the temp
# file of the output named by PFP_TEST_KILL_WRITING again after its first bytes reached the disk: mid-write.
KILLER = textwrap.dedent('''
    import os, signal, sys
    _target = os.environ.get("PFP_TEST_KILL_WRITING")

    def _killer(path):
        def profile(frame, event, arg):
            # the writer calls its file's write() again after some bytes reached the disk: kill it there
            if event == "c_call" and getattr(getattr(arg, "__self__", None), "name", None) == path:
                size = os.stat(path).st_size
                if size > 0:
                    with open(os.environ["PFP_TEST_KILL_MARKER"], "w") as marker:
                        marker.write(f"{path} {size}")
                    os.kill(os.getpid(), signal.SIGKILL)
        return profile

    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], str) and isinstance(args[1], str) and "w" in args[1]:
            name = os.path.basename(args[0])
            if name.startswith(f".{_target}.") and ".tmp" in name:
                sys.setprofile(_killer(args[0]))

    if _target:
        sys.addaudithook(_hook)
''')


def _env(**extra: str) -> dict[str, str]:
    env = source_env(DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                     PFP_MLFLOW_EXPERIMENT=f"reliability-{uuid.uuid4().hex[:8]}", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)  # SQLite in the workspace unless a test gives a server
    env.update(extra)
    return env


def _dvc(workspace: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=workspace, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _set_params(workspace: Path, **train_mlp) -> None:
    params_file = workspace / "params.yaml"
    values = yaml.safe_load(params_file.read_text())
    values["train"]["mlp"].update(train_mlp)
    params_file.write_text(yaml.safe_dump(values, sort_keys=False))


def _outputs(workspace: Path) -> dict[str, str]:
    """sha256 of every output of train@mlp (cached and uncached)."""
    return {name: _sha(workspace / name) for name in (str(POSTERIOR), "metrics/train_mlp.json", "plots/mlp/train/loss.png")}


def _stage_changed(workspace: Path, stage: str) -> dict:
    status = _dvc(workspace, "status", "--json", stage)
    return json.loads(status.stdout or "{}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A DVC workspace (git + DVC, like the flow's) where prepare and train@mlp ran once."""
    from flows.workspace import prepare_workspace

    root = tmp_path_factory.mktemp("pipeline_faults")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    workspace = prepare_workspace(root / "workspace", root / "tiny.yaml")
    for stage in ("prepare", "train@mlp"):
        result = _dvc(workspace, "repro", "--single-item", stage)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workspace


@pytest.fixture
def workspace(trained, tmp_path) -> Path:
    copy = tmp_path / "workspace"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


# ---------------------------------------------------------------- 1. the MLflow tracking server

def test_tracking_server_down_at_start_fails_fast_and_a_later_repro_finishes(workspace, mlflow_server):
    from flows.pipeline import previous_outputs_kept

    before, lock = _outputs(workspace), (workspace / "dvc.lock").read_text()
    _set_params(workspace, max_steps=4)
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(subprocess.CalledProcessError) as failed, previous_outputs_kept(workspace, "train@mlp"):
        result = _dvc(workspace, "repro", "--single-item", "train@mlp", env=_env(MLFLOW_TRACKING_URI=dead))
        result.check_returncode()
    seconds = time.monotonic() - start
    output = failed.value.stdout + failed.value.stderr
    assert f"error: MLFLOW_TRACKING_URI={dead}: the MLflow tracking server does not answer" in output
    assert "Traceback" not in output and seconds < 60, (seconds, output[-2000:])
    # DVC deleted the outputs before the stage; the flow put the previous ones back, as dvc.lock records them
    assert _outputs(workspace) == before and (workspace / "dvc.lock").read_text() == lock
    assert "changed outs" not in json.dumps(_stage_changed(workspace, "train@mlp"))  # only the params changed
    # the server is back (a real one): the same repro finishes, and its run is complete on the server
    env = _env(MLFLOW_TRACKING_URI=mlflow_server)
    result = _dvc(workspace, "repro", "--single-item", "train@mlp", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _stage_changed(workspace, "train@mlp") == {} and _outputs(workspace)[str(POSTERIOR)] != before[str(POSTERIOR)]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(env["PFP_MLFLOW_EXPERIMENT"])
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == "4"
    logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "elbo_loss"), key=lambda m: m.step)]
    assert logged == json.loads((workspace / "metrics/train_mlp.json").read_text())["elbo_loss"]  # the whole curve
    record("fault", "MLflow server down at start", tried=1, survived=1)


def _mlflow_command(root: Path, port: int) -> list[str]:
    """``mlflow server`` on ``port`` with its store under ``root`` (tests/servers.py's picks a new port each time)."""
    return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")]


def test_tracking_server_killed_mid_run_fails_the_stage_clearly_and_a_later_repro_loses_nothing(workspace, tmp_path):
    """The server (its process group) is SIGKILLed while train@mlp runs; after a restart (same store, same port)
    the repro completes."""
    from mlflow import MlflowClient

    before = _outputs(workspace)
    _set_params(workspace, max_steps=None, epochs=30)  # long enough to lose the server in the middle
    port, store = free_port(), tmp_path / "mlflow"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = _env(MLFLOW_TRACKING_URI=uri)
    with open(store / "first.log", "w") as log:
        server = subprocess.Popen(_mlflow_command(store, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"{uri}/health", server, store / "first.log", "MLflow server", 300)
        client = MlflowClient(uri)
        stage = subprocess.Popen(["dvc", "repro", "--single-item", "train@mlp"], cwd=workspace, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while True:  # the stage's run is open on the server: now it goes away
            experiment = client.get_experiment_by_name(env["PFP_MLFLOW_EXPERIMENT"])
            if experiment and client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
                break
            assert stage.poll() is None and time.monotonic() < deadline, "the stage never opened its MLflow run"
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, no goodbye
        server.wait(timeout=60)
    output, _ = stage.communicate(timeout=300)
    assert stage.returncode != 0
    assert f"error: train@mlp: MLFLOW_TRACKING_URI={uri}: the MLflow tracking server does not answer" in output, output[-3000:]
    assert "stopped answering during the run" in output and "Traceback" not in output
    assert "changed outs" in json.dumps(_stage_changed(workspace, "train@mlp"))  # DVC recorded nothing of it
    with _process(_mlflow_command(store, port), store / "second.log", None, f"{uri}/health", "MLflow server", 300):  # back
        result = _dvc(workspace, "repro", "--single-item", "train@mlp", env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
        history = client.get_metric_history(finished[0].info.run_id, "elbo_loss")
        assert len(finished) == 1 and len(history) == 30  # nothing lost: one loss per epoch
    assert _stage_changed(workspace, "train@mlp") == {} and _outputs(workspace) != before
    record("fault", "MLflow server killed mid-run", tried=1, survived=1)


# ---------------------------------------------------------------- 2. a stage killed mid-write

def _killer_env(tmp_path: Path, target: str, **extra: str) -> tuple[dict[str, str], Path]:
    hooks = tmp_path / "killer"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(KILLER)
    marker = tmp_path / "killed.txt"
    env = _env(PFP_TEST_KILL_WRITING=target, PFP_TEST_KILL_MARKER=str(marker), **extra)
    env["PYTHONPATH"] = f"{hooks}{os.pathsep}{env['PYTHONPATH']}"
    return env, marker


def _killed_at(marker: Path, complete_size: int) -> int:
    """The size of the output's temp file when the stage was killed: some bytes, not all."""
    assert marker.is_file(), "the stage was not killed while writing"
    size = int(marker.read_text().split()[-1])
    assert 0 < size < complete_size, f"not killed mid-write ({marker.read_text()}; complete: {complete_size} bytes)"
    return size


def test_train_killed_mid_write_of_its_posterior_is_never_picked_up_and_is_redone(workspace, tmp_path):
    from flows.pipeline import previous_outputs_kept
    from pfp.artifacts.posterior import load_posterior

    before, lock = _outputs(workspace), (workspace / "dvc.lock").read_text()
    complete = (workspace / POSTERIOR).stat().st_size
    _set_params(workspace, max_steps=4)
    env, marker = _killer_env(tmp_path, POSTERIOR.name)
    with pytest.raises(subprocess.CalledProcessError), previous_outputs_kept(workspace, "train@mlp"):
        result = _dvc(workspace, "repro", "--single-item", "train@mlp", env=env)
        # what DVC left while the flow has not yet put the previous outputs back: no posterior at all
        assert not (workspace / POSTERIOR).exists(), "a killed writer left a file at the output's path"
        result.check_returncode()
    size = _killed_at(marker, complete)
    # the previous outputs are back, dvc.lock is untouched, the killed writer's temp file is no output
    assert _outputs(workspace) == before and (workspace / "dvc.lock").read_text() == lock
    (leftover,) = (workspace / POSTERIOR.parent).glob(f".{POSTERIOR.name}.*")  # what it had written when killed
    assert size <= leftover.stat().st_size < complete
    # downstream: DVC sees train@mlp changed and redoes it before convert reads the posterior
    assert "train.mlp" in json.dumps(_stage_changed(workspace, "train@mlp"))
    result = _dvc(workspace, "repro", "--single-item", "train@mlp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    posterior = load_posterior(workspace / POSTERIOR, "mlp")  # complete and valid
    assert all(np.isfinite(value.numpy()).all() for value in posterior.loc.values())
    assert _stage_changed(workspace, "train@mlp") == {}
    assert list((workspace / POSTERIOR.parent).glob(f".{POSTERIOR.name}.*")) == []  # the dead writer's temp is gone
    record("fault", "stage killed mid-write (train)", tried=1, survived=1)


def test_prepare_killed_mid_write_of_its_arrays_is_detected_by_dvc_and_restored(workspace, tmp_path):
    """Plain ``dvc repro`` (no flow): the kill leaves no array file; DVC reports prepare changed and restores it."""
    prepared = workspace / "data/prepared"
    before = {p.name: _sha(p) for p in prepared.iterdir()}
    complete = (prepared / "dirty_mnist.npz").stat().st_size
    env, marker = _killer_env(tmp_path, "dirty_mnist.npz")
    result = _dvc(workspace, "repro", "--force", "--single-item", "prepare", env=env)
    assert result.returncode != 0
    _killed_at(marker, complete)
    assert not (prepared / "dirty_mnist.npz").exists() and not (prepared / "manifest.json").exists()
    assert "changed outs" in json.dumps(_stage_changed(workspace, "prepare"))
    # downstream: DVC sees prepare's outputs missing first; its deps match dvc.lock, so it checks the recorded
    # outputs out of its cache (a changed input would run the stage again), then finds train's input unchanged
    result = _dvc(workspace, "repro", "train@mlp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Stage 'prepare' is cached - skipping run, checking out outputs" in result.stdout
    assert "Stage 'train@mlp' didn't change" in result.stdout
    assert {p.name: _sha(p) for p in prepared.iterdir()} == before  # seeded: the same arrays, no temp file left
    record("fault", "stage killed mid-write (prepare)", tried=1, survived=1)


# ---------------------------------------------------------------- 3. two pipeline runs at once

def test_two_flow_runs_of_one_workspace_the_second_is_refused_before_it_touches_it(workspace, tmp_path):
    """Run A holds the workspace (it is training); run B, started meanwhile with other params, is refused at
    once, naming A, and changes nothing: A's flow log, params and outputs are A's. A is then interrupted."""
    from flows.guards import LOCK_FILE

    before, lock = _outputs(workspace), (workspace / "dvc.lock").read_text()
    params = {}
    for name, steps in (("a", 4), ("b", 6)):
        values = json.loads(json.dumps(TINY))
        values["train"]["mlp"]["max_steps"] = steps
        params[name] = tmp_path / f"{name}.yaml"
        params[name].write_text(yaml.safe_dump(values))
    env = _env(PREFECT_HOME=str(tmp_path / "prefect"))

    def flow(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--workdir", str(workspace), "--params",
                                 str(params[name]), "--retries", "0"], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    flow_log, train_log = workspace / "logs/flow.log", workspace / "logs/train@mlp.log"
    a = flow("a")
    try:
        deadline = time.monotonic() + 300
        while not (train_log.is_file() and flow_log.is_file() and flow_log.stat().st_size):  # A is in its training stage
            assert a.poll() is None, a.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "run A did not reach train@mlp"
            time.sleep(0.5)
        log_start = flow_log.read_bytes()[:200]
        b = flow("b")
        out, err = b.communicate(timeout=300)
        assert b.returncode == 3, err[-3000:]
        assert f"workspace {workspace} is in use by another pipeline run (pid {a.pid} on" in err
        assert a.poll() is None  # A goes on
        assert flow_log.read_bytes()[:200] == log_start and b"\0" not in flow_log.read_bytes()  # B did not truncate it
        assert yaml.safe_load((workspace / "params.yaml").read_text())["train"]["mlp"]["max_steps"] == 4  # A's
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGINT)  # Ctrl-C to the flow (not its Prefect server): it stops its stage, puts the outputs back
        try:
            a.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
    assert a.returncode == 130, a.stderr.read()[-3000:]
    assert _outputs(workspace) == before and (workspace / "dvc.lock").read_text() == lock  # no half-done training kept
    from flows.guards import workspace_lock

    with workspace_lock(workspace):  # free again
        pass
    assert (workspace / LOCK_FILE).is_file()
    record("fault", "two pipeline runs at once", tried=1, survived=1)
    record("probe", "two flow runs rewrite the workspace before DVC's lock", tried=1, survived=1)


# ---------------------------------------------------------------- 4. the disk full

def _mount_tmpfs(folder: Path, size: str) -> None:
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test mounts a tmpfs (root, mount permitted): {' '.join(command)}: {mounted.stderr}"


def test_disk_full_during_the_posterior_write_fails_clearly_and_keeps_the_previous_outputs(trained, tmp_path):
    from flows.pipeline import previous_outputs_kept

    # a real full file system: the workspace on a tmpfs with less room left than the new posterior takes
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    _mount_tmpfs(workspace, "64m")
    try:
        shutil.copytree(trained, workspace, symlinks=True, dirs_exist_ok=True)
        before, lock = _outputs(workspace), (workspace / "dvc.lock").read_text()
        complete = (workspace / POSTERIOR).stat().st_size
        _set_params(workspace, max_steps=4)
        room = complete // 2  # enough for MLflow's run, the loss plot and the metrics, not for the posterior
        subprocess.run(["mount", "-o", f"remount,size={shutil.disk_usage(workspace).used + room}", str(workspace)], check=True)
        with pytest.raises(subprocess.CalledProcessError) as failed, previous_outputs_kept(workspace, "train@mlp"):
            _dvc(workspace, "repro", "--single-item", "train@mlp").check_returncode()
        output = failed.value.stdout + failed.value.stderr
        assert f"error: cannot write {POSTERIOR}: No space left on device" in output, output[-3000:]
        assert "Traceback" not in output
        assert list((workspace / POSTERIOR.parent).glob(f".{POSTERIOR.name}.*")) == []  # no temp file left filling the disk
        # the previous good outputs are back, as dvc.lock records them (DVC had deleted them before the stage)
        assert _outputs(workspace) == before and (workspace / "dvc.lock").read_text() == lock
        assert "changed outs" not in json.dumps(_stage_changed(workspace, "train@mlp"))
    finally:
        subprocess.run(["umount", "--lazy", str(workspace)], check=True)
    record("fault", "disk full during a stage's write", tried=1, survived=1)
