"""The model card `iagn register` writes for each version, against a real MLflow server:
logged to the version's model, linked from its description, read back by `iagn models card`."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run
from mlflow_server import MODEL_NAME, mlflow_server, tracked_pipeline
from test_registry import _candidate, use_pipeline_env

from iagn import card, runner, tracking
from iagn.card.document import Bullets, Image, Para, Table, to_html, to_markdown
from iagn.card.sections import wilson_interval
from iagn.io import sha256_file
from iagn.registry import TAG_PROMOTION

__all__ = ["mlflow_server", "tracked_pipeline"]  # fixtures used by the tests below

CARD_MODEL = "iagn-card-test"
LINK = re.compile(r"\[Model card\]\(#/experiments/(\d+)/models/(m-[0-9a-f]+)/artifacts\)")


def _card_files(pipeline, name: str, version: str, tmp: Path) -> dict[str, bytes]:
    """The card logged for a version, read back from MLflow with `iagn models card --out`."""
    out = tmp / f"{name}-{version}"
    pipeline.iagn("models", "card", f"{name}/{version}", "--out", str(out))
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_the_pipeline_registered_each_version_with_its_card(
    mlflow_server, tracked_pipeline, tmp_path
):
    client = mlflow_server.client()
    version = client.get_model_version(MODEL_NAME, "1")
    model_id = version.source.removeprefix("models:/")
    files = _card_files(tracked_pipeline, MODEL_NAME, "1", tmp_path)
    assert {card.CARD_MARKDOWN, card.CARD_HTML, *card.IMAGES} <= set(files)
    # Linked from the version's description, to its own logged model's page.
    link = LINK.search(version.description)
    assert link and link.group(2) == model_id
    assert version.description.startswith("student from pipeline run")
    assert client.get_logged_model(model_id).experiment_id == link.group(1)

    text = files[card.CARD_MARKDOWN].decode()
    metrics = json.loads(tracked_pipeline.path("build/eval/student/metrics.json").read_text())
    assert text.startswith(f"# Model card: {MODEL_NAME} version 1 (student)")
    assert version.tags[TAG_PROMOTION] in text
    assert "There was no champion when this version was registered." in text
    # Identity: the checkpoint file, the commit of the project it was trained in.
    assert sha256_file(tracked_pipeline.path("build/student.pt")) in text
    head = run(["git", "rev-parse", "HEAD"], cwd=tracked_pipeline.project).stdout.strip()
    assert f"| git commit | `{head}` |" in text
    # The served prediction's numbers, its interval, the per-class table, the pairs.
    low, high = wilson_interval(metrics["top1"], metrics["images"])
    assert f"top-1 {metrics['top1']:.3f} on {metrics['images']} test images" in text
    assert f"(95% interval {low:.3f}–{high:.3f})" in text
    assert text.startswith(f"# Model card: {MODEL_NAME} version 1 (student)\n\nA student: top-1")
    for name in metrics["per_class_accuracy"]:
        assert f"| {name} |" in text
    for pair in metrics["confused_pairs"]:
        assert f"`{pair['classes'][0]}` / `{pair['classes'][1]}`: {pair['errors']} errors" in text
    assert f"chance {metrics['pointing_game_chance']:.3f}" in text
    # The pipeline's own data validation, read from its validate run.
    assert "validation; warnings:" in text and "`no_leakage`" in text
    assert "## Limits" in text and "One training seed" in text
    # The HTML is one file: every image inlined, nothing fetched.
    page = files[card.CARD_HTML].decode()
    assert page.count('src="data:image/png;base64,') == len(card.IMAGES)
    assert re.findall(r'src="(?!data:)', page) == []
    # The teacher got its own card.
    teacher = _card_files(tracked_pipeline, f"{MODEL_NAME}-teacher", "1", tmp_path)
    teacher = teacher[card.CARD_MARKDOWN].decode()
    assert teacher.startswith(f"# Model card: {MODEL_NAME}-teacher version 1 (teacher)")
    assert "distillation" not in teacher


@dataclass
class TwoVersions:
    """CARD_MODEL version 1 (the pipeline's student, champion) and version 2 (another model
    of the same recipe, really evaluated, registered after it)."""

    champion: dict
    second: dict
    second_eval: Path
    register_out: Path
    params: dict


@pytest.fixture(scope="module")
def two_versions(mlflow_server, tracked_pipeline, tmp_path_factory) -> TwoVersions:
    tmp = tmp_path_factory.mktemp("card-versions")
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"].update(model_name=CARD_MODEL, register_teacher=False)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_pipeline_env(tracked_pipeline, monkeypatch)
        monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "card-first")
        student = tracked_pipeline.path("build/student.pt")
        evaluation = tracked_pipeline.path("build/eval/student")
        (champion,) = runner.register(student, evaluation, params)["outcomes"]
        # Other weights, as another seed gives, evaluated for real: a second point for the
        # spread of this recipe.
        path, _ = _candidate(tracked_pipeline, tmp, "second-seed")
        second_eval = tmp / "second-eval"
        tracked_pipeline.iagn(
            "evaluate",
            "--model",
            str(path),
            "--data",
            str(tracked_pipeline.data),
            "--out",
            str(second_eval),
            "--params",
            "params.yaml",
            "--quiet",
        )
        monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "card-second")
        (second,) = runner.register(path, second_eval, params, out=tmp / "register")["outcomes"]
        # Registering again: the same version, its card written again.
        (again,) = runner.register(path, second_eval, params, out=tmp / "register")["outcomes"]
        assert again["version"] == second["version"] and again["already_registered"]
    return TwoVersions(champion, second, second_eval, tmp / "register", params)


def test_a_later_version_shows_the_champion_beside_it_and_the_spread_over_seeds(
    mlflow_server, tracked_pipeline, two_versions, tmp_path
):
    client = mlflow_server.client()
    champion, outcome = two_versions.champion, two_versions.second
    assert champion["champion"] and champion["card"] is None  # no --out: nothing kept here
    local = Path(outcome["card"])
    assert local == two_versions.register_out / "card-student" / card.CARD_HTML
    files = _card_files(tracked_pipeline, CARD_MODEL, outcome["version"], tmp_path)
    assert files[card.CARD_HTML] == local.read_bytes()
    text = files[card.CARD_MARKDOWN].decode()
    out = two_versions.second_eval

    ours = json.loads((out / "metrics.json").read_text())
    theirs = json.loads(tracked_pipeline.path("build/eval/student/metrics.json").read_text())
    assert f"## Compared with the champion (version {champion['version']})" in text
    decision = client.get_model_version(CARD_MODEL, outcome["version"]).tags[TAG_PROMOTION]
    assert f"At registration, against the champion then: {decision}" in text
    difference = ours["top1"] - theirs["top1"]
    row = f"| `top1` | {ours['top1']:.4g} | {theirs['top1']:.4g} | {difference:+.4g} |"
    assert row in text and "decides (must beat)" in text
    mean = statistics.fmean([ours["top1"], theirs["top1"]])
    assert f"| `top1` | {ours['top1']:.4g} | {mean:.4g} |" in text
    assert "The spread is over 2 models of this recipe" in text
    # Registered outside the pipeline run that validated the data: the card says so.
    assert "No validation run was recorded under this version's pipeline run." in text

    # Registered twice: its link replaced, not added twice.
    description = client.get_model_version(CARD_MODEL, outcome["version"]).description
    assert len(LINK.findall(description)) == 1


def test_models_card_prints_writes_and_explains(mlflow_server, tracked_pipeline, tmp_path):
    shown = tracked_pipeline.iagn("models", "card", f"{MODEL_NAME}/1")
    assert shown.stdout.startswith(f"# Model card: {MODEL_NAME} version 1 (student)")
    written = tracked_pipeline.iagn(
        "models", "card", f"{MODEL_NAME}-teacher@champion", "--out", str(tmp_path / "cards")
    )
    folder = tmp_path / "cards"
    assert str(folder / card.CARD_HTML) in written.stdout
    assert {p.name for p in folder.iterdir()} >= {card.CARD_HTML, card.CARD_MARKDOWN}

    missing = tracked_pipeline.iagn("models", "card", f"{MODEL_NAME}@nobody", check=False)
    assert missing.returncode == 2
    assert f"{MODEL_NAME} has no version with the alias nobody" in missing.stderr
    bad = tracked_pipeline.iagn("models", "card", MODEL_NAME, check=False)
    assert bad.returncode == 2 and "write NAME@ALIAS (iagn@champion) or NAME/VERSION" in bad.stderr


def test_the_document_renders_the_same_blocks_to_markdown_and_escaped_html(tmp_path):
    image = tmp_path / "plot.png"
    shutil.copyfile(Path(__file__).parents[1] / "docs" / "synth_samples.png", image)
    blocks = [
        Para("a <b> & `code`"),
        Table(("class", "top-1"), [("a|b", 0.123456), ("none", None)]),
        Bullets(["one"]),
        Image(image, "a plot"),
    ]
    markdown = to_markdown(blocks)
    assert "| a\\|b | 0.1235 |" in markdown and "| none | – |" in markdown
    assert "![a plot](plot.png)" in markdown
    page = to_html(blocks, "t")
    assert "<p>a &lt;b&gt; &amp; <code>code</code></p>" in page
    assert "<td>a|b</td><td>0.1235</td>" in page
    assert page.count("data:image/png;base64,") == 1


@pytest.mark.parametrize(
    ("p", "n", "low", "high"), [(0.5, 100, 0.4038, 0.5962), (1.0, 20, 0.8389, 1.0)]
)
def test_wilson_interval(p, n, low, high):
    found = wilson_interval(p, n)
    assert found == pytest.approx((low, high), abs=1e-4)


# Set to a path to keep the screenshot of the card in the MLflow UI; the README's picture:
# IAGN_CARD_SCREENSHOT=docs/mlflow_model_card.png pytest tests/test_model_card.py -k ui
CARD_SCREENSHOT_ENV = "IAGN_CARD_SCREENSHOT"


def test_the_registry_ui_shows_champion_and_challenger_and_opens_the_card(
    mlflow_server, two_versions, tmp_path
):
    from playwright.sync_api import expect
    from test_mlflow_ui import chromium, keep_screenshot

    champion, challenger = two_versions.champion["version"], two_versions.second["version"]
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1500, "height": 1300})
        page = context.new_page()
        page.goto(f"{mlflow_server.url}/#/models/{CARD_MODEL}")
        rows = page.get_by_role("row")
        expect(rows.filter(has_text=f"Version {champion}")).to_contain_text("champion")
        expect(rows.filter(has_text=f"Version {challenger}")).to_contain_text("challenger")

        page.goto(f"{mlflow_server.url}/#/models/{CARD_MODEL}/versions/{challenger}")
        link = page.get_by_role("link", name="Model card")
        expect(link).to_be_visible(timeout=60_000)
        with context.expect_page() as opened:  # the description's links open a new tab
            link.click()
        card_page = opened.value
        for name in (card.CARD_DIR, CARD_MODEL, challenger, card.CARD_HTML):
            card_page.get_by_text(name, exact=True).first.click()
        shown = card_page.frame_locator("iframe.mlflow-html-iframe").locator("body")
        title = f"Model card: {CARD_MODEL} version {challenger} (student)"
        expect(shown).to_contain_text(title, timeout=30_000)
        expect(shown).to_contain_text(f"Compared with the champion (version {champion})")
        close = card_page.get_by_role("button", name="Close")  # the assistant's panel
        if close.count():
            close.first.click()
        shot = tmp_path / "card.png"
        card_page.screenshot(path=str(shot))
    keep_screenshot(shot, CARD_SCREENSHOT_ENV)


def test_speed_timed_on_other_hardware_is_not_compared(tmp_path):
    from iagn.card.facts import CardFacts
    from iagn.card.sections import comparison
    from iagn.steps.register import Promote

    def tags(top1: float, latency: float, device: str) -> dict[str, str]:
        return {"top1": repr(top1), "latency_ms": repr(latency), "iagn.eval_device": device}

    facts = CardFacts(
        name="m",
        version="2",
        kind="student",
        model_id=None,
        decision="promoted: top1 0.9 beats the champion's 0.8",
        version_tags=tags(0.9, 7.0, "CPU, 1 threads"),
        checkpoint={},
        params={},
        metrics={},
        eval_dir=tmp_path,
        identity=[],
        champion=("1", tags(0.8, 4.0, "CPU, 2 threads")),
    )
    text = to_markdown(comparison(facts, Promote()))
    assert "| `top1` | 0.9 | 0.8 | +0.1 | better | decides (must beat) |" in text
    assert "| `latency_ms` | 7 | 4 | +3 | not comparable |  |" in text
    assert "timed on CPU, 1 threads, the champion on CPU, 2 threads." in text
    facts.champion = ("1", tags(0.8, 4.0, "CPU, 1 threads"))
    assert "| `latency_ms` | 7 | 4 | +3 | worse |  |" in to_markdown(comparison(facts, Promote()))
