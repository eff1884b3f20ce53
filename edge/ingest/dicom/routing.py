"""Routing of received DICOM instances to models, and series assembly.

- :class:`Router` maps (Modality, SOP Class UID, BodyPartExamined) to a
  model with first-match-wins rules (``[[dicom.routes]]``), on the
  attributes the header scan found (:class:`edge.ingest.dicom.scan.InstanceInfo`);
- :class:`SeriesAssembler` groups processed instances by study, series,
  patient and model, and says when a series is complete: ``series_idle_s`` after its
  last instance arrived.

Examples
--------
>>> r = Router([Route(modality="US", model="us-lesion-seg")])
>>> r.match(InstanceInfo(modality="US", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1"))
'us-lesion-seg'
>>> r.match(InstanceInfo(modality="CT")) is None
True
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from edge.ingest.dicom.scan import InstanceInfo

__all__ = [
    "Route",
    "Router",
    "SeriesKey",
    "SeriesAssembler",
    "PendingSeries",
]


@dataclass(frozen=True)
class Route:
    """One routing rule; empty fields match anything (``[[dicom.routes]]``)."""

    model: str
    modality: str = ""
    sop_class_uid: str = ""
    body_part: str = ""

    def matches(self, info: "InstanceInfo") -> bool:
        """Whether this rule applies to ``info`` (Modality and BodyPartExamined case-insensitively)."""
        if self.modality and self.modality.upper() != info.modality.upper():
            return False
        if self.sop_class_uid and self.sop_class_uid != info.sop_class_uid:
            return False
        if self.body_part and self.body_part.upper() != info.body_part.upper():
            return False
        return True


class Router:
    """First-match-wins routing rules.

    Parameters
    ----------
    routes : sequence of Route
        Rules in order; anything with ``model``, ``modality``,
        ``sop_class_uid`` and ``body_part`` attributes (``edge.config.DicomRoute``) works.
    """

    def __init__(self, routes: Iterable[object]) -> None:
        self.routes: tuple[Route, ...] = tuple(
            Route(
                model=str(getattr(r, "model")),
                modality=str(getattr(r, "modality", "") or ""),
                sop_class_uid=str(getattr(r, "sop_class_uid", "") or ""),
                body_part=str(getattr(r, "body_part", "") or ""),
            )
            for r in routes
        )

    def match(self, info: InstanceInfo) -> str | None:
        """The model for ``info``, or ``None`` when no rule applies."""
        for r in self.routes:
            if r.matches(info):
                return r.model
        return None

    @property
    def models(self) -> set[str]:
        """Every model some rule routes to."""
        return {r.model for r in self.routes}


# --------------------------------------------------------------------------- assembly
@dataclass(frozen=True)
class SeriesKey:
    """What one result object covers: a series of a study, of one patient, through one model.

    ``patient`` is :attr:`edge.ingest.dicom.scan.InstanceInfo.patient_key`
    (a hash, never the identifiers): a series whose instances name two
    patients becomes two results, one per patient, so no result ever
    mixes patients.
    """

    study_instance_uid: str
    series_instance_uid: str
    model: str
    patient: str = ""


@dataclass
class PendingSeries:
    """Processed instances of a series waiting for the series to go idle."""

    key: SeriesKey
    paths: list[Path] = field(default_factory=list)
    last_activity: float = 0.0
    expected: int = 0  # instances accepted but not yet processed


class SeriesAssembler:
    """Tracks series until they have been idle for ``series_idle_s``; thread-safe.

    An instance is *announced* when it is accepted (so a series with work
    in flight is never complete) and *added* once its inference result is
    saved. :meth:`due` hands out series whose last arrival is older than
    ``series_idle_s`` and which have no instance still in flight.
    """

    def __init__(self, series_idle_s: float, clock=time.monotonic) -> None:
        self.series_idle_s = series_idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, PendingSeries] = {}

    def _get(self, key: SeriesKey) -> PendingSeries:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = PendingSeries(key=key)
        return s

    def announce(self, key: SeriesKey) -> None:
        """An instance of ``key`` was accepted and is waiting for inference."""
        with self._lock:
            s = self._get(key)
            s.expected += 1
            s.last_activity = self._clock()

    def add(self, key: SeriesKey, path: Path) -> bool:
        """The instance at ``path`` (announced before) has its result saved; False if already there."""
        with self._lock:
            s = self._get(key)
            s.expected = max(0, s.expected - 1)
            s.last_activity = self._clock()
            if path in s.paths:
                return False
            s.paths.append(path)
            return True

    def forget(self, key: SeriesKey) -> None:
        """An announced instance of ``key`` will not be added (it failed)."""
        with self._lock:
            s = self._series.get(key)
            if s is not None:
                s.expected = max(0, s.expected - 1)
                if not s.paths and not s.expected:
                    del self._series[key]

    def restore(self, series: PendingSeries) -> None:
        """Put back a series :meth:`due` handed out whose results could not be written yet (a transient error).

        It becomes due again ``series_idle_s`` from now; instances that
        arrived for it meanwhile are kept.
        """
        with self._lock:
            s = self._get(series.key)
            for p in series.paths:
                if p not in s.paths:
                    s.paths.append(p)
            s.expected += series.expected
            s.last_activity = self._clock()

    def due(self, force: bool = False) -> list[PendingSeries]:
        """Remove and return the series that are complete (all of them with ``force``)."""
        now = self._clock()
        out: list[PendingSeries] = []
        with self._lock:
            for key, s in list(self._series.items()):
                idle = now - s.last_activity >= self.series_idle_s
                if s.paths and not s.expected and (idle or force):
                    out.append(s)
                    del self._series[key]
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)


def sort_key_for_paths(paths: Sequence[Path]) -> list[Path]:
    """Paths in a stable order (by name)."""
    return sorted(paths, key=lambda p: p.name)
