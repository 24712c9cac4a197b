"""distill: the finished teacher teaches the compact student (iagn.runner.distill)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(
    teacher: Input[Model],
    dataset: Input[Dataset],
    params: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    student: Output[Model],
    metrics: Output[Metrics],
    nodes: int = 0,
    gpus: int = 0,
    accelerator: str = "",
    image: str = "",
    secret: str = "",
    node_selector: Optional[dict] = None,  # noqa: UP045 (KFP reads Optional, not X | None)
    tolerations: Optional[list] = None,  # noqa: UP045
):
    """Distill the stage-3 teacher into the single-head student that is served.

    Args:
        teacher: The stage-3 checkpoint.
        dataset: The validated dataset folder.
        params: The run's params.yaml (sections data, distill).
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).
        student: The student checkpoint.
        metrics: The last epoch's loss and validation accuracy.
        nodes: Nodes of a Kubeflow Trainer TrainJob (0: params distributed.nodes).
        gpus: GPUs of this task, or of each node: one process per GPU under torchrun (0:
            params distributed.procs_per_node).
        accelerator: The GPUs' resource name, for a TrainJob's resources per node.
        image: The image a TrainJob runs (the pipeline's).
        secret: The Kubernetes secret a TrainJob's pods read credentials from.
        node_selector: A TrainJob's nodes' node selector.
        tolerations: A TrainJob's nodes' tolerations (default: the GPUs' usual taint).
    """
    from components.runtime import (
        configure_step,
        log_metrics,
        readable_errors,
        run_training,
        scaled_params,
        step_params,
        sweep_metadata,
    )
    from iagn import runner

    with readable_errors():
        configure_step(tracking_uri, experiment, dataset.metadata)
        settings = scaled_params(step_params(params.path, None), nodes, gpus, accelerator)
        last_epoch = run_training(
            "distill",
            [
                "distill",
                "--teacher",
                "{teacher}",
                "--data",
                "{dataset}",
                "--params",
                "{params}",
                "--out",
                "{out}",
            ],
            {"teacher": teacher.path, "dataset": dataset.path, "out": student.path},
            settings,
            here=lambda: runner.distill(
                teacher=teacher.path,
                data=dataset.path,
                params=settings,
                out=student.path,
                quiet=False,  # an epoch line per epoch in the task's log: progress in the KFP UI
            ),
            image=image,
            secret=secret,
            placement={"node_selector": node_selector, "tolerations": tolerations},
        )
    log_metrics(metrics, last_epoch)
    student.metadata.update({"framework": "pytorch", "kind": "student"})
    student.metadata.update(sweep_metadata(settings))  # a sweep's trial: pick-best pairs by it
    print(f"student: val accuracy {last_epoch.get('val_acc', float('nan')):.3f}")
