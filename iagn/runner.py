"""Each pipeline step, tracked in MLflow: what the CLI, the DVC stages and the KFP components call.

One function per step. Each opens the step's nested MLflow run (iagn/tracking/: parent
run, tags, params), calls the pure step in iagn/steps/ with an epoch callback that logs
per-epoch metrics, then logs what the step produced: metrics, artifacts, the dataset it
read (`mlflow.log_input` with the manifest digest) and, for the finished teacher (stage 3)
and the student, the model (iagn/serving.py). Arguments are plain paths and values, never
argparse objects, so a KFP component calls the same functions as the CLI.

With tracking off (IAGN_TRACKING=off, or a torchrun rank other than 0) the steps run as
they are; only `register` needs MLflow. A tracking server (or its artifact store) that goes
away while a step runs does not stop it either: each step passes its output to
`tracking.step_run`, beside which what MLflow did not get is kept and sent later
(iagn/tracking/spool.py; `iagn tracking replay`). `register` still fails then: writing to
the registry is what it is for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iagn import tracking
from iagn.errors import IagnError
from iagn.params import section
from iagn.provenance import provenance_tags

CARD_LINK_SEPARATOR = "\n\n"  # between the decision and the card's link in a description
EVALUATION_FILES = (
    "metrics.json",
    "reliability.json",
    "confusion_matrix.png",
    "reliability.png",
    "attention_gallery.png",
    "localization.png",
    "confused_pairs.png",
)


def validate(
    data: str | Path,
    params: dict,
    out: str | Path,
    format: str | None = None,
    progress: Callable[[int, int], object] | None = None,
):
    """`iagn.steps.validate.run` in a `validate` run: verdict, report, summary, Data Docs."""
    from iagn.steps import validate as step

    settings = section(params, "validate")
    reading = params.get("data") or {}  # how training will read the data: the same limits
    limits = {k: reading[k] for k in ("max_pixels", "allow_outside_root") if k in reading}
    with tracking.step_run("validate", params, ("validate",), output=out) as run:
        report = step.run(data, settings, out, format, progress=progress, **limits)
        dataset = report.document.get("dataset", {})
        run.log_metrics(
            {
                "validation_success": float(report.success),
                "blocking_failures": len(report.blocking_failures),
                "warnings": len(report.warnings),
                "images": dataset.get("images", 0),
                "classes": dataset.get("classes", 0),
            }
        )
        run.log_artifact(report.report_path)
        run.log_artifact(report.summary_path)
        run.log_artifact(report.data_docs_path.parent, "data_docs")
        if not report.success:
            run.block("blocking expectations failed: " + ", ".join(report.blocking_failures))
    return report


def _log_trained(run: tracking.StepRun, result: dict, out: Path, model_kind: str | None) -> None:
    """After training: epochs the callback missed, the dataset and (when final) the model."""
    if not run.active:
        return
    from iagn.checkpoint import load_checkpoint

    run.log_history(result["history"])
    checkpoint = load_checkpoint(out)
    run.log_dataset(checkpoint["data"], "train")
    if model_kind is not None:
        run.log_model(out, model_kind, send_model)


def _model_tags(kind: str, sha: str, info) -> dict[str, str]:
    """What `register` finds a logged model by (iagn/registry.py)."""
    from iagn.registry import TAG_CHECKPOINT, TAG_KIND, TAG_MODEL_ID, TAG_MODEL_URI

    return {
        TAG_CHECKPOINT: sha,
        TAG_KIND: kind,
        TAG_MODEL_URI: info.model_uri,
        TAG_MODEL_ID: info.model_id,
    }


def send_model(record) -> None:
    """Log the model of a `model` record (`StepRun.log_model`) into the active run: at the
    end of training, or later from a spool (`iagn tracking replay`). A checkpoint changed
    since is not logged (`iagn register` logs the one it registers)."""
    import mlflow

    from iagn import serving
    from iagn.checkpoint import load_checkpoint
    from iagn.io import sha256_file
    from iagn.registry import TAG_CHECKPOINT, TAG_KIND
    from iagn.tracking.spool import MissingFile

    path, kind, sha = Path(record["checkpoint"]), record["kind"], record["sha256"]
    if not path.is_file() or sha256_file(path) != sha:
        raise MissingFile(
            f"{path} is not the {kind} checkpoint trained then (gone or changed); its model "
            "was not logged to the training run (`iagn register` logs the model it registers)"
        )
    checkpoint = load_checkpoint(path, kind=kind)
    info = serving.log_model(checkpoint, name=kind, tags={TAG_KIND: kind, TAG_CHECKPOINT: sha})
    mlflow.set_tags(_model_tags(kind, sha, info))


def _log_model(
    run: tracking.StepRun, checkpoint: dict, path: Path, kind: str, sha: str | None = None
):
    """Log the checkpoint as a pyfunc model; tag the run so `register` can find it.

    For `register`, which needs the model now: an outage is an error here, not kept."""
    from iagn import serving
    from iagn.io import sha256_file
    from iagn.registry import TAG_CHECKPOINT, TAG_KIND, LoggedModel

    sha = sha or sha256_file(path)
    with tracking.mlflow_errors(run.uri):
        info = serving.log_model(checkpoint, name=kind, tags={TAG_KIND: kind, TAG_CHECKPOINT: sha})
    run.set_tags(_model_tags(kind, sha, info))
    return LoggedModel(info.model_uri, run.run_id, info.model_id)


def train_stage(
    stage: int,
    data: str | Path | None,
    params: dict,
    out: str | Path,
    init: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """`iagn.steps.train_stage.run` in a `train-stage-N` run; stage 3 logs the teacher model."""
    from iagn.steps import train_stage as step

    sections = ("data", "model", "train", f"stage{stage}", "serve", "distributed")
    with tracking.step_run(f"train-stage-{stage}", params, sections, output=out) as run:
        result = step.run(
            stage=stage,
            data=data,
            params=params,
            out=out,
            init=init,
            device=device,
            quiet=quiet,
            callbacks=[run.log_epoch],
        )
        _log_trained(run, result, Path(out), "teacher" if stage == 3 else None)
    return result


def distill(
    teacher: str | Path,
    data: str | Path | None,
    params: dict,
    out: str | Path,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """`iagn.steps.distill.run` in a `distill` run; logs the student model."""
    from iagn.steps import distill as step

    with tracking.step_run(
        "distill", params, ("data", "distill", "serve", "distributed"), output=out
    ) as run:
        result = step.run(
            teacher, data, params, out, device=device, quiet=quiet, callbacks=[run.log_epoch]
        )
        _log_trained(run, result, Path(out), "student")
    return result


def evaluate(
    model_path: str | Path,
    data: str | Path | None,
    params: dict,
    out: str | Path,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """`iagn.steps.evaluate.run` in an `evaluate-<kind>` run: metrics, plots, metrics.json."""
    from iagn.steps import evaluate as step

    with tracking.step_run("evaluate", params, ("data", "evaluate"), output=out) as run:
        metrics = step.run(model_path, data, params, out, device=device, quiet=quiet)
        if run.active:
            _log_evaluation(run, metrics, Path(model_path), Path(out), params)
    return metrics


def _log_evaluation(
    run: tracking.StepRun, metrics: dict, model_path: Path, out: Path, params: dict
) -> None:
    import mlflow

    from iagn.checkpoint import load_checkpoint
    from iagn.io import sha256_file
    from iagn.params import recipe_digest
    from iagn.registry import (
        TAG_CHECKPOINT,
        TAG_EVAL_DIGEST,
        TAG_EVAL_SPLIT,
        TAG_KIND,
        TAG_RECIPE,
        find_logged_model,
    )

    kind = metrics["kind"]
    sha = sha256_file(model_path)
    logged = run.lookup(lambda: find_logged_model(mlflow.MlflowClient(), run.experiment_id, sha))
    values = {k: v for k, v in metrics.items() if k != "per_class_accuracy"}
    # Linked to the logged model (MLflow 3 shows them on its page) when training logged one
    # (not while MLflow is away: the metrics are kept, the link is not).
    run.log_metrics(values, model_id=logged.model_id if logged else None)
    run.log_metrics({f"class_acc/{name}": v for name, v in metrics["per_class_accuracy"].items()})
    run.set_tags(
        {
            "mlflow.runName": f"evaluate-{kind}",
            tracking.TAG_STEP: f"evaluate-{kind}",
            TAG_KIND: kind,
            TAG_CHECKPOINT: sha,
            "iagn.device": metrics.get("device", ""),
            "iagn.precision": metrics.get("precision", ""),
            # What the model card finds the other seeds of this recipe by.
            TAG_RECIPE: recipe_digest(params),
            TAG_EVAL_DIGEST: str(metrics.get("eval_data_digest", "")),
            TAG_EVAL_SPLIT: str(metrics.get("split", "")),
        }
    )
    for name in EVALUATION_FILES:
        run.log_artifact(out / name)
    run.log_dataset(load_checkpoint(model_path)["data"], metrics.get("split", "test"))


def _read_metrics(eval_dir: Path, kind: str, checkpoint: dict) -> dict[str, Any]:
    path = Path(eval_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise IagnError(
            f"{path} does not exist; run `iagn evaluate --model <{kind} checkpoint> --out "
            f"{eval_dir}` first"
        ) from None
    except json.JSONDecodeError as exc:
        raise IagnError(f"{path} is not valid JSON ({exc}); run `iagn evaluate` again") from None
    if metrics.get("kind") != kind:
        raise IagnError(f"{path} evaluates a {metrics.get('kind')} model, expected the {kind}")
    if metrics.get("data_digest") != checkpoint["data"]["digest"]:
        raise IagnError(
            f"{path} was measured for another model (data digest differs from the checkpoint's);"
            f" evaluate the {kind} checkpoint you register"
        )
    return metrics


def _register_one(
    run: tracking.StepRun,
    client,
    config,
    params: dict,
    kind: str,
    path: Path,
    eval_dir: Path,
    out: Path | None,
    may_promote: bool = True,
):
    """The gate, then (if passed) the registry and the version's model card, for one
    checkpoint: the outcome as a dict (with `card`, the card's HTML file when `out`)."""
    from iagn.checkpoint import load_checkpoint
    from iagn.io import sha256_file
    from iagn.registry import find_logged_model, weights_sha256
    from iagn.steps import register as step

    checkpoint = load_checkpoint(path, kind=kind)
    metrics = _read_metrics(eval_dir, kind, checkpoint)
    failures = step.gate_failures(metrics, config.gate)
    if failures:
        return step.Outcome(kind, config.registered_name(kind), False, failures).to_dict()
    sha = sha256_file(path)
    with tracking.mlflow_errors(run.uri):
        logged = find_logged_model(client, run.experiment_id, sha)
    if logged is None:  # trained untracked or elsewhere: log it here
        try:
            logged = _log_model(run, checkpoint, path, kind, sha)
        except IagnError as exc:
            # Uploading the model is where an artifact store (S3) that is down shows first.
            raise IagnError(
                f"could not log the {kind} model {path} to the artifact store of {run.uri}, so "
                f"nothing was registered: {exc}\n  -> once the artifact store answers, run "
                "`iagn register` again (registering is idempotent)"
            ) from None
    candidate = step.Candidate(
        kind=kind,
        model_uri=logged.model_uri,
        run_id=logged.run_id,
        model_id=logged.model_id,
        checkpoint_sha256=sha,
        metrics=metrics,
        tags={k: v for k, v in provenance_tags().items() if k.startswith("iagn.")},
        weights_sha256=weights_sha256(checkpoint["model_state"]),
    )
    with tracking.mlflow_errors(run.uri):
        outcome = step.register(client, candidate, config, run.pipeline_run_id, may_promote)
    card = _model_card(run, client, config, params, outcome, candidate, checkpoint, eval_dir, out)
    return {**outcome.to_dict(), "card": card}


def _model_card(run, client, config, params, outcome, candidate, checkpoint, eval_dir, out):
    """Write the version's model card, log it to its logged model, link it from the
    version's description; the local card.html when written under `out`, else None."""
    import tempfile

    from iagn import card
    from iagn.params import recipe_digest

    with tracking.mlflow_errors(run.uri):
        facts = card.gather(
            client,
            name=outcome.model_name,
            version=outcome.version,
            kind=outcome.kind,
            model_id=candidate.model_id,
            checkpoint=checkpoint,
            params=params,
            metrics=candidate.metrics,
            eval_dir=eval_dir,
            experiment_id=run.experiment_id,
            runs={"parent": run.parent_id, "source": candidate.run_id, "register": run.run_id},
            recipe=recipe_digest(params),
            sha=candidate.checkpoint_sha256,
        )
    with tempfile.TemporaryDirectory(prefix="iagn-card-") as tmp:
        folder = Path(out) / f"card-{outcome.kind}" if out is not None else Path(tmp)
        card.write_card(facts, config.promote, folder)
        if candidate.model_id:
            with tracking.mlflow_errors(run.uri):
                _log_card(client, outcome, candidate.model_id, folder)
    return str(folder / card.CARD_HTML) if out is not None else None


def _log_card(client, outcome, model_id: str, folder: Path) -> None:
    from iagn import card

    where = card.card_path(outcome.model_name, outcome.version)
    client.log_model_artifacts(model_id, str(folder), where)
    experiment = client.get_logged_model(model_id).experiment_id
    link = (
        f"[Model card]({card.ui_link(experiment, model_id)}) (`{where}/{card.CARD_HTML}`; "
        f"`iagn models card {outcome.model_name}/{outcome.version}`)"
    )
    current = client.get_model_version(outcome.model_name, outcome.version).description or ""
    kept = current.split(CARD_LINK_SEPARATOR)[0]  # a rerun replaces the link, never stacks
    client.update_model_version(
        outcome.model_name, outcome.version, description=f"{kept}{CARD_LINK_SEPARATOR}{link}"
    )


def register(
    student: str | Path,
    student_eval: str | Path,
    params: dict,
    teacher: str | Path | None = None,
    teacher_eval: str | Path | None = None,
    out: str | Path | None = None,
    ends_pipeline: bool = True,
    may_promote: bool = True,
) -> dict[str, Any]:
    """Gate, then register the student (and the teacher) in a `register` run.

    Returns {"passed", "outcomes": [per model: kind, model_name, gate_passed,
    gate_failures, version, already_registered, champion, reason (the promotion decision,
    also tagged `iagn.promotion` on the version), compared_with]}; also written to
    `out`/register.json when `out` is given. `passed` is False when the student failed the
    gate; the run is then marked FAILED (blocked).

    `ends_pipeline`: register is the last stage of the DVC pipeline and of a pipeline run
    named by IAGN_PIPELINE_RUN, so by default its success ends their parent run FINISHED
    (`tracking.step_run`; a KFP_RUN_ID parent is left to the KFP exit handler either way).
    The KFP component passes False: under `iagn-pipeline run-local` the key is
    IAGN_PIPELINE_RUN too, and the exit handler ends that parent.

    `may_promote` False registers `challenger` only (a sweep's winner: a person promotes it).
    """
    import mlflow

    from iagn.io import write_text_atomic
    from iagn.steps import register as step

    config = step.register_config(params)
    models = [("student", Path(student), Path(student_eval))]
    if config.register_teacher:
        if teacher is None or teacher_eval is None:
            raise IagnError(
                "params.yaml register.register_teacher is true: pass the teacher checkpoint "
                "and its evaluation folder too (--teacher, --teacher-eval)"
            )
        models.append(("teacher", Path(teacher), Path(teacher_eval)))
    if not tracking.tracking_enabled():
        raise IagnError(
            "`iagn register` writes to the MLflow Model Registry; unset IAGN_TRACKING=off"
        )
    with tracking.step_run(
        "register", params, ("register",), ends_pipeline=ends_pipeline, output=out
    ) as run:
        client = mlflow.MlflowClient()
        outcomes = [
            _register_one(run, client, config, params, kind, path, eval_dir, out, may_promote)
            for kind, path, eval_dir in models
        ]
        result = {"passed": outcomes[0]["gate_passed"], "outcomes": outcomes}
        for outcome in outcomes:
            kind = outcome["kind"]
            run.log_metrics({f"{kind}_gate_passed": float(outcome["gate_passed"])})
            if outcome["version"]:
                run.set_tags(
                    {
                        f"iagn.{kind}_version": f"{outcome['model_name']}/{outcome['version']}",
                        f"iagn.{kind}_champion": str(outcome["champion"]).lower(),
                    }
                )
        if out is not None:
            target = write_text_atomic(
                Path(out) / "register.json", json.dumps(result, indent=2) + "\n"
            )
            run.log_artifact(target)
        if not result["passed"]:
            run.block("the student failed the gate: " + "; ".join(outcomes[0]["gate_failures"]))
    return result
