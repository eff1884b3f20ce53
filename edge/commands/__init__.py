"""The ``medge`` subcommands: argument parsing and wiring only.

Each module exposes ``configure_parser(parser)`` and ``run(args) -> int``
and is imported by :mod:`edge.cli` only when its command is chosen. The work
itself lives in the daemon's packages (``medge serve``) or in
:mod:`edge.tools` (clients, benchmarks, the demo); nothing in the daemon
imports this package.
"""
