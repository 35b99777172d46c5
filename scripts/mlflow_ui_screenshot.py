#!/usr/bin/env python
"""Open the MLflow UI of a tracking server in headless Chromium, screenshot the experiment's runs table, check it.

What a user sees when opening the link the project gives (:func:`pfp.tracking.experiment_url`):
the model-training runs table of the experiment (not the GenAI traces overview), with every run
that logged dataset inputs showing them under Dataset and every run that logged a model or
registered a model version showing it under Models. Parent runs are expanded so the stage runs
(train, evaluate, publish, ...) are checked too. The expectations come from the tracking API, so
a run without datasets or models is not asked to show any.

Exit 0: the page is right (PNG written). Exit 1: a check failed (each failure on one line; the
PNG is still written, look at it). Exit 2: it could not check (no Chromium, no Playwright, the
server does not answer, no such experiment).

Needs Playwright's Python package (``pip install playwright``; its own browser download,
``playwright install``, is not used) and Debian's Chromium (``apt-get install chromium``)::

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python scripts/mlflow_ui_screenshot.py \\
        --experiment pfp-pipeline --output mlflow-runs.png
    python scripts/mlflow_ui_screenshot.py --tracking-uri http://HOST:5000 --plain   # the bare #/experiments/ID link

``--plain`` opens ``#/experiments/ID`` without the view parameter: in MLflow 3.17 a browser
that never chose "Model training" lands on the GenAI overview there, and the check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pfp import tracking  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# a clean, quiet, offline browser: no sandbox (root in a container), no GPU, no calls home
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1800, "height": 1100}
HEADER = ".ag-header-cell"
DATASET_COLUMN, MODELS_COLUMN, NAME_COLUMN = "attributes.`Dataset`", "attributes.`Models`", "attributes.`Run Name`"
EXPANDER = 'button[data-component-id*="runnamecellrenderer"]'  # the "+" before a parent run's name
EMPTY = {"", "-"}


class CannotCheck(Exception):
    """The check could not run (exit 2)."""


@dataclass
class Expected:
    """What the tracking API says each run should show."""

    experiment_id: str
    names: dict[str, str] = field(default_factory=dict)  # run id -> run name
    datasets: dict[str, set[str]] = field(default_factory=dict)  # run id -> its dataset names
    models: dict[str, set[str]] = field(default_factory=dict)  # run id -> logged model names / registered versions


def expected_runs(uri: str, experiment: str) -> Expected:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tracking.check_tracking_server(uri, timeout=5, attempts=2)
    except tracking.TrackingUnavailable as error:
        raise CannotCheck(str(error)) from None
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CannotCheck(f"{uri}: no experiment named {experiment!r} (run the pipeline first, or pass --experiment)")
    expected = Expected(found.experiment_id)
    runs = client.search_runs([found.experiment_id], max_results=500)
    for run in runs:
        run_id = run.info.run_id
        expected.names[run_id] = run.info.run_name
        names = {item.dataset.name for item in (run.inputs.dataset_inputs if run.inputs else [])}
        if names:
            expected.datasets[run_id] = names
    try:
        for model in client.search_logged_models(experiment_ids=[found.experiment_id]):
            if model.source_run_id in expected.names:
                expected.models.setdefault(model.source_run_id, set()).add(model.name)
    except MlflowException:  # a server without logged models (MLflow 2): registered versions only
        pass
    for version in client.search_model_versions():
        if version.run_id in expected.names:
            expected.models.setdefault(version.run_id, set()).add(f"{version.name} v{version.version}")
    return expected


def _launch(playwright, chromium: str, profile: str):
    return playwright.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                                                         viewport=VIEWPORT)


def _table(page) -> dict[str, dict[str, str]]:
    """Row id (= run id) -> column id -> cell text, joined over ag-grid's pinned and scrolled parts."""
    cells = page.locator(".ag-row .ag-cell").evaluate_all(
        "els => els.map(e => [e.closest('.ag-row').getAttribute('row-id'), e.getAttribute('col-id'), e.innerText])")
    table: dict[str, dict[str, str]] = {}
    for row, column, text in cells:
        table.setdefault(row, {})[column] = " ".join(text.split())
    return table


def check_page(uri: str, expected: Expected, output: Path, *, chromium: str, plain: bool, timeout: float) -> list[str]:
    """Open the UI, expand the parent runs, screenshot to ``output``; the failed checks (empty: all passed)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url = f"{uri.rstrip('/')}/#/experiments/{expected.experiment_id}" if plain else tracking.experiment_url(expected.experiment_id, uri)
    failures: list[str] = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="mlflow-ui-") as profile:
        try:
            browser = _launch(playwright, chromium, profile)  # a new, empty profile: what a new user has
        except PlaywrightError as error:
            raise CannotCheck(f"{chromium}: Chromium did not start ({str(error).splitlines()[0]})") from None
        try:
            page = browser.new_page()
            page.goto(url, timeout=timeout * 1000)
            try:
                page.wait_for_selector(f"{HEADER}[col-id='{NAME_COLUMN}']", timeout=timeout * 1000)
                page.wait_for_selector(".ag-row", timeout=timeout * 1000)
            except PlaywrightTimeout:
                failures.append(f"{url}: no runs table after {timeout:g} s; the page is {page.url.split('#', 1)[-1]!r} "
                                "(the GenAI view, not the model-training runs)")
            if not failures:
                close = page.locator("button[aria-label='Close']")  # the assistant panel: room for the table
                if close.count():
                    close.first.click()
                for button in page.locator(EXPANDER).all():  # show the stage runs under each pipeline run
                    button.click()
                deadline = time.monotonic() + timeout
                while len(_table(page)) < len(expected.names) and time.monotonic() < deadline:
                    page.wait_for_timeout(500)
                page.wait_for_timeout(1000)  # dataset and model cells fill in after the rows
                failures += check_table(page, expected, url)
            page.screenshot(path=str(output), full_page=True)
        finally:
            browser.close()
    return failures


def check_table(page, expected: Expected, url: str) -> list[str]:
    failures = []
    view = page.url.split("#", 1)[-1]
    if f"/experiments/{expected.experiment_id}/runs" not in view or "workflowType=machine_learning" not in view:
        failures.append(f"{url}: the page is {view!r}, not the model-training runs table")
    headers = set(page.locator(HEADER).evaluate_all("els => els.map(e => e.getAttribute('col-id'))"))
    for column, title in ((DATASET_COLUMN, "Dataset"), (MODELS_COLUMN, "Models")):
        if column not in headers:
            failures.append(f"the runs table has no {title} column (columns: {sorted(h for h in headers if h)})")
    table = _table(page)
    for run_id, names in sorted(expected.datasets.items(), key=lambda item: expected.names[item[0]]):
        label = f"run {expected.names[run_id]} ({run_id})"
        cell = table.get(run_id, {}).get(DATASET_COLUMN)
        if run_id not in table:
            failures.append(f"{label}: not in the runs table")
        elif cell is None or cell in EMPTY or not any(name in cell for name in names):
            failures.append(f"{label}: Dataset shows {cell!r}, expected one of {sorted(names)}")
    for run_id, models in sorted(expected.models.items(), key=lambda item: expected.names[item[0]]):
        label = f"run {expected.names[run_id]} ({run_id})"
        cell = table.get(run_id, {}).get(MODELS_COLUMN)
        if run_id not in table:
            failures.append(f"{label}: not in the runs table")
        elif cell is None or cell in EMPTY:
            failures.append(f"{label}: Models shows {cell!r}, expected {sorted(models)}")
    if not expected.datasets:
        failures.append("no run of the experiment logged a dataset: nothing to show under Dataset")
    if not expected.models:
        failures.append("no run of the experiment logged or registered a model: nothing to show under Models")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow server, http(s)://HOST:PORT (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default=tracking.EXPERIMENT, help="experiment name (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("mlflow-ui-runs.png"), help="the PNG (default: %(default)s)")
    parser.add_argument("--chromium", default=os.environ.get("PFP_CHROMIUM", CHROMIUM), help="browser binary (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the page (default: %(default)s)")
    parser.add_argument("--plain", action="store_true", help="open the bare #/experiments/ID link (what a new browser gets)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri
    try:
        if not uri or not uri.startswith(("http://", "https://")):
            raise CannotCheck(f"tracking URI {uri!r}: the UI needs an MLflow server (--tracking-uri http://HOST:PORT)")
        if not Path(args.chromium).is_file():
            raise CannotCheck(f"{args.chromium}: no Chromium there (Debian: apt-get install chromium; or --chromium PATH)")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise CannotCheck("the Python package playwright is missing (pip install playwright; no `playwright install`)") from None
        expected = expected_runs(uri, args.experiment)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        failures = check_page(uri, expected, args.output, chromium=args.chromium, plain=args.plain, timeout=args.timeout)
    except CannotCheck as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    shown = f"{len(expected.names)} runs, {len(expected.datasets)} with datasets, {len(expected.models)} with models"
    print(f"{'FAILED' if failures else 'ok'}: experiment {args.experiment} ({shown}); screenshot {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
