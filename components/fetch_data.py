"""fetch-data: resolve the data revision, then get the DVC-tracked dataset and its params.yaml.

Two components, so that caching is right: `resolve_data_revision` (never cached) turns a
branch or tag into a commit every run; `fetch_data` (cached) is then keyed on that commit,
and an unchanged commit reuses the earlier download and everything downstream of it.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_data_revision(data_repo: str, data_rev: str) -> str:
    """The commit of the data repository to fetch (iagn.steps.fetch_data).

    Args:
        data_repo: Git URL of the project repository (params.yaml, data.dvc, DVC remote),
            or a local path; "" is the current folder.
        data_rev: Branch, tag or commit; "" is the default branch, or for a local path
            the working copy as it is.

    Returns:
        A 40-character commit, or `working-copy:<HEAD>:<data.dvc md5>` for a working copy.
    """
    from components.runtime import readable_errors
    from iagn.steps.fetch_data import resolve_revision

    with readable_errors():
        revision = resolve_revision(data_repo, data_rev)
    print(f"data revision: {revision}")
    return revision


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_data(
    data_repo: str,
    revision: str,
    params_overrides: dict,
    dataset: Output[Dataset],
    params: Output[Artifact],
):
    """Get the dataset with DVC and write the run's params.yaml (overrides applied).

    Args:
        data_repo: As for resolve_data_revision.
        revision: The output of resolve_data_revision.
        params_overrides: Dotted params.yaml keys to values, e.g. {"stage3.epochs": 2}.
        dataset: The dataset folder (`data.root` of params.yaml), in its own layout.
        params: params.yaml as every later step reads it.
    """
    from components.runtime import readable_errors
    from iagn.steps.fetch_data import fetch

    with readable_errors():
        fetched = fetch(data_repo, revision, params_overrides, dataset.path, params.path)
    dataset.metadata.update(fetched.metadata)
    params.metadata["overrides"] = dict(params_overrides or {})
    print(
        f"dataset: {fetched.metadata['images']} images from {fetched.metadata['repo']} "
        f"({fetched.metadata['source']}, {fetched.metadata['data_root']})"
    )
