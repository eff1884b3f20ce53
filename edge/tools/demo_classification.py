"""The classification part of ``medge demo``: labelled X-ray streams, their scores, the ROC and a CAM overlay.

Two ZeroMQ streams go to the classification model, both of synthetic chest
radiographs whose labels are known, drawn by the generator the bundled
classifier was trained on (:class:`edge.tools.synthetic.Radiographs` with
``nodules``, seeds 21 and 22, which no training, validation or held-out set
uses: half the frames hold no nodule):

* ``xray-cls-1`` at ``--cls-fps`` with ``want: []`` (the reply carries
  ``classes``, ``decision`` and timing only);
* ``xray-cam-1`` at 1 fps with ``want: ["heatmap"]`` (the class activation
  map as a second frame).

The load generator keeps only each stream's last reply, so the scores are
read from the daemon's PUB socket, which publishes every ``ok`` result with
its map frames (docs/protocol.md): a SUB socket on the two streams is
drained once a second while streaming and, after the last reply, until every
``ok`` reply has been seen (or a short deadline). The report gets the ROC of
the scores against the known labels (``roc_classification.png``), one CAM
overlay of a frame with a nodule (``overlay_classification.png``) and a
``classification`` section in ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from edge.errors import MedgeError
from edge.tools.loadgen import LoadResult, StreamSpec
from edge.tools.synthetic import Radiographs
from edge.tools.zmq_client import ProtocolError, Published, Reply, ZmqSubscriber

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = ["CLS_STREAM", "CAM_STREAM", "ClassifierPlan", "ClassificationStreams", "resolve_classifier",
           "classification_cr", "write_classification_report", "classification_markdown"]

_log = logging.getLogger(__name__)

CLS_STREAM = "xray-cls-1"
CAM_STREAM = "xray-cam-1"
#: Nodules per frame over each stream's loop: half the frames are without a finding.
_NODULES = {CLS_STREAM: (0, 1, 0, 2, 0, 1, 0, 3), CAM_STREAM: (1, 0)}
_LOOPS = {CLS_STREAM: 32, CAM_STREAM: 8}
_SEEDS = {CLS_STREAM: 21, CAM_STREAM: 22}
CAM_FPS = 1.0
#: Most scored replies kept (a demo scores a few dozen).
_MAX_SCORED = 100_000


@dataclass(frozen=True)
class ClassifierPlan:
    """The classification model of the demo: its name, positive label and decision threshold."""

    model: str
    label: str
    threshold: float

    @classmethod
    def from_engines(cls, engines_dir: Path, model: str) -> "ClassifierPlan":
        """Read the model's manifest (its first label is the finding, its threshold the operating point)."""
        from edge.inference.manifest import Manifest

        m = Manifest.load(engines_dir / model)
        if m.task != "classification" or not m.labels:
            raise MedgeError(f"Model {model!r} is not a classification model (task {m.task!r}).")
        return cls(model, m.labels[0], float(m.postprocessing.threshold))


def resolve_classifier(engines_dir: Path, model: str) -> tuple[ClassifierPlan | None, str]:
    """The classification model when it is under ``engines_dir``, else ``None`` and why (printed)."""
    if not (engines_dir / model / "manifest.json").is_file():
        note = f"classification stream skipped: no model {model!r} under {engines_dir}"
    else:
        try:
            return ClassifierPlan.from_engines(engines_dir, model), ""
        except MedgeError as exc:
            note = f"classification stream skipped: {str(exc).splitlines()[0]}"
    print(note)
    return None, note


@dataclass(frozen=True)
class ScoredFrame:
    """One ``ok`` classification reply: its frame's known label, the score of the finding and the decision."""

    stream: str
    seq: int
    label: bool
    score: float
    decision: bool


@dataclass(frozen=True)
class CamFrame:
    """The class activation map of one frame with a finding, as received."""

    stream: str
    seq: int
    score: float
    decision: bool
    heatmap: np.ndarray


@dataclass
class ClassificationStreams:
    """The demo's labelled X-ray streams to the classifier and the scores read back from PUB.

    Parameters
    ----------
    plan : ClassifierPlan
    fps : float
        Rate of the plain stream (``xray-cls-1``); the heatmap stream runs at 1 fps.
    """

    plan: ClassifierPlan
    fps: float
    sources: dict[str, Radiographs] = field(init=False)
    scored: list[ScoredFrame] = field(default_factory=list, init=False)
    cam: CamFrame | None = field(default=None, init=False)
    _seen: set[str] = field(default_factory=set, init=False, repr=False)
    _sub: ZmqSubscriber | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise MedgeError(f"--cls-fps {self.fps} is not > 0.")
        self.sources = {name: Radiographs(512, 512, "uint16", seed=_SEEDS[name], loop=_LOOPS[name],
                                          nodules=_NODULES[name]) for name in (CLS_STREAM, CAM_STREAM)}

    def specs(self) -> list[StreamSpec]:
        """The two streams for the load generator."""
        return [StreamSpec(name=CLS_STREAM, source=self.sources[CLS_STREAM], model=self.plan.model,
                           rate_fps=self.fps, window=4, want=[]),
                StreamSpec(name=CAM_STREAM, source=self.sources[CAM_STREAM], model=self.plan.model,
                           rate_fps=CAM_FPS, window=2, want=["heatmap"])]

    def subscribe(self, endpoint: str) -> None:
        """Open the SUB socket on the daemon's PUB endpoint (before streaming: a subscription takes a moment)."""
        self._sub = ZmqSubscriber(endpoint, streams=[CLS_STREAM, CAM_STREAM])

    def drain(self, timeout_s: float = 0.0) -> int:
        """Record every published result waiting (the first waits up to ``timeout_s``); return how many."""
        n = 0
        while self._sub is not None:
            try:
                pub = self._sub.recv(timeout_s if n == 0 else 0.0)
            except ProtocolError as exc:
                _log.warning("Undecodable published result ignored: %s", exc)
                continue
            except zmq.ZMQError as exc:  # the socket is unusable: keep what was scored
                _log.warning("Classification scores: the subscription failed (%s); %d scored.", exc, len(self.scored))
                self.close()
                break
            if pub is None:
                break
            self._record(pub)
            n += 1
        return n

    def finish(self, res: LoadResult, timeout_s: float = 2.0) -> None:
        """Wait until every ``ok`` reply of the streams has been read from PUB (or ``timeout_s``), then close."""
        want = {f"{s.stream}:{s.seq}" for s in res.samples if s.status == "ok" and s.stream in self.sources}
        deadline = time.monotonic() + timeout_s
        while self._sub is not None and not want <= self._seen:
            left = deadline - time.monotonic()
            if left <= 0:
                _log.warning("Classification scores: %d of %d ok replies were not seen on PUB.",
                             len(want - self._seen), len(want))
                break
            self.drain(min(left, 0.2))
        self.close()

    def close(self) -> None:
        """Close the SUB socket (idempotent)."""
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def ok_replies(self, res: LoadResult) -> int:
        """How many ``ok`` replies the streams got (what could be scored)."""
        return sum(1 for s in res.samples if s.status == "ok" and s.stream in self.sources)

    def _record(self, pub: Published) -> None:
        """Keep one published result: its score, decision and known label (and one CAM of a positive frame)."""
        rep = pub.reply
        stream, _, seq_text = rep.id.rpartition(":")
        if pub.stream not in self.sources or stream != pub.stream or not seq_text.isdigit():
            return
        score = _finding_score(rep, self.plan.label)
        if rep.status != "ok" or score is None or rep.decision is None or rep.id in self._seen:
            return
        if len(self.scored) >= _MAX_SCORED:
            return
        seq = int(seq_text)
        label = self.sources[stream].label(seq)
        self._seen.add(rep.id)
        self.scored.append(ScoredFrame(stream, seq, label, score, rep.decision))
        if self.cam is None and label and rep.heatmap is not None:
            self.cam = CamFrame(stream, seq, score, rep.decision, np.array(rep.heatmap, dtype=np.uint8))


def _finding_score(rep: Reply, label: str) -> float | None:
    """The reply's calibrated score of ``label`` (``None`` when absent or not a number)."""
    for c in rep.classes:
        if c.get("label") == label and isinstance(c.get("score"), (int, float)) and np.isfinite(c["score"]):
            return float(c["score"])
    return None


def classification_cr(seed: int = 13) -> Dataset:
    """A CR instance of a synthetic chest radiograph with one nodule (phantom identity), for the DICOM push."""
    from edge.tools.synthetic_dicom import make_cr, phantom_identity

    frame = Radiographs(512, 512, "uint16", seed=seed, loop=1, nodules=(1,)).frame(0)
    ds = make_cr(np.array(frame))
    for key, value in phantom_identity().items():
        setattr(ds, key, value)
    return ds


def write_classification_report(report: Path, streams: ClassificationStreams, res: LoadResult,
                                files: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """``roc_classification.png``, ``overlay_classification.png`` and the summary's ``classification`` section."""
    from edge.tools.roc import operating_point, roc_auc

    plan, scored = streams.plan, streams.scored
    labels = [f.label for f in scored]
    scores = [f.score for f in scored]
    op = operating_point([f.decision for f in scored], labels)
    auc = roc_auc(scores, labels) if scored else None
    positives = sum(labels)
    section: dict[str, Any] = {
        "model": plan.model, "label": plan.label, "threshold": round(plan.threshold, 6),
        "streams": {CLS_STREAM: {"fps": streams.fps, "want": []}, CAM_STREAM: {"fps": CAM_FPS, "want": ["heatmap"]}},
        "ok_replies": streams.ok_replies(res), "n": len(scored), "positives": positives,
        "negatives": len(scored) - positives,
        "distinct_frames": len({(f.stream, f.seq % _LOOPS[f.stream]) for f in scored}),
        "auc": None if auc is None else round(auc, 4),
        "sensitivity": _round(op["sensitivity"]), "specificity": _round(op["specificity"]),
        "confusion": {k: op[k] for k in ("tp", "fp", "tn", "fn")},
        "decisions": {"positive": op["tp"] + op["fp"], "negative": op["tn"] + op["fn"]},
        "cam_frame": None,
    }
    _roc_figure(report, section, scores, labels, files, notes)
    _cam_figure(report, streams, section, files, notes)
    return section


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _roc_figure(report: Path, section: dict[str, Any], scores: list[float], labels: list[bool],
                files: dict[str, str], notes: list[str]) -> None:
    """``roc_classification.png`` when both classes were scored (and matplotlib is installed)."""
    from edge.tools.plots import save_roc_plot
    from edge.tools.roc import roc_points

    if section["auc"] is None:
        notes.append(f"no ROC: {section['positives']} positive and {section['negatives']} negative frame(s) scored")
        return
    fpr, tpr, _ = roc_points(scores, labels)
    spec, sens = section["specificity"], section["sensitivity"]
    point = (1.0 - spec, sens) if spec is not None and sens is not None else None
    title = (f"{section['model']}: ROC of '{section['label']}' on {section['n']} synthetic frames "
             f"({section['positives']} positive)")
    if save_roc_plot(report / "roc_classification.png", fpr, tpr, auc=section["auc"], title=title,
                     operating_point=point, op_label=f"decision threshold {section['threshold']:.4g}"):
        files["roc_classification"] = "roc_classification.png"


def _cam_figure(report: Path, streams: ClassificationStreams, section: dict[str, Any],
                files: dict[str, str], notes: list[str]) -> None:
    """``overlay_classification.png``: the CAM (red) of a frame with a nodule, the simulator's nodules (blue)."""
    from edge.tools.plots import overlay_heatmap, save_png

    cam = streams.cam
    if cam is None:
        notes.append("no class activation map of a frame with a nodule was received")
        return
    source = streams.sources[cam.stream]
    truth = [{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]} for b in source.truth(cam.seq)]
    caption = (f"{streams.plan.model}: {streams.plan.label} score {cam.score:.3f}, decision "
               f"{'present' if cam.decision else 'absent'} (threshold {streams.plan.threshold:.3g}); "
               f"CAM red, simulator's nodules blue")
    img = overlay_heatmap(source.frame(cam.seq), cam.heatmap, boxes=truth, caption=caption)
    save_png(img, report / "overlay_classification.png")
    files["overlay_classification"] = "overlay_classification.png"
    section["cam_frame"] = {"stream": cam.stream, "seq": cam.seq, "score": round(cam.score, 6),
                            "decision": cam.decision}


def classification_markdown(section: dict[str, Any], files: dict[str, str]) -> list[str]:
    """The report's Classification section."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100.0 * x:.0f} %"

    c = section["confusion"]
    md = ["## Classification", "",
          f"`{section['model']}` on {section['n']} synthetic X-ray frames scored of {section['ok_replies']} ok "
          f"replies ({section['distinct_frames']} distinct; {section['positives']} with nodules, "
          f"{section['negatives']} without, labels known from the simulator): ROC AUC "
          f"{section['auc'] if section['auc'] is not None else 'undefined'}. At the manifest's decision threshold "
          f"{section['threshold']:.4g}: sensitivity {pct(section['sensitivity'])}, specificity "
          f"{pct(section['specificity'])} (TP {c['tp']}, FP {c['fp']}, TN {c['tn']}, FN {c['fn']}); decisions: "
          f"{section['decisions']['positive']} present, {section['decisions']['negative']} absent.",
          "The frames come from the generator the model was trained on (seeds no training, validation or "
          "held-out set uses), but they are few, half of them positive, and repeat in runs longer than the loop: "
          "this shows the scores, decisions and maps travel end to end and agree with the model's held-out "
          "behaviour, not a measurement of its accuracy (its held-out metrics, with confidence intervals, are "
          "in its manifest and model card).", ""]
    if "roc_classification" in files:
        md += ["![ROC](roc_classification.png)", ""]
    cam = section.get("cam_frame")
    if "overlay_classification" in files and cam:
        md += [f"Class activation map (red, `want: [\"heatmap\"]`) of frame {cam['seq']} of `{cam['stream']}`, "
               f"score {cam['score']:.3f}, decision {'present' if cam['decision'] else 'absent'}; the simulator's "
               f"nodules in blue. The map shows where the evidence for the score lies; it is not a segmentation.", "",
               "![CAM](overlay_classification.png)", ""]
    return md
