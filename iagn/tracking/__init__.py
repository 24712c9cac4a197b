"""Experiment tracking with MLflow: one parent run per pipeline execution, a nested run per step.

Every step (validate, each training stage, distill, evaluate, register) runs inside
`step_run(...)`, whichever orchestrator calls it (the `iagn` CLI, `dvc repro`, a KFP
component, a notebook): see `iagn/runner.py`. One module per job:
    store.py   where runs go: the URI and its credentials, MLflow's HTTP limits, whether the
               server answers, the experiment, MLflow failures as one readable error
    parent.py  the pipeline's parent run: finding or creating it, its status, ending it
    step.py    a step's run: `step_run`, `StepRun` (params, metrics, artifacts, datasets)
    trial.py   a sweep's trial runs: a trial step's run nests under its trial's run, itself
               a child of the sweep's parent run (iagn-pipeline sweep)
    spool.py   what a step sends, and where it is kept while MLflow does not answer: a
               tracking server or artifact store that goes away during a step does not stop
               it; the spool beside the step's output is sent when MLflow answers again or
               by `iagn tracking replay`

Where runs go
    MLFLOW_TRACKING_URI unset: MLflow's embedded default, the SQLite file `mlflow.db` in the
    current (project) folder, artifacts under `mlruns/` beside it; a queued or --temp `dvc exp
    run` runs its stages in a copy that DVC deletes, so they use the project's (DVC_ROOT).
    A new SQLite store gets its tables under a lock (`dvc queue start -j N` opens one N times
    at once). Set: any tracking server,
    e.g. one with an S3 artifact store (the server proxies artifacts with
    `--artifacts-destination s3://...`, or the client writes them itself, reading
    MLFLOW_S3_ENDPOINT_URL for MinIO/Ceph and the AWS_* credentials).
    Credentials in the URI (`https://user:password@host`) are moved to
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD before MLflow sees the URI, so they
    never show in printed run links, errors or tags.
    MLflow's own MLFLOW_HTTP_REQUEST_TIMEOUT and MLFLOW_HTTP_REQUEST_MAX_RETRIES are set to
    15 s and 2 unless already set (MLflow's defaults, 120 s and 7, wait about 4 minutes for
    a server that is down). Each step first makes one cheap request through MLflow's client:
    a server that refuses connections stops it with an IagnError after about 5 s, one that
    accepts but never answers after under a minute. Once the step's run exists, an outage
    no longer stops the step (spool.py): its calls use lower limits, and what they cannot
    send is kept.
    MLFLOW_EXPERIMENT_NAME names the experiment (default `iagn`).

The parent run of a step (first match wins)
    1. IAGN_PARENT_RUN_ID: that run (set it to attach steps to a run you created).
    2. IAGN_PIPELINE_RUN (any name: a CI job id, a date), else KFP_RUN_ID: the run tagged
       `iagn.pipeline_key` = that name; the first step creates it, later steps (other
       processes, other machines) find it. An explicit name wins over DVC detection so that
       steps run inside and outside `dvc repro` can share one parent.
    3. `dvc repro` / `dvc exp run` among this process's ancestors (walked through /proc):
       the run tagged with that DVC process (host, pid, start time), so all stages of one
       repro share one parent. Under `dvc queue start` that process is each experiment's own
       `dvc exp exec-run`: one parent per experiment, named `dvc exp <name>` (DVC_EXP_NAME).
    4. An active MLflow run in this process (a notebook): nested under it.
    5. Otherwise the step run is a top-level run, which ends with its step.

The parent's status (parents of 2 and 3; runs of 1 and 4 belong to whoever started them)
    A step start sets it RUNNING. A step that fails, including a blocking verdict
    (validation or the registry gate failed), sets it FAILED (KILLED on Ctrl-C) at once,
    with `iagn.outcome` and `iagn.error`; a failure is final. A success leaves it RUNNING.
    FINISHED is set once, by whoever ends the pipeline:
      - KFP (KFP_RUN_ID, or IAGN_PIPELINE_RUN under `iagn-pipeline run-local`): the exit
        handler, components/on_exit.py, after every task: FINISHED when the pipeline
        succeeded, FAILED (KILLED when cancelled) otherwise;
      - `dvc repro` and IAGN_PIPELINE_RUN outside KFP: the last step, `register`
        (`runner.register` as `iagn register` calls it; the KFP component passes
        `ends_pipeline=False`, leaving the parent to the exit handler).
    A FAILED parent never turns FINISHED (iagn/tracking/parent.py says why this holds
    without a compare-and-set in MLflow). A repro or named run that does not reach
    `register` (a target stage, an up-to-date `register`) leaves its parent RUNNING; its
    step runs have their own status. One IAGN_PIPELINE_RUN name is one execution: steps run
    again under a name whose parent failed stay under a FAILED parent.

Tags on parent and step runs
    iagn.pipeline_run_id   KFP_RUN_ID when set, else the parent's run id (top-level: its own)
    iagn.step              the step (validate, train-stage-1, ..., register)
    iagn.outcome, iagn.error  succeeded / failed / blocked / killed and why (the parent: its
                           first failure, named by step)
    iagn.git_commit, iagn.git_dirty, iagn.dvc_data_version, iagn.kfp_run_id, iagn.dvc_exp
                           (the DVC experiment's name): where the run comes from
                           (iagn/provenance.py; IAGN_GIT_COMMIT and IAGN_DATA_VERSION stand
                           in where there is no checkout or data.dvc)
Params of a step run are the flattened params.yaml sections the step reads
(`train.lr_head`, `stage3.epochs`, ...). Nothing is taken from the environment beyond the
variables above: no credentials, no URIs with user info.

IAGN_TRACKING=off runs the steps untracked; under torchrun only rank 0 tracks.
"""

from iagn.tracking.parent import (
    ENV_PARENT_RUN,
    ENV_PIPELINE_RUN,
    TAG_ERROR,
    TAG_FAILED_TASK,
    TAG_OUTCOME,
    TAG_PIPELINE_KEY,
    TAG_PIPELINE_RUN,
    TAG_ROLE,
    describe_pipeline_parent,
    end_pipeline,
    find_pipeline_parent,
    mark_pipeline_failed,
    pipeline_key,
)
from iagn.tracking.step import (
    DATASET_DIGEST_CHARS,
    TAG_DATA_DIGEST,
    TAG_STEP,
    StepRun,
    flatten,
    metric_name,
    step_run,
)
from iagn.tracking.store import (
    DEFAULT_EXPERIMENT,
    ENV_TRACKING,
    HTTP_SETTINGS,
    configure,
    experiment_id,
    mlflow_errors,
    tracking_enabled,
)

__all__ = [
    "DATASET_DIGEST_CHARS",
    "DEFAULT_EXPERIMENT",
    "ENV_PARENT_RUN",
    "ENV_PIPELINE_RUN",
    "ENV_TRACKING",
    "HTTP_SETTINGS",
    "TAG_DATA_DIGEST",
    "TAG_ERROR",
    "TAG_FAILED_TASK",
    "TAG_OUTCOME",
    "TAG_PIPELINE_KEY",
    "TAG_PIPELINE_RUN",
    "TAG_ROLE",
    "TAG_STEP",
    "StepRun",
    "configure",
    "describe_pipeline_parent",
    "end_pipeline",
    "experiment_id",
    "find_pipeline_parent",
    "flatten",
    "mark_pipeline_failed",
    "metric_name",
    "mlflow_errors",
    "pipeline_key",
    "step_run",
    "tracking_enabled",
]
