"""The container image every component runs in, fixed when the pipeline is compiled.

`IAGN_IMAGE` (environment, read at import) overrides the default; `iagn-pipeline compile
--image` sets it before the components are imported. The pipeline also has an `image`
parameter that overrides it per run (`PipelineTask.set_container_image`).
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "ghcr.io/iagn/iagn:0.1.0"
ENV_IMAGE = "IAGN_IMAGE"


def image() -> str:
    """The image to compile the components with: $IAGN_IMAGE, else DEFAULT_IMAGE."""
    return os.environ.get(ENV_IMAGE, "").strip() or DEFAULT_IMAGE


IMAGE = image()
