"""Ingest: where images enter the daemon.

:mod:`edge.ingest.zmq` is the ZeroMQ ROUTER front end (live frames from a
device, answered on the same socket); :mod:`edge.ingest.dicom` is the DICOM
side (C-STORE SCP, header scan and routing, durable spool, pixel decoding,
the workers that run the models and hand results to the outbox). Both call
the scheduler through :class:`edge.types.InferenceService`.
"""
