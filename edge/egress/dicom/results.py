"""Inference results as DICOM objects: which objects a completed series gets.

One module per object, like highdicom: :mod:`~edge.egress.dicom.seg`
(Segmentation), :mod:`~edge.egress.dicom.sr` (TID 1500 Comprehensive SR),
:mod:`~edge.egress.dicom.sc` (secondary-capture overlay), on what they share
in :mod:`~edge.egress.dicom.common` (model, sources, cleaned source headers,
UIDs, the appliance's identity) and :mod:`~edge.egress.dicom.outlines`
(mask outlines and drawing). :func:`build_results` decides which objects
a completed series gets:

- Segmentation models -> a DICOM **Segmentation** for single-frame sources:
  one SEG per frame of reference for sources with a complete patient
  coordinate system (CT, MR slices), one SEG per instance for the others
  (US, CR, DX, secondary capture). A CT/MR slice whose geometry is
  incomplete (its IOD requires a Frame of Reference, so no SEG without one
  is possible) gets its outlines in a TID 1500 SR instead, like a cine. So
  does a slice whose Frame of Reference UID repeats its Study, Series or SOP
  Instance UID (seen in real MR files): a SEG in that frame of reference
  would repeat the clash.
- Detection models -> one **Comprehensive SR** following TID 1500 with a
  planar ROI per box.
- Classification models -> one **Comprehensive SR** following TID 1500
  with a measurement group per processed frame (finding *Present* /
  *Absent*, its certainty, the decision threshold); the sources are
  :class:`~edge.egress.dicom.classification.ClassifiedSource`.
- Multi-frame sources (ultrasound cine) -> one TID 1500 SR whose ROIs
  reference the source instance **and frame number** (highdicom cannot
  write a SEG of a multi-frame image without a frame of reference).
- Optionally (the pipeline's choice) a **secondary-capture overlay** per
  processed source frame: :func:`edge.egress.dicom.sc.make_overlay`; for a
  classification model only of frames whose class activation map was
  computed (the pipeline asks for it only when overlays are on).

Every UID of a result is derived from its inputs (source UIDs, kind, the
model and its configuration, and for the SOP Instance UID a digest of the
results: :func:`~edge.egress.dicom.common.model_key`,
:func:`~edge.egress.dicom.common.results_digest`), so processing the same
instances again after a crash makes the same objects and a PACS sees a
resend, not a duplicate, and a result with other content (another decision
threshold, model version or precision) never reuses a UID. Every result carries the
appliance's Device Serial Number, and the SR's observer device UID is
derived from that serial and the model.

**Order.** Instance Numbers follow the source instances: a result of one
source instance takes the source's Instance Number (when the sources of a
call have distinct positive ones; else their rank by Instance Number and
SOP Instance UID), a SEG or SR of several sources the smallest of theirs,
and an overlay ``10000 x that number + frame number`` (so overlays of
different instances and frames of one series never share a number and sort
like their sources).
"""

from __future__ import annotations

import logging
from typing import Sequence

from pydicom.dataset import Dataset

from edge.egress.dicom.common import ModelInfo, SourceResult, device_serial, has_patient_geometry, source_numbers
from edge.egress.dicom.seg import make_segmentation
from edge.egress.dicom.sr import make_findings_sr

__all__ = ["build_results"]

_log = logging.getLogger(__name__)


def build_results(
    sources: Sequence[SourceResult], model: ModelInfo, *, device_serial_number: str | None = None
) -> list[Dataset]:
    """The result objects for one completed series (see the module docstring).

    ``device_serial_number`` is the appliance's ``[dicom] device_serial_number``
    (default: :func:`~edge.egress.dicom.common.default_device_serial`).

    Returns
    -------
    list of pydicom.dataset.Dataset
        SEG(s) for segmentation of single-frame sources, else one SR
        (detection, classification, multi-frame sources).
    """
    if not sources:
        return []
    serial = device_serial(device_serial_number)
    numbers = source_numbers(sources)

    def number(group: Sequence[SourceResult]) -> int:
        return min(numbers[str(s.dataset.SOPInstanceUID)] for s in group)

    if model.task in ("detection", "classification"):
        return [make_findings_sr(sources, model, device_serial_number=serial, instance_number=number(sources))]
    to_sr = [s for s in sources if s.multiframe]
    out: list[Dataset] = []
    single = [s for s in sources if not s.multiframe]
    if single:
        out, unsegmented = _segmentations(single, model, serial, numbers)
        to_sr.extend(unsegmented)
    if to_sr:
        out.append(make_findings_sr(to_sr, model, device_serial_number=serial, instance_number=number(to_sr)))
    return out


def _segmentations(
    single: Sequence[SourceResult], model: ModelInfo, serial: str, numbers: dict[str, int]
) -> tuple[list[Dataset], list[SourceResult]]:
    """SEGs of single-frame sources, and the sources highdicom cannot segment (their outlines go into an SR)."""

    def key(s: SourceResult) -> tuple[int, str]:
        return numbers[str(s.dataset.SOPInstanceUID)], str(s.dataset.SOPInstanceUID)

    out: list[Dataset] = []
    unsegmented: list[SourceResult] = []
    # Slices with a complete patient coordinate system share one SEG per frame of reference.
    planar = [s for s in single if has_patient_geometry(s.dataset)]
    alone = [s for s in single if not has_patient_geometry(s.dataset)]
    by_for: dict[str, list[SourceResult]] = {}
    for s in planar:
        by_for.setdefault(str(s.dataset.FrameOfReferenceUID), []).append(s)
    for group in by_for.values():
        group.sort(key=key)
        if len(group) == 1:
            alone.extend(group)
            continue
        try:
            first = key(group[0])[0]  # the group is sorted: its smallest number
            out.append(make_segmentation(group, model, device_serial_number=serial, instance_number=first))
        except (ValueError, AttributeError, TypeError) as exc:  # e.g. inconsistent geometry across slices
            _log.warning(
                "One SEG per instance for a series highdicom cannot segment as a whole (%s).", type(exc).__name__
            )
            alone.extend(group)
    alone.sort(key=key)
    for s in alone:
        try:
            out.append(make_segmentation([s], model, device_serial_number=serial, instance_number=key(s)[0]))
        except (ValueError, AttributeError, TypeError) as exc:
            # e.g. a CT/MR slice with an incomplete image plane: its IOD needs a Frame of
            # Reference, so its outlines go into the SR, as for a cine.
            _log.warning("Outlines in an SR for an instance highdicom cannot segment (%s).", type(exc).__name__)
            unsegmented.append(s)
    return out, unsegmented
