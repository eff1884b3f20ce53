"""Operating the daemon: metrics, health, error boundaries and socket security.

:mod:`~edge.ops.metrics` defines the ``medge_*`` Prometheus metrics on a
registry that is passed in; :mod:`~edge.ops.nvml` collects GPU gauges;
:mod:`~edge.ops.health` serves ``/metrics``, ``/healthz`` and ``/readyz``;
:mod:`~edge.ops.boundary` is the one error boundary per receiver (log,
count, keep serving); :mod:`~edge.ops.curve` sets up ZeroMQ CURVE/ZAP for
the daemon's sockets and their clients.
"""
