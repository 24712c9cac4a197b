"""Where runs go: the tracking URI (credentials moved out of it), MLflow's HTTP limits, the
server's reachability, the experiment, and MLflow failures as one readable error."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from iagn.errors import IagnError
from iagn.provenance import ENV_DVC_EXP, ENV_DVC_ROOT
from iagn.redact import scrub_text, scrub_uri

ENV_TRACKING = "IAGN_TRACKING"
DEFAULT_EXPERIMENT = "iagn"
# MLflow's own HTTP settings, set unless the user set them. MLflow's defaults (120 s per
# request, 7 retries with exponential backoff) keep a step waiting about 4 minutes for a
# server that is down. With these, a refused connection fails after about 5 s (MLflow's
# backoff sleeps 0 s, then 4-5 s) and a server that accepts but never answers after 3
# attempts of 15 s. The timeout bounds each wait for the server, including its reply to an
# artifact upload that it forwards to S3: raise it for large models over a slow link.
# They hold for starting a step and for `iagn tracking replay`; the calls a step makes while
# it runs use lower limits (iagn/tracking/spool.py), since what they fail to send is kept.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


def tracking_enabled() -> bool:
    """False with IAGN_TRACKING=off, and on torchrun ranks other than 0 (rank 0 tracks)."""
    if os.environ.get(ENV_TRACKING, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return int(os.environ.get("RANK", "0")) == 0


def credentials_out_of_uri() -> None:
    """Move `user:password@` from the tracking URI to MLflow's credential variables."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        os.environ["MLFLOW_TRACKING_URI"] = clean
    if mlflow.get_tracking_uri() != clean:  # set with mlflow.set_tracking_uri()
        mlflow.set_tracking_uri(clean)


def _connection_failure(error: BaseException) -> str | None:
    """Why MLflow's HTTP client got no answer (refused, timed out, ...); None if it got one."""
    from requests.exceptions import RequestException

    cause = error.__cause__ or error.__context__
    if not isinstance(cause, RequestException):
        return None  # an HTTP answer (401, 404, ...): the server is there
    inner = cause.args[0] if cause.args else cause
    inner = getattr(inner, "reason", inner)  # urllib3's MaxRetryError -> the last failure
    text = str(inner)
    # "HTTPConnection(host='h', port=1): Failed to establish ...": the host is named already.
    if text.startswith(("HTTPConnection", "HTTPSConnection")) and ": " in text:
        text = text.split(": ", 1)[1]
    return scrub_text(text)


def _check_reachable(uri: str) -> None:
    """One cheap request through MLflow's client, under MLflow's timeout and retry settings."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().search_experiments(max_results=1)
    except MlflowException as error:
        reason = _connection_failure(error)
        if reason is None:
            return  # it answered; authentication and permissions surface on the real calls
        limits = ", ".join(f"{name}={os.environ[name]}" for name in HTTP_SETTINGS)
        raise IagnError(
            f"the MLflow tracking server {scrub_uri(uri)} is unreachable ({reason}; {limits}); "
            "start it, fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to track into the "
            "embedded store ./mlflow.db"
        ) from None


def dvc_project_root() -> Path | None:
    """The project folder of a DVC experiment whose stages run outside it, else None.

    A queued (or --temp) `dvc exp run` runs its stages in a copy under .dvc/tmp/exps that
    DVC deletes afterwards, so MLflow's embedded default store (./mlflow.db and ./mlruns in
    the current folder) would go with it: the project's own store is used instead.
    """
    root = os.environ.get(ENV_DVC_ROOT, "").strip()
    if not root or not os.environ.get(ENV_DVC_EXP):
        return None
    root_path = Path(root).resolve()
    return None if Path.cwd().resolve() == root_path else root_path


def _project_store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def _create_sqlite_tables(uri: str) -> None:
    """Create a new SQLite store's tables under a lock. MLflow's client creates them without
    one, and steps meeting a new store at once (`dvc queue start -j 2` on the project's
    mlflow.db) fail on each other's half-made tables ("duplicate column name")."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return
    from mlflow import MlflowClient

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"iagn-mlflow-tables-{digest}.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # opening the store creates them
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def configure(check: bool = True) -> str:
    """Point MLflow at the configured store and (`check`) that it answers; the URI, scrubbed.

    `iagn tracking replay` passes check=False: it says itself what an unreachable server
    means for the records it keeps.
    """
    import mlflow

    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    root = dvc_project_root()
    if root is not None and not mlflow.is_tracking_uri_set():
        os.environ["MLFLOW_TRACKING_URI"] = _project_store(root)
    credentials_out_of_uri()
    uri = mlflow.get_tracking_uri()
    if check and urlsplit(uri).scheme in ("http", "https"):
        _check_reachable(uri)
    if uri.startswith("sqlite:"):
        with mlflow_errors(scrub_uri(uri)):
            _create_sqlite_tables(uri)
    return scrub_uri(uri)


@contextlib.contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow, HTTP and S3 failures as one IagnError that names the store and what to check."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        from botocore.exceptions import BotoCoreError, ClientError

        s3_errors: tuple = (BotoCoreError, ClientError)
    except ImportError:  # pragma: no cover - boto3 is a dependency
        s3_errors = ()
    try:
        yield
    except (MlflowException, RequestException, *s3_errors) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise IagnError(
            f"MLflow tracking at {uri} failed: {type(exc).__name__}: {scrub_text(message)}\n"
            "  -> check that the tracking server runs and MLFLOW_TRACKING_URI is right; for "
            "artifacts in S3 also MLFLOW_S3_ENDPOINT_URL and the AWS credentials (of the "
            "server when it proxies artifacts, else of this process)"
        ) from None


def experiment_id(client) -> str:
    """The id of the experiment MLFLOW_EXPERIMENT_NAME (default `iagn`), created if needed."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # The embedded store would put a new experiment's artifacts under ./mlruns, which in
        # a queued DVC experiment is the temporary copy: the project's mlruns instead.
        root = dvc_project_root()
        artifacts = None
        if root is not None and client.tracking_uri == _project_store(root):
            artifacts = (root / "mlruns").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another step created it in the meantime
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise IagnError(
            f"the MLflow experiment {name!r} is deleted; restore it (`mlflow experiments "
            "restore`) or set MLFLOW_EXPERIMENT_NAME to another name"
        )
    return experiment.experiment_id
