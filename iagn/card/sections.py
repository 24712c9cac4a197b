"""The model card's sections, as document blocks, from `CardFacts` (no I/O but the images'
existence). Numbers come from the evaluation of the served prediction (metrics.json)."""

from __future__ import annotations

import math
from typing import Any

from iagn.card.document import Block, Bullets, Details, Heading, Image, Para, Table, cell
from iagn.card.facts import SPREAD_METRICS, CardFacts
from iagn.registry import TAG_EVAL_DEVICE, VERSION_METRICS
from iagn.steps.register import LOWER_IS_BETTER, Promote, metrics_from_tags

WORST_CLASSES = 10
SPEED_METRICS = ("latency_ms", "throughput_ips")
Z95 = 1.96


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy `p` measured on `n` images."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _image(facts: CardFacts, name: str, alt: str) -> list[Block]:
    path = facts.eval_dir / name
    return [Image(path, alt)] if path.is_file() else [Para(f"({name} was not written.)")]


def summary(facts: CardFacts) -> list[Block]:
    m = facts.metrics
    low, high = wilson_interval(float(m["top1"]), int(m.get("images", 0)))
    served = f" serving its `{m.get('served')}` prediction" if facts.kind == "teacher" else ""
    text = (
        f"A {facts.kind}{served}: top-1 {m['top1']:.3f} on "
        f"{m.get('images', '?')} {m.get('split', 'test')} images (95% interval "
        f"{low:.3f}–{high:.3f})"
    )
    if isinstance(m.get("pointing_game"), int | float):
        text += (
            f", attention on the right part {m['pointing_game']:.3f} of the time (chance "
            f"{m['pointing_game_chance']:.3f})"
        )
    text += f", {m.get('latency_ms', float('nan')):.3g} ms per image on {m.get('device', '?')}."
    return [
        Heading(f"Model card: {facts.name} version {facts.version} ({facts.kind})", 1),
        Para(text),
        Para(f"Registry decision: {facts.decision}"),
    ]


def identity(facts: CardFacts) -> list[Block]:
    rows = [("registered model", f"`{facts.name}` version {facts.version}")]
    if facts.model_id:
        rows.append(("MLflow logged model", f"`{facts.model_id}`"))
    return [Heading("Identity"), Table(("", "value"), rows + facts.identity)]


def comparison(facts: CardFacts, promote: Promote) -> list[Block]:
    """This version against the champion it was compared with at registration."""
    if facts.champion is None:
        return [
            Heading("Compared with the champion"),
            Para("There was no champion when this version was registered."),
        ]
    number, champion_tags = facts.champion
    ours = metrics_from_tags(facts.version_tags)
    theirs = metrics_from_tags(champion_tags)
    here, there = facts.version_tags.get(TAG_EVAL_DEVICE), champion_tags.get(TAG_EVAL_DEVICE)
    # Speed measured on other hardware (or thread counts) says nothing about the models.
    other_device = here != there
    rows = []
    for name in VERSION_METRICS:
        if name not in ours or name not in theirs:
            continue
        difference = ours[name] - theirs[name]
        better = difference < 0 if name in LOWER_IS_BETTER else difference > 0
        role = ""
        if name == promote.metric:
            role = "decides (must beat)"
        elif name == promote.localization_metric:
            role = f"may lose at most {promote.localization_tolerance:g}"
        verdict = "=" if difference == 0 else ("better" if better else "worse")
        if other_device and name in SPEED_METRICS:
            verdict = "not comparable"
        rows.append((f"`{name}`", ours[name], theirs[name], f"{difference:+.4g}", verdict, role))
    blocks = [
        Heading(f"Compared with the champion (version {number})"),
        Para(f"At registration, against the champion then: {facts.decision}"),
        Table(("metric", "this version", f"champion v{number}", "difference", "", "rule"), rows),
    ]
    if other_device:
        blocks.append(
            Para(
                f"Latency and throughput are not comparable: this version was timed on "
                f"{here or 'an unrecorded device'}, the champion on "
                f"{there or 'an unrecorded device'}."
            )
        )
    return blocks


def _epochs(params: dict, stage: int) -> Any:
    return (params.get(f"stage{stage}") or {}).get("epochs", params["train"].get("epochs"))


def recipe(facts: CardFacts) -> list[Block]:
    p = facts.params
    model, train = p.get("model", {}), p.get("train", {})
    checkpoint = facts.checkpoint
    trained = checkpoint.get("trained_on") or {}
    device = trained.get("device", "not recorded")
    if int(trained.get("processes", 1)) > 1:
        device = f"{trained['processes']} processes × {device}"
    resolved = (checkpoint.get("train_config") or {}).get("precision_resolved", "?")
    rows = [
        (
            "teacher",
            f"IAGN on {model.get('backbone')} (weights {model.get('weights')}), jigsaw "
            f"{model.get('jigsaw')}, {model.get('pooling', 'max')} pooling",
        ),
        ("teacher epochs (stage 1 / 2 / 3)", " / ".join(str(_epochs(p, s)) for s in (1, 2, 3))),
        (
            "teacher optimisation",
            f"batch {train.get('batch_size')}, lr head {train.get('lr_head')} / backbone "
            f"{train.get('lr_backbone')}, views {train.get('jigsaw_views')}, precision "
            f"{train.get('precision')}, seed {train.get('seed')}",
        ),
    ]
    if facts.kind == "student":
        d = p.get("distill", {})
        rows += [
            (
                "student",
                f"{d.get('student')} ending after layer {d.get('student_layers', 4)}, output "
                f"stride {d.get('student_output_stride')}",
            ),
            (
                "distillation",
                f"{d.get('epochs')} epochs, batch {d.get('batch_size')}, lr {d.get('lr')}, KD "
                f"weight {d.get('kd_alpha')} at T={d.get('kd_temperature')}, attention "
                f"transfer {d.get('attention_weight')}, seed {d.get('seed')}",
            ),
        ]
    rows += [
        ("image size", f"resize {p['data'].get('resize')}, crop {p['data'].get('crop')}"),
        ("precision (this model's training)", str(resolved)),
        ("trained on", str(device)),
    ]
    return [Heading("Training recipe"), Table(("", "value"), rows)]


def serving(facts: CardFacts) -> list[Block]:
    s = facts.metrics.get("serving") or {}
    rows = [
        ("prediction", s.get("aggregation")),
        ("temperature", s.get("temperature")),
        ("precision", s.get("precision")),
        (
            "box drawn from the map",
            f"{s.get('box_method')} (threshold {s.get('box_threshold')}, size {s.get('box_size')})",
        ),
    ]
    if s.get("aggregation") == "two_pass":
        rows.append(("two-pass crop", f"base {s.get('base')}, weight {s.get('crop_weight')}"))
    chosen = s.get("chosen_on") or {}
    if chosen:
        rows.append(
            ("chosen on", f"the {chosen.get('split', 'val')} split, {chosen.get('images')} images")
        )
    return [
        Heading("Served configuration"),
        Para("Every consumer (evaluation, `iagn predict`, MLflow serving) serves exactly this."),
        Table(("", "value"), rows),
    ]


def metrics_table(facts: CardFacts) -> list[Block]:
    m = facts.metrics
    rows = []
    for name in SPREAD_METRICS:
        if not isinstance(m.get(name), int | float):
            continue
        s = facts.spread.get(name)
        if s is not None and s.n > 1:
            rows.append((f"`{name}`", m[name], s.mean, s.std, f"{s.low:.4g}–{s.high:.4g}", s.n))
        else:
            rows.append((f"`{name}`", m[name], None, None, None, 1))
    if facts.seeds > 1:
        note = (
            f"The spread is over {facts.seeds} models of this recipe (the same params, other "
            "seeds) evaluated on the same data."
        )
    else:
        note = (
            "One model of this recipe so far: train it again with another `train.seed` and "
            "`distill.seed` (nothing else changed) and the cards of the later versions show "
            "the spread."
        )
    return [
        Heading("Metrics of the served prediction"),
        Para(note),
        Table(("metric", "this version", "mean", "std", "range", "models"), rows),
    ]


def per_class(facts: CardFacts) -> list[Block]:
    accuracy = facts.metrics.get("per_class_accuracy") or {}
    ranked = sorted(accuracy.items(), key=lambda item: (item[1], item[0]))
    worst = ranked[:WORST_CLASSES]
    if len(ranked) <= WORST_CLASSES:
        return [Heading("Per-class accuracy"), Table(("class", "top-1"), ranked)]
    return [
        Heading("Per-class accuracy"),
        Para(f"The {len(worst)} weakest of {len(ranked)} classes:"),
        Table(("class", "top-1"), worst),
        Details(f"All {len(ranked)} classes", [Table(("class", "top-1"), ranked)]),
    ]


def calibration(facts: CardFacts) -> list[Block]:
    m = facts.metrics
    text = (
        f"Expected calibration error {m.get('ece', float('nan')):.4f} with the temperature "
        f"{m.get('temperature', 1.0):.3g} fitted on validation data; "
        f"{m.get('ece_uncalibrated', float('nan')):.4f} without it."
    )
    return [
        Heading("Calibration"),
        Para(text),
        *_image(facts, "reliability.png", "reliability diagram"),
    ]


def localization(facts: CardFacts) -> list[Block]:
    m = facts.metrics
    if not isinstance(m.get("pointing_game"), int | float):
        return [
            Heading("Localization"),
            Para("Not measured: the evaluation data has no part boxes."),
        ]
    rows = [
        (
            "pointing game (peak inside the part)",
            m["pointing_game"],
            m["pointing_game_chance"],
            m["pointing_game_lift"],
        ),
        (
            "box accuracy (IoU ≥ 0.5)",
            m["box_accuracy"],
            m["box_accuracy_chance"],
            m["box_accuracy_lift"],
        ),
    ]
    deletion = [
        (f"erase {key.rsplit('_', 1)[1]}%", m[key], m[key.replace("attended", "random")])
        for key in sorted(m)
        if key.startswith("deletion_attended_")
    ]
    return [
        Heading("Localization against its chance level"),
        Table(("", "this version", "chance", "lift"), rows),
        Para(
            "Deletion: how much the served class probability drops when the most attended "
            "pixels are erased, against as many random pixels (a faithful map drops more)."
        ),
        Table(("", "most attended", "random"), deletion),
        *_image(facts, "localization.png", "IoU distribution and deletion curves"),
    ]


def speed(facts: CardFacts) -> list[Block]:
    m = facts.metrics
    rows = [
        ("latency, one image", f"{m.get('latency_ms', float('nan')):.3g} ms"),
        ("throughput", f"{m.get('throughput_ips', float('nan')):.4g} images/s"),
        ("parameters", f"{int(m.get('parameters', 0)):,}"),
        ("checkpoint", f"{m.get('checkpoint_mb', float('nan')):.3g} MB"),
        ("measured on", f"{m.get('device', '?')}, {m.get('precision', '?')}"),
    ]
    return [Heading("Latency and size"), Table(("", "value"), rows)]


def gallery(facts: CardFacts) -> list[Block]:
    return [
        Heading("Attention gallery"),
        Para("Where the model looks on a fixed sample of test images, with its box and the truth."),
        *_image(facts, "attention_gallery.png", "attention gallery"),
    ]


def confused(facts: CardFacts) -> list[Block]:
    pairs = facts.metrics.get("confused_pairs") or []
    if not pairs:
        return [Heading("Most confused pairs"), Para("No class was mistaken for another.")]
    items = [
        f"`{a}` / `{b}`: {p['errors']} errors ({p['first_as_second']} {a} taken for {b}, "
        f"{p['second_as_first']} the other way)"
        for p in pairs
        for a, b in [p["classes"]]
    ]
    return [
        Heading("Most confused pairs"),
        Bullets(items),
        Para("Each row: an image, the map for its true class and the map for the other."),
        *_image(facts, "confused_pairs.png", "confused pairs"),
    ]


def _status(entry: dict) -> str:
    if entry.get("success"):
        return "✓"
    return "✗" if entry.get("level") == "blocking" else "⚠"


def validation(facts: CardFacts) -> list[Block]:
    document = facts.validation
    if document is None:
        return [
            Heading("Data validation"),
            Para("No validation run was recorded under this version's pipeline run."),
        ]
    dataset = document.get("dataset", {})
    verdict = "passed" if document.get("success") else "FAILED"
    rows = [
        (_status(e), f"`{e['name']}`", e.get("level"), cell(e.get("observed_value")))
        for e in document.get("expectations", [])
    ]
    return [
        Heading("Data validation"),
        Para(
            f"The pipeline's data ({dataset.get('root')}, {dataset.get('format')}: "
            f"{dataset.get('images')} images, {dataset.get('classes')} classes) {verdict} "
            f"validation; warnings: {', '.join(document.get('warnings', [])) or 'none'}."
        ),
        Table(("", "expectation", "level", "observed"), rows),
    ]


def limits(facts: CardFacts) -> list[Block]:
    """What the evaluation data cannot show, with this evaluation's numbers."""
    m = facts.metrics
    n = int(m.get("images", 0))
    low, high = wilson_interval(float(m["top1"]), n)
    classes = len(m.get("per_class_accuracy") or {}) or 1
    items = [
        f"Top-1 is measured on {n} images: its 95% interval is {low:.3f}–{high:.3f}; a "
        "difference between two versions smaller than that is noise.",
        f"About {n / classes:.0f} images per class: one class's accuracy moves in steps of "
        f"{classes / max(n, 1):.2f}.",
        "The test images come from the same dataset as the training images: accuracy under "
        "other cameras, seasons, image quality or unseen classes is not measured.",
        f"Latency is measured one image at a time on {m.get('device', '?')} in "
        f"{m.get('precision', '?')}; other hardware, batching or precision differs.",
    ]
    if facts.seeds < 2:
        items.append("One training seed: how much another seed changes these numbers is unknown.")
    if not isinstance(m.get("pointing_game"), int | float):
        items.append("No part boxes: whether the attention is on the right part is unknown.")
    else:
        items.append(
            "Localization is judged on the annotated part boxes of the evaluation data; a map "
            "on an unannotated but discriminative part counts as a miss."
        )
    return [Heading("Limits"), Bullets(items)]


def card_blocks(facts: CardFacts, promote: Promote) -> list[Block]:
    return [
        *summary(facts),
        *comparison(facts, promote),
        *identity(facts),
        *recipe(facts),
        *serving(facts),
        *metrics_table(facts),
        *per_class(facts),
        *calibration(facts),
        *localization(facts),
        *speed(facts),
        *gallery(facts),
        *confused(facts),
        *validation(facts),
        *limits(facts),
    ]
