"""KFP components: one thin component per pipeline step (see components/README.md).

Each step module (`fetch_data`, `validate`, `train_stage`, `distill`, `evaluate`,
`register`, plus the exit handler `on_exit`) defines a `@dsl.component` whose body imports
`iagn` inside the container and calls the step function of `iagn.runner` (fetch-data:
`iagn.steps.fetch_data`). `runtime` holds the KFP glue the bodies share at run time; it
never imports kfp, so a component
process pays only for what its step needs. Nothing is imported here on purpose: a
component body that imports `components.runtime` must not load every component module.
"""
