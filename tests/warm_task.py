"""A task for tests/test_warm.py: prints what it inherited as JSON, then leaves traces.

python -m warm_task NAME [EXIT_CODE]
"""

import importlib
import json
import os
import sys

# Forked from the zygote (which preloaded it), or a fresh interpreter that imports it now.
preloaded = "warm_probe" in sys.modules
probe = importlib.import_module("warm_probe")
name = sys.argv[1]
seen = {
    "pid": os.getpid(),
    "preloaded": preloaded,
    "at_import": probe.AT_IMPORT,
    "env": os.environ.get("IAGN_PROBE"),
    "tasks_before": list(probe.TASKS),
    "left_by": os.environ.get("IAGN_PROBE_LEFT_BY"),
}
print(json.dumps(seen), flush=True)
probe.TASKS.append(name)
os.environ["IAGN_PROBE_LEFT_BY"] = name
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
