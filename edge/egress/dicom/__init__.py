"""DICOM results: the objects the daemon writes and the outbox that delivers them.

:mod:`~edge.egress.dicom.results` builds the result objects of a series
(segmentation, structured report, overlays) with highdicom;
:mod:`~edge.egress.dicom.outbox` keeps them durably until a destination
(C-STORE SCU) has acknowledged each one, with retries and dead letters.
"""
