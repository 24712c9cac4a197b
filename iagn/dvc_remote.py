"""Running DVC against a remote, and turning its failures into messages that name the setting.

DVC reports a bad remote as e.g. `unexpected error - Forbidden: An error occurred (403) when
calling the HeadObject operation`. `explain_failure` maps such output to what is wrong and
which setting fixes it (the remote's `url`, `endpointurl`, `access_key_id` /
`secret_access_key` in `.dvc/config.local`, or the AWS_* environment). `iagn remote`,
`make data` and the fetch-data step go through here.

DVC runs as `sys.executable -m dvc`: the DVC of the running environment, whatever PATH says.

An S3 server that goes down during a transfer does not stop DVC: it tries every remaining
file with its retries and back-off (s3fs and botocore, tens of seconds a file), which for
a dataset of thousands of files means hours of silence before one error at the end. So
`transfer` watches the remote's endpoint (`endpointurl`, else AWS_ENDPOINT_URL; nothing to
watch for AWS itself) while DVC runs: a TCP connection every PROBE_EVERY_S seconds; when
none has succeeded for IAGN_REMOTE_OUTAGE_S seconds (default 60), DVC is stopped and the
error names the remote and its endpoint. Running the same command again once the server is
back transfers what is missing (DVC skips what the remote already has).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from iagn.errors import IagnError
from iagn.redact import scrub_text

DVC_TIMEOUT_S = 3600
ENV_OUTAGE_S = "IAGN_REMOTE_OUTAGE_S"
DEFAULT_OUTAGE_S = 60.0
PROBE_EVERY_S = 2.0
QUIET_ENV = {"DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
_SECTION = re.compile(r"^'?remote\s+\"(?P<name>[^\"]+)\"'?$")


@dataclass(frozen=True)
class Remote:
    """What the project's DVC config says about one remote (secrets are never read)."""

    name: str
    url: str = ""
    endpoint: str = ""

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"DVC remote '{self.name}' ({self.url or 'no url'}{where})"


def _read_config(project: Path) -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    # Later files win, as in DVC: the committed config, then the git-ignored local one.
    config.read([project / ".dvc" / "config", project / ".dvc" / "config.local"])
    return config


def configured_remote(project: str | os.PathLike, name: str | None = None) -> Remote | None:
    """The remote `name` (default: core.remote) of the DVC project at `project`, if any."""
    config = _read_config(Path(project))
    if name is None:
        name = config.get("core", "remote", fallback=None)
    if not name:
        return None
    for section in config.sections():
        match = _SECTION.match(section.strip())
        if match and match.group("name") == name:
            return Remote(
                name,
                config.get(section, "url", fallback=""),
                config.get(section, "endpointurl", fallback=""),
            )
    return None


def _error_lines(output: str) -> list[str]:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return [line for line in lines if line.startswith("ERROR")] or lines[-1:]


# (pattern in DVC's output, what is wrong, what to do); {remote}, {name} are filled in.
_FAILURES = (
    (
        r"no remote specified",
        "no DVC remote is configured",
        "add one: `dvc remote add -d NAME s3://BUCKET/PATH` (and for MinIO/Ceph "
        "`dvc remote modify NAME endpointurl http://HOST:PORT`), or pass --remote NAME",
    ),
    (
        r"remote '[^']*' doesn't exist",
        "that DVC remote is not configured",
        "`dvc remote list` shows the configured remotes; pass one of them, or add it with "
        "`dvc remote add NAME URL`",
    ),
    (
        r"Unable to locate credentials|NoCredentialsError|Partial credentials",
        "no S3 credentials for {remote}",
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or store them "
        "in the git-ignored local config: `dvc remote modify --local {name} access_key_id "
        "...` and `dvc remote modify --local {name} secret_access_key ...`",
    ),
    (
        r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|\(403\)|"
        r"InvalidToken|ExpiredToken",
        "{remote} rejected the credentials (403 Forbidden)",
        "check access_key_id / secret_access_key of the remote (`dvc remote modify --local "
        "{name} access_key_id ...`, `... secret_access_key ...`) or AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY in the environment (used when the config holds no key), and "
        "that this key may read and write the bucket in the remote's `url`",
    ),
    (
        r"NoSuchBucket|bucket does not exist|\(404\).*bucket",
        "the bucket of {remote} does not exist",
        "fix the remote's url (`dvc remote modify {name} url s3://BUCKET/PATH`) or create "
        "the bucket",
    ),
    (
        r"Could not connect to the endpoint URL|EndpointConnectionError|Connection refused|"
        r"Name or service not known|Temporary failure in name resolution|timed out|"
        r"ConnectTimeout|Max retries exceeded",
        "cannot reach {remote}",
        "check the remote's endpoint (`dvc remote modify {name} endpointurl "
        "http://HOST:PORT`, or AWS_ENDPOINT_URL for one run) and that the S3 server is up "
        "and reachable from here",
    ),
)


def explain_failure(output: str, remote: Remote | None) -> str:
    """A message for a failed DVC remote operation: what is wrong and the setting to fix."""
    shown = remote.describe() if remote else "the DVC remote"
    name = remote.name if remote else "NAME"
    for pattern, problem, fix in _FAILURES:
        if re.search(pattern, output, flags=re.IGNORECASE):
            return (
                f"{problem.format(remote=shown, name=name)}\n"
                f"  -> {fix.format(remote=shown, name=name)}\n"
                f"  (DVC said: {scrub_text(_error_lines(output)[-1])[:300]})"
            )
    detail = "; ".join(scrub_text(line) for line in _error_lines(output))[:600]
    return f"DVC failed with {shown}: {detail or '(no output)'}"


def run_quietly(
    argv: list[str], cwd: str | os.PathLike | None, timeout: int
) -> subprocess.CompletedProcess:
    """A tool (dvc, git) without analytics or prompts; output captured. A failing tool is
    its CompletedProcess; only a tool that cannot start or does not finish is an IagnError."""
    words = [str(word) for word in argv]
    if words[1:2] == ["-m"]:  # `python -m dvc ...`: say `dvc ...`
        words = words[2:]
    shown = " ".join([Path(words[0]).name, *words[1:2]])
    if cwd is not None and not Path(cwd).is_dir():
        raise IagnError(f"cannot run `{shown}` in {cwd}: there is no such folder")
    try:
        return subprocess.run(
            argv,
            cwd=cwd,
            env={**os.environ, **QUIET_ENV},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise IagnError(
            f"cannot run `{shown}`: {words[0]} is not installed or not on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise IagnError(
            f"`{shown} ...` did not finish within {timeout} s; check the network and the "
            "remote, then run the command again"
        ) from None


def run_dvc(
    args: list[str], cwd: str | os.PathLike | None, timeout: int = DVC_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `cwd` with this environment's DVC."""
    return run_quietly([sys.executable, "-m", "dvc", *args], cwd, timeout)


def _outage_s() -> float:
    raw = os.environ.get(ENV_OUTAGE_S, "")
    try:
        value = float(raw) if raw else DEFAULT_OUTAGE_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise IagnError(f"{ENV_OUTAGE_S}={raw!r} must be a number of seconds > 0 (default 60)")
    return value


def _address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of an endpoint URL such as http://minio:9000; None when it names none."""
    try:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname else None


def _answers(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=PROBE_EVERY_S):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """End DVC and its children (it runs in a session of its own)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
            return


@dataclass
class Watched:
    result: subprocess.CompletedProcess
    stopped_after_s: float  # how long the endpoint was down when DVC was stopped; 0: it ended
    ever_up: bool  # the endpoint accepted a connection at some point


def _run_watched(
    args: list[str], cwd, address: tuple[str, int] | None, outage_s: float, timeout: int
) -> Watched:
    """`dvc ARGS`; stopped when `address` accepts no connection for `outage_s` seconds."""
    argv = [sys.executable, "-m", "dvc", *args]
    # Files, not pipes: DVC's output never fills a buffer while we wait.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **QUIET_ENV},
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,  # so that _stop reaches its worker processes too
        )
        deadline, down_since, stopped_after = time.monotonic() + timeout, None, 0.0
        # Probed at once too: a server that fails within the first pause was up before.
        ever_up = address is not None and _answers(address)
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=PROBE_EVERY_S)
                    break
                now = time.monotonic()
                if now > deadline:
                    raise IagnError(
                        f"`dvc {args[0]}` did not finish within {timeout} s; run it again "
                        "(what was transferred is kept)"
                    )
                if address is None:
                    continue
                if _answers(address):
                    down_since, ever_up = None, True
                    continue
                down_since = down_since or now
                if now - down_since >= outage_s:
                    stopped_after = now - down_since
                    break
        finally:
            if process.poll() is None:
                _stop(process)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read())
    return Watched(result, stopped_after, ever_up)


def transfer(
    operation: str,
    project: str | os.PathLike = ".",
    targets: list[str] | None = None,
    remote: str | None = None,
    jobs: int | None = None,
) -> str:
    """`dvc push|pull|fetch|status --cloud` with the remote; returns DVC's output, raises an
    IagnError that names the setting to fix when the remote fails or goes down."""
    if operation not in ("push", "pull", "fetch", "status"):
        raise ValueError(f"unknown DVC remote operation {operation!r}")
    args = [operation, *(["--cloud"] if operation == "status" else [])]
    args += ["--remote", remote] if remote else []
    args += ["--jobs", str(jobs)] if jobs else []
    described = configured_remote(project, remote)
    if described is None and remote:
        described = Remote(remote)
    endpoint = (described.endpoint if described else "") or os.environ.get("AWS_ENDPOINT_URL", "")
    address = _address(endpoint) if endpoint else None
    outage_s = _outage_s()
    watched = _run_watched([*args, *(targets or [])], project, address, outage_s, DVC_TIMEOUT_S)
    done = watched.result
    if watched.stopped_after_s and address is not None:
        where = f"{address[0]}:{address[1]}"
        if not watched.ever_up:  # down from the start: the endpoint or the server is wrong
            said = f"Could not connect to the endpoint URL: no connection to {where}"
            raise IagnError(f"`dvc {operation}` stopped: " + explain_failure(said, described))
        shown = described.describe() if described else f"the DVC remote at {endpoint}"
        raise IagnError(
            f"`dvc {operation}` stopped: {shown} went down during the transfer (no connection "
            f"to {where} for {watched.stopped_after_s:.0f} s)\n"
            "  -> once the S3 server is up again, run the same command again: DVC transfers "
            f"only what is missing ({ENV_OUTAGE_S}, now {outage_s:g} s, is how long an "
            "outage is waited out)"
        )
    if done.returncode != 0:
        raise IagnError(
            f"`dvc {operation}` failed: " + explain_failure(done.stdout + done.stderr, described)
        )
    return scrub_text(done.stdout)
