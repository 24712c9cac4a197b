"""A training step on several nodes: a Kubeflow Trainer TrainJob created and watched by the
KFP task (`run_on_trainer`), each node running the same `iagn` step under torchrun.

    names.py     the job's name (KFP run + step), its storage prefix, the namespace
    manifest.py  the TrainJob for Trainer TRAINER_VERSION, checked against its models; the
                 `{name}` placeholders of the step's arguments
    cluster.py   the Kubernetes calls (API_CALLS, which deploy/trainer/rbac.yaml grants)
    staging.py   inputs up and outputs down through durable storage, markers last
    launch.py    run_on_trainer: checks, create or reattach, follow, fetch, cancel
    node.py      `iagn trainjob-node`: one node's inputs, torchrun, node 0's outputs
"""

from iagn.trainjob.launch import run_on_trainer
from iagn.trainjob.manifest import TRAINER_VERSION
from iagn.trainjob.staging import check_writable

__all__ = ["TRAINER_VERSION", "check_writable", "run_on_trainer"]
