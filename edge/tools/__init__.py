"""Client-side tools, never imported by the daemon.

Test clients and simulators (ZeroMQ client, load generator, DICOM SCU,
synthetic images), the benchmarks and their statistics and result files,
plots, the demo runner and a ``medge serve`` child process for tests and the
demo. The ``medge`` commands in :mod:`edge.commands` and the tests and
benchmarks use these; the daemon's packages never do.
"""
