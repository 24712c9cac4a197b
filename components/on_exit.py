"""The exit handler: marks the MLflow parent run FAILED when a step failed, reports where it is."""

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def record_outcome(status: dsl.PipelineTaskFinalStatus, tracking_uri: str, experiment: str) -> str:
    """Runs after every other task; marks the MLflow parent run FAILED if any step failed.

    Args:
        status: The final status of the pipeline's steps (filled in by KFP).
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).

    Returns:
        JSON: the parent run's run_id, experiment_id, status and (scrubbed) tracking URI;
        {} when there is none.
    """
    import json

    from components.runtime import configure_step, readable_errors
    from iagn.tracking import describe_pipeline_parent, mark_pipeline_failed

    with readable_errors():
        configure_step(tracking_uri, experiment)
        if status.state == "SUCCEEDED":
            parent = describe_pipeline_parent()
            print(f"pipeline steps succeeded; MLflow parent run {parent.get('run_id', '(none)')}")
        else:
            reason = f"KFP: {status.pipeline_task_name} ended {status.state}"
            if status.error_message:
                reason += f": {status.error_message}"
            parent = mark_pipeline_failed(reason, status.pipeline_task_name)
            print(f"{reason}; MLflow parent run {parent.get('run_id', '(none)')} marked FAILED")
    return json.dumps(parent)
