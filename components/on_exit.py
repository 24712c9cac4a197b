"""The exit handler: ends the MLflow parent run of the pipeline run, once, and reports it."""

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def record_outcome(status: dsl.PipelineTaskFinalStatus, tracking_uri: str, experiment: str) -> str:
    """Runs after every other task; ends the MLflow parent run with the pipeline's outcome.

    The parent ends FINISHED when the steps succeeded, FAILED when one failed (KILLED when
    the run was cancelled), with KFP's task name and message as tags; a sweep's trial runs
    still RUNNING then end so too. A parent a failed step already marked FAILED stays
    FAILED. This is the only place a KFP pipeline's parent is set FINISHED
    (iagn/tracking/parent.py); an MLflow error fails this task, so its retries try again.

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
    from iagn.tracking import end_pipeline
    from iagn.tracking.trial import end_open_trials

    with readable_errors():
        configure_step(tracking_uri, experiment)
        if status.state == "SUCCEEDED":
            parent = end_pipeline("FINISHED")
            summary = "pipeline steps succeeded"
        else:
            summary = f"KFP: {status.pipeline_task_name} ended {status.state}"
            if status.error_message:
                summary += f": {status.error_message}"
            ended = "KILLED" if status.state == "CANCELLED" else "FAILED"
            parent = end_pipeline(ended, summary, status.pipeline_task_name)
            end_open_trials(ended)  # a sweep's trial runs that did not end with a step
        run_id = parent.get("run_id", "(none)")
        print(f"{summary}; MLflow parent run {run_id}: {parent.get('status', 'no parent')}")
    return json.dumps(parent)
