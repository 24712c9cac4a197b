"""The model card of a registered version: what it is, how it was made, how its served
prediction measures, and how it compares with the champion it met.

`iagn register` writes one for every version it registers (or finds registered), as
`card.md` (Markdown with the images beside it) and `card.html` (one self-contained file),
logs both as the artifacts `model_card/NAME/VERSION/` of the version's MLflow logged model
(`card_path`: one logged model can back versions of several registered models), and links
them from the version's description. `iagn models card NAME@ALIAS` prints or opens it.

    facts.py     gathering: the version, its checkpoint and evaluation, MLflow around them
    sections.py  the card's sections as blocks
    document.py  blocks -> Markdown and HTML
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from iagn.card.document import to_html, to_markdown
from iagn.card.facts import (
    CardFacts,
    decision_of,
    identity_rows,
    pipeline_validation,
    seed_evaluations,
    spread_of,
)
from iagn.card.sections import card_blocks
from iagn.io import write_text_atomic
from iagn.registry import TAG_COMPARED
from iagn.steps.register import Promote

CARD_DIR = "model_card"
CARD_MARKDOWN = "card.md"
CARD_HTML = "card.html"
IMAGES = ("reliability.png", "localization.png", "attention_gallery.png", "confused_pairs.png")


def gather(
    client,
    *,
    name: str,
    version: str,
    kind: str,
    model_id: str | None,
    checkpoint: dict[str, Any],
    params: dict[str, Any],
    metrics: dict[str, Any],
    eval_dir: Path,
    experiment_id: str,
    runs: dict[str, str | None],
    recipe: str,
    sha: str,
) -> CardFacts:
    """The card's facts for version `version` of `name`; `runs`: parent, source, register."""
    tags = dict(client.get_model_version(name, version).tags or {})
    champion = None
    compared = tags.get(TAG_COMPARED)
    if compared:
        champion = (compared, dict(client.get_model_version(name, compared).tags or {}))
    evaluations = seed_evaluations(client, experiment_id, kind, metrics, recipe, sha)
    return CardFacts(
        name=name,
        version=version,
        kind=kind,
        model_id=model_id,
        decision=decision_of(tags),
        version_tags=tags,
        checkpoint=checkpoint,
        params=params,
        metrics=metrics,
        eval_dir=Path(eval_dir),
        identity=identity_rows(tags, checkpoint, metrics, runs),
        champion=champion,
        validation=pipeline_validation(client, experiment_id, runs.get("parent")),
        seeds=len(evaluations),
        spread=spread_of(evaluations),
    )


def write_card(facts: CardFacts, promote: Promote, folder: Path) -> Path:
    """card.md, card.html and their images in `folder` (created); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in IMAGES:
        source = facts.eval_dir / image
        if source.is_file() and source.resolve() != (folder / image).resolve():
            shutil.copyfile(source, folder / image)
    blocks = card_blocks(replace(facts, eval_dir=folder), promote)
    title = f"{facts.name} version {facts.version}"
    write_text_atomic(folder / CARD_MARKDOWN, to_markdown(blocks))
    write_text_atomic(folder / CARD_HTML, to_html(blocks, title))  # last: it means complete
    return folder


def card_path(name: str, version: str) -> str:
    """Where a version's card lies among its logged model's artifacts: one logged model can
    back versions of several registered models, each with its own card."""
    return f"{CARD_DIR}/{name}/{version}"


def ui_link(experiment_id: str, model_id: str) -> str:
    """The MLflow UI's page of a logged model's artifacts, relative to the UI's root."""
    return f"#/experiments/{experiment_id}/models/{model_id}/artifacts"
