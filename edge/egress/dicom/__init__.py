"""DICOM results: the objects the daemon writes and the outbox that delivers them.

One module per object, like highdicom: :mod:`~edge.egress.dicom.seg`
(Segmentation), :mod:`~edge.egress.dicom.sr` (Comprehensive SR, TID 1500),
:mod:`~edge.egress.dicom.sc` (Secondary Capture overlays), on
:mod:`~edge.egress.dicom.common` (UIDs, equipment, geometry),
:mod:`~edge.egress.dicom.reference` (the cleaned source header) and :mod:`~edge.egress.dicom.outlines` (mask outlines and overlay
drawing); :mod:`~edge.egress.dicom.results` decides which objects a series
gets. :mod:`~edge.egress.dicom.outbox` keeps them durably until a
destination (C-STORE SCU) has acknowledged each one, with retries and dead
letters. Its folders are :mod:`~edge.egress.dicom.outbox_files`; DICOM TLS is
:mod:`~edge.egress.dicom.tls`.
"""
