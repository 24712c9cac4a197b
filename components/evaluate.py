"""evaluate: judge a teacher or student checkpoint (iagn.runner.evaluate), then the gate.

The component says whether the model passes `register.gate`: the pipeline's `dsl.If`
registers the student only when it does. The gate itself is `iagn.steps.register`'s.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    params: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
) -> str:
    """Evaluate a checkpoint (evaluate.split: test; a sweep's trials: val) and gate it.

    Args:
        model: A teacher (stage 3) or student checkpoint.
        dataset: The validated dataset folder.
        params: The run's params.yaml (sections data, evaluate, register).
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).
        evaluation: metrics.json, reliability.json and the plots (register reads it).
        metrics: Accuracy per head, calibration, localization, speed, size.
        report: Metrics with the attention gallery, confusion matrix and reliability plot.
        summary: Key metrics and the gate's verdict.

    Returns:
        "passed" when the model passes register.gate, else "failed".
    """
    from components.pages import evaluation_html
    from components.runtime import (
        configure_step,
        evaluation_markdown,
        key_metrics,
        log_metrics,
        readable_errors,
        step_params,
        sweep_metadata,
        write_text,
    )
    from iagn import runner
    from iagn.steps.pick_best import trial_metrics
    from iagn.steps.register import gate_failures, register_config
    from iagn.tracking.trial import log_trial_metrics

    with readable_errors():
        configure_step(tracking_uri, experiment, dataset.metadata)
        settings = step_params(params.path, None)
        values = runner.evaluate(model.path, dataset.path, settings, evaluation.path, quiet=True)
        failures = gate_failures(values, register_config(settings).gate)
        if values["kind"] == "student":  # a sweep's trial: its val numbers on the trial run
            log_trial_metrics(settings, trial_metrics(values))
    log_metrics(metrics, values)
    evaluation.metadata.update({"kind": values["kind"], "split": values["split"]})
    evaluation.metadata.update(sweep_metadata(settings))
    write_text(report.path, evaluation_html(values, evaluation.path, key_metrics()))
    write_text(summary.path, evaluation_markdown(values, failures))
    verdict = "failed" if failures else "passed"
    print(f"{values['kind']}: top-1 {values['top1']:.3f}; registry gate {verdict}")
    for failure in failures:
        print(f"  gate: {failure}")
    return verdict
