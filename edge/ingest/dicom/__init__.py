"""The DICOM side of ingest, one module per stage of a received instance.

:mod:`~edge.ingest.dicom.scp` accepts associations and C-STOREs;
:mod:`~edge.ingest.dicom.scan` walks the encoded data set (bounds, structure,
codestream checks) before anything is decoded; :mod:`~edge.ingest.dicom.routing`
picks the model and assembles series; :mod:`~edge.ingest.dicom.spool` keeps
every acknowledged instance durably on disk; :mod:`~edge.ingest.dicom.pixels`
decodes frames; :mod:`~edge.ingest.dicom.pipeline` runs the workers and the
series finaliser that hand results to :mod:`edge.egress.dicom`.
"""
