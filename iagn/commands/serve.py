"""`iagn serve`: a registered model over HTTP, with request limits (iagn/serving.py)."""

from __future__ import annotations

import argparse

# Defaults here as in iagn.serving (not imported: `iagn --help` stays free of MLflow).
DEFAULT_MODEL = "models:/iagn@champion"
DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_LIMIT_CONCURRENCY = 32


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    return parse


def cmd_serve(args: argparse.Namespace) -> int:
    from iagn import serving

    serving.serve(
        args.model,
        host=args.host,
        port=args.port,
        max_body_bytes=int(args.max_body_mb * 2**20),
        workers=args.workers,
        limit_concurrency=args.limit_concurrency,
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a registered model over HTTP (MLflow's scoring protocol, with limits)",
        description="Loads the MLflow model once and serves MLflow's scoring app on it "
        "(POST /invocations, GET /health, /ping, /version) under uvicorn, in this process. "
        "Request bodies over --max-body-mb get 413; images above the model's data.max_pixels "
        "get 400 before they are decoded; error messages never quote the request.",
    )
    serve.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"MLflow model URI or folder (default {DEFAULT_MODEL}; the registry is "
        "MLFLOW_TRACKING_URI, unset: ./mlflow.db)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    serve.add_argument(
        "--max-body-mb",
        type=_positive(float),
        default=DEFAULT_MAX_BODY_MB,
        help=f"largest request body in MiB (default {DEFAULT_MAX_BODY_MB:g}); larger gets 413",
    )
    serve.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        help="worker processes, each with its own copy of the model (default 1)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=_positive(int),
        default=DEFAULT_LIMIT_CONCURRENCY,
        help="connections and requests at a time per worker; more get 503 (default "
        f"{DEFAULT_LIMIT_CONCURRENCY}). Bounds memory: about this many bodies of --max-body-mb",
    )
    serve.set_defaults(handler=cmd_serve)
