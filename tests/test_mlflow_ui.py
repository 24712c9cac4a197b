"""Comparing two runs in the MLflow UI, as a person would: headless Chromium on the real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from mlflow_server import mlflow_server

from iagn import provenance, runner, tracking

__all__ = ["mlflow_server"]  # the fixture used below

CHROMIUM = Path("/usr/bin/chromium")
# Flags that work on these machines (../shared/STACK.md).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Set to a path to keep the screenshot; the README's picture is refreshed with
# IAGN_UI_SCREENSHOT=docs/mlflow_compare_runs.png pytest tests/test_mlflow_ui.py
SCREENSHOT_ENV = "IAGN_UI_SCREENSHOT"
LEARNING_RATES = (0.02, 0.05)


@pytest.fixture(scope="module")
def two_runs(mlflow_server, tiny_synth, tmp_path_factory) -> tuple[str, list[str]]:
    """Two real stage-1 trainings that differ only in train.lr_head: (experiment id, run ids)."""
    from test_training import tiny_params

    out = tmp_path_factory.mktemp("ui-runs")
    with pytest.MonkeyPatch.context() as env:
        for name in (tracking.ENV_PIPELINE_RUN, provenance.ENV_KFP_RUN, tracking.ENV_PARENT_RUN):
            env.delenv(name, raising=False)
        for name, value in mlflow_server.env("ui-compare").items():
            env.setenv(name, value)
        env.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        env.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        for rate in LEARNING_RATES:
            params = tiny_params(tiny_synth)
            params["train"]["lr_head"] = rate
            runner.train_stage(1, None, params, out / f"lr{rate}.pt", quiet=True)
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("ui-compare").experiment_id
    runs = client.search_runs([experiment], f"tags.`{tracking.TAG_STEP}` = 'train-stage-1'")
    by_rate = {float(item.data.params["train.lr_head"]): item.info.run_id for item in runs}
    assert sorted(by_rate) == sorted(LEARNING_RATES)
    return experiment, [by_rate[rate] for rate in LEARNING_RATES]


@contextlib.contextmanager
def chromium():
    """Headless system Chromium through Playwright (a fresh temporary profile each time)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "install Chromium: apt-get install -y chromium chromium-driver"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


def open_compare_view(browser, server_url: str, run_ids: list[str], experiment: str, height: int):
    """A page on MLflow's compare view of `run_ids`, once the UI has shown it."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.goto(
        f"{server_url}/#/compare-runs?runs={json.dumps(run_ids)}"
        f"&experiments={json.dumps([experiment])}"
    )
    expect(page.get_by_text(f"Comparing {len(run_ids)} Runs from 1 Experiment")).to_be_visible(
        timeout=60_000
    )
    return page


def test_compare_two_runs_in_the_ui(mlflow_server, two_runs, tmp_path):
    from playwright.sync_api import expect

    experiment, run_ids = two_runs
    with chromium() as browser:
        page = open_compare_view(browser, mlflow_server.url, run_ids, experiment, 1900)
        body = page.locator("body")
        for run_id in run_ids:
            expect(body).to_contain_text(run_id)
        expect(body).to_contain_text("train.lr_head")
        for rate in LEARNING_RATES:
            expect(body).to_contain_text(str(rate))
        expect(body).to_contain_text("val_acc")
        # The assistant panel, if the UI opens one, would hide half of the comparison.
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()
        # Parameters that differ only: what a person comparing two runs looks at first.
        page.get_by_role("switch").first.click()
        expect(page.get_by_role("row").filter(has_text="data.crop")).to_have_count(0)
        expect(page.get_by_role("row").filter(has_text="train.lr_head")).to_have_count(1)
        shot = tmp_path / "compare-runs.png"
        page.screenshot(path=str(shot), full_page=True)
    keep_screenshot(shot, SCREENSHOT_ENV)


def keep_screenshot(shot: Path, variable: str) -> None:
    """Check the screenshot is a PNG; copy it into the repo when `variable` names a path
    (how the README's pictures are refreshed)."""
    assert shot.read_bytes()[:4] == b"\x89PNG"
    keep = os.environ.get(variable)
    if keep:
        target = REPO_ROOT / keep
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
