"""Pipeline steps: one module per step, inputs -> outputs, no orchestration code.

The CLI (`iagn ...`), the DVC stages and the KFP components all call these functions.
"""
