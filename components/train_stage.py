"""train-stage: one progressive IAGN stage (iagn.runner.train_stage), resuming the previous."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_stage(
    stage: int,
    dataset: Input[Dataset],
    params: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    model: Output[Model],
    metrics: Output[Metrics],
    init: Input[Model] = None,
    nodes: int = 0,
    gpus: int = 0,
    accelerator: str = "",
    image: str = "",
    secret: str = "",
    node_selector: Optional[dict] = None,  # noqa: UP045 (KFP reads Optional, not X | None)
    tolerations: Optional[list] = None,  # noqa: UP045
):
    """Train stage `stage` of the IAGN teacher from the previous stage's checkpoint.

    Args:
        stage: 1, 2 or 3.
        dataset: The validated dataset folder.
        params: The run's params.yaml (sections data, model, train, stageN).
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).
        model: The checkpoint (model, optimizer, history, data identity).
        metrics: The last epoch's loss and validation accuracies.
        init: The checkpoint of stage `stage - 1` (none for stage 1).
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
        init_path = init.path if init is not None else None
        last_epoch = run_training(
            f"stage{stage}",
            f"train-stage --stage {stage} --data {{dataset}} --params {{params}} "
            "--init {init} --out {out}".split(),
            {"dataset": dataset.path, "init": init_path, "out": model.path},
            settings,
            here=lambda: runner.train_stage(
                stage=stage,
                data=dataset.path,
                params=settings,
                out=model.path,
                init=init_path,
                quiet=False,  # an epoch line per epoch in the task's log: progress in the KFP UI
            ),
            image=image,
            secret=secret,
            placement={"node_selector": node_selector, "tolerations": tolerations},
        )
    log_metrics(metrics, last_epoch)
    model.metadata.update({"framework": "pytorch", "kind": "teacher", "stage": stage})
    model.metadata.update(sweep_metadata(settings))  # a sweep's trial: pick-best pairs by it
    print(f"stage {stage}: val accuracy {last_epoch.get('val_acc', float('nan')):.3f}")
