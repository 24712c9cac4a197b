"""Subcommands of `iagn`: one module per command, each with a `register(subparsers)`."""
