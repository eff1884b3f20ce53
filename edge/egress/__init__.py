"""Egress: where results leave the daemon.

:mod:`edge.egress.zmq` encodes replies and publishes results on the PUB
socket; :mod:`edge.egress.dicom` builds the DICOM result objects and sends
them to the PACS through a durable outbox.
"""
