"""validate: the Great Expectations gate (iagn.runner.validate); blocking failures stop the run."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(
    dataset: Input[Dataset],
    params: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    report: Output[Artifact],
    summary: Output[Markdown],
    checks: Output[HTML],
    metrics: Output[Metrics],
):
    """Validate the dataset; fail the task when a blocking expectation fails.

    Args:
        dataset: The fetched dataset folder.
        params: The run's params.yaml (section `validate`).
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).
        report: validation.json, summary.md and the Great Expectations Data Docs.
        summary: The Markdown summary (one row per expectation).
        checks: Every expectation with its examples, as one HTML page.
        metrics: Images, classes, blocking failures, warnings.
    """
    from components.pages import validation_html
    from components.runtime import (
        StepFailed,
        configure_step,
        readable_errors,
        step_params,
        write_text,
    )
    from iagn import runner
    from iagn.validation.report import failures_text

    with readable_errors():
        configure_step(tracking_uri, experiment, dataset.metadata)
        settings = step_params(params.path, None)
        result = runner.validate(dataset.path, settings, report.path)
        document = result.document
        write_text(summary.path, result.summary_path.read_text())
        write_text(checks.path, validation_html(document))
        metrics.log_metric("images", float(document["dataset"]["images"]))
        metrics.log_metric("classes", float(document["dataset"]["classes"]))
        metrics.log_metric("blocking_failures", float(len(result.blocking_failures)))
        metrics.log_metric("warnings", float(len(result.warnings)))
        warnings = failures_text(document, "warning")
        if warnings:
            print(f"data validation warnings (not blocking):\n{warnings}")
        if not result.success:
            raise StepFailed(
                "data validation failed: "
                + ", ".join(result.blocking_failures)
                + "\n"
                + failures_text(document, "blocking")
                + "\n  -> fix the data, or change validate.expectations in params.yaml "
                "(params_overrides), and run the pipeline again"
            )
    print(f"data validation passed: {len(document['expectations'])} expectations")
