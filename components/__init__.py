"""KFP components: one thin component per pipeline step (see components/README.md).

Each step module (`fetch_data`, `validate`, `train_stage`, `distill`, `evaluate`,
`register`, plus the exit handler `on_exit`) defines a `@dsl.component` whose body imports
`iagn` inside the container and calls the step function of `iagn.runner`. `runtime` and
`datafetch` hold what the bodies share at run time; they never import kfp, so a component
process pays only for what its step needs. Nothing is imported here on purpose: a
component body that imports `components.runtime` must not load every component module.
"""
