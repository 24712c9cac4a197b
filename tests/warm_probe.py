"""Preloaded by the zygote in tests/test_warm.py: what one task could leave for the next."""

import os

AT_IMPORT = os.environ.get("IAGN_PROBE", "")  # read once, when the module is imported
TASKS: list[str] = []  # module-level state: every task (tests/warm_task.py) appends its name
