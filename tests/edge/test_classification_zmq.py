"""Classification and the map frames over ZeroMQ protocol v1, against a real daemon on loopback.

The client in this module is written from docs/protocol.md alone (pyzmq,
json and numpy; none of the daemon's modules): after the header come the
map frames the header describes, in the fixed order ``mask``,
``probability``, ``heatmap``, each present exactly when its key is in the
header. The project's own client (``edge.tools.zmq_client``) and ``medge
send zmq`` are checked against the same daemon.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zmq

from edge.cli import main
from edge.config import load_config
from edge.daemon import Daemon
from edge.tools.zmq_client import ZmqClient

DOC_MAP_ORDER = ("mask", "probability", "heatmap")  # docs/protocol.md, "Reply to a frame request"


@pytest.fixture(scope="module")
def daemon(fixture_engines_with_cls: Path) -> Iterator[Daemon]:
    env = {
        "MEDGE_ENGINES_DIR": str(fixture_engines_with_cls),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
        "MEDGE_METRICS__PORT": "0",
        "MEDGE_DICOM__ENABLED": "false",
    }
    with Daemon(load_config(None, env=env)) as d:
        assert d.ready
        yield d


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


# ------------------------------------------------------------------ a client from the document
def _dealer(ctx: zmq.Context, daemon: Daemon) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.zmq.ingest_endpoint)
    return s


def _request(i: Any, img: np.ndarray, **extra: Any) -> list[bytes]:
    hdr = {"v": 1, "id": i, "dtype": str(img.dtype), "shape": list(img.shape), **extra}
    return [json.dumps(hdr).encode("utf-8"), img.tobytes()]


def read_reply(frames: list[bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header, and each map frame it describes, taken in the documented order."""
    header = json.loads(frames[0])
    maps: dict[str, np.ndarray] = {}
    rest = list(frames[1:])
    for key in DOC_MAP_ORDER:
        if key in header:
            desc = header[key]
            maps[key] = np.frombuffer(rest.pop(0), dtype=desc["dtype"]).reshape(desc["shape"])
    assert not rest, "a frame no header key describes"
    return header, maps


def _ask(sock: zmq.Socket, i: Any, img: np.ndarray, **extra: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    sock.send_multipart(_request(i, img, **extra))
    return read_reply(sock.recv_multipart())


def _square(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    img[y0:y1, x0:x1] = 200
    return img


BIG = _square(120, 160, (20, 30, 80, 110))  # 28 % of the 64x64 input after the letterbox: positive
SMALL = _square(120, 160, (50, 70, 60, 80))  # under 1 %: negative


# ------------------------------------------------------------------ tests
def test_models_reply_says_what_each_model_can_carry(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    sock.send(json.dumps({"v": 1, "id": "cat", "op": "models"}).encode())
    by_name = {m["name"]: m for m in json.loads(sock.recv_multipart()[0])["models"]}
    cls = by_name["tiny-cls"]
    assert cls["task"] == "classification" and cls["labels"] == ["nodule"]
    assert cls["output"]["classes"] is True and cls["output"]["heatmap"] is True
    assert cls["output"]["threshold"] == 0.5 and cls["output"]["temperature"] == 2.0
    assert by_name["tiny-seg"]["output"]["probability"] is True and by_name["tiny-det"]["output"]["heatmap"] is False


def test_classification_reply_classes_decision_and_heatmap(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    hdr, maps = _ask(sock, "c1", BIG, model="tiny-cls", want=["heatmap"])
    assert hdr["status"] == "ok" and hdr["task"] == "classification" and list(maps) == ["heatmap"]
    [top] = hdr["classes"]
    f = (60 * 80) / (120 * 160) * (48 / 64)  # the square's share of the letterboxed 64x64 input
    assert top["label"] == "nodule" and top["score"] == pytest.approx(1 / (1 + math.exp(-20 * (f - 0.1))), abs=1e-4)
    assert hdr["decision"] is True and "boxes" not in hdr  # want has no boxes
    hm = maps["heatmap"]
    assert hm.shape == BIG.shape and hm.dtype == np.uint8
    y, x = np.unravel_index(int(np.argmax(hm)), hm.shape)
    assert 30 <= y < 90 and 40 <= x < 120 and abs(int(hm.max()) - 255 * top["score"]) <= 2  # on the square
    assert hm[30:70, 40:100].mean() > 3 * hm[100:, :20].mean() and hm[100:, :20].max() < 60
    neg, neg_maps = _ask(sock, "c2", SMALL, model="tiny-cls", want=["heatmap"])
    assert neg["decision"] is False and neg["classes"][0]["score"] < 0.5
    # Scaled by the score (docs/protocol.md, Map frames): the hottest cell of the negative frame is still on its
    # small square, at 255 * score at most, so the frame stays darker than the positive one.
    nhm = neg_maps["heatmap"]
    y, x = np.unravel_index(int(np.argmax(nhm)), nhm.shape)
    assert 45 <= y < 65 and 65 <= x < 85 and nhm.max() <= 255 * neg["classes"][0]["score"] + 1 < hm.max()


def test_classification_default_and_empty_want(daemon: Daemon, ctx: zmq.Context) -> None:
    """Classes and decision are always there; no frame unless a map is asked for."""
    sock = _dealer(ctx, daemon)
    for i, extra in enumerate(({}, {"want": []}, {"want": ["mask", "probability"]})):
        sock.send_multipart(_request(f"d{i}", BIG, model="tiny-cls", **extra))
        frames = sock.recv_multipart()
        hdr = json.loads(frames[0])
        assert len(frames) == 1 and hdr["status"] == "ok" and hdr["decision"] is True
        assert [c["label"] for c in hdr["classes"]] == ["nodule"]
        assert not {"mask", "probability", "heatmap"} & set(hdr)


def test_segmentation_probability_frames(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    hdr, maps = _ask(sock, "s1", BIG, model="tiny-seg", want=["mask", "probability", "heatmap"])
    assert hdr["status"] == "ok" and list(maps) == ["mask", "probability"]  # heatmap: not this model's, ignored
    mask, prob = maps["mask"], maps["probability"]
    assert prob.shape == mask.shape == BIG.shape
    assert 0.1 < mask.mean() < 0.9  # the bright square, the fixture's foreground
    assert prob[mask == 1].min() >= 128 and prob[mask == 0].max() <= 128  # mask == (p > 0.5), every pixel
    only, only_maps = _ask(sock, "s2", BIG, model="tiny-seg", want=["probability"])
    assert list(only_maps) == ["probability"] and np.array_equal(only_maps["probability"], prob)
    det, det_maps = _ask(sock, "s3", BIG, model="tiny-det", want=["boxes", "heatmap", "probability"])
    assert det["status"] == "ok" and det["boxes"] and det_maps == {}


@pytest.mark.parametrize("want", [["heatmap", 3], "heatmap", ["Heatmap"], [["heatmap"]], {"heatmap": True},
                                  ["probabilities"]])
def test_malformed_want_is_bad_header(daemon: Daemon, ctx: zmq.Context, want: Any) -> None:
    sock = _dealer(ctx, daemon)
    sock.send_multipart(_request("bad", BIG, model="tiny-cls", want=want))
    frames = sock.recv_multipart()
    hdr = json.loads(frames[0])
    assert len(frames) == 1 and hdr["status"] == "error" and hdr["error"]["code"] == "bad_header"
    assert "want" in hdr["error"]["message"]


def test_pub_carries_the_same_frames(daemon: Daemon, ctx: zmq.Context) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 10_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"cls-view\0")
    sub.connect(daemon.zmq.publish_endpoint)
    sock = _dealer(ctx, daemon)
    deadline = time.monotonic() + 10.0
    i = 0
    while True:  # the slow joiner: send until the subscription has taken effect
        assert time.monotonic() < deadline, "the subscription never took effect"
        sock.send_multipart(_request(f"p{i}", BIG, model="tiny-cls", stream="cls-view", want=["heatmap"]))
        reply = sock.recv_multipart()
        i += 1
        if sub.poll(50):
            break
    while True:
        published = sub.recv_multipart()
        if json.loads(published[1])["id"] == f"p{i - 1}":
            break
    assert published[0] == b"cls-view\0" and published[1:] == reply and len(reply) == 2


def test_metrics_are_labelled_with_the_classifier(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    before = daemon.registry.get_sample_value("medge_frames_received_total", {"source": "zmq", "model": "tiny-cls"})
    _ask(sock, "m1", BIG, model="tiny-cls")
    after = daemon.registry.get_sample_value("medge_frames_received_total", {"source": "zmq", "model": "tiny-cls"})
    assert (after or 0) == (before or 0) + 1
    post = daemon.registry.get_sample_value("medge_stage_seconds_count", {"model": "tiny-cls", "stage": "postprocess"})
    assert post is not None and post >= 1


def test_project_client_decodes_classes_and_maps(daemon: Daemon) -> None:
    with ZmqClient(daemon.zmq.ingest_endpoint) as client:
        rep = client.request(BIG, model="tiny-cls", want=["heatmap"])
        assert rep.status == "ok" and rep.decision is True and rep.classes[0]["label"] == "nodule"
        assert rep.heatmap is not None and rep.heatmap.shape == BIG.shape and rep.mask is None
        seg = client.request(BIG, model="tiny-seg", want=["probability", "mask"])
        assert seg.mask is not None and seg.probability is not None and seg.heatmap is None
        assert seg.classes == [] and seg.decision is None


def test_send_prints_classes_and_decision(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["send", "zmq", "--endpoint", daemon.zmq.ingest_endpoint, "--model", "tiny-cls", "--source", "xray",
            "--frame", "128x128", "--frames", "4", "--fps", "50", "--want", "heatmap"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "last result: classes nodule " in out and "decision " in out and "heatmap 128x128" in out
    assert "decisions: " in out
    assert main([*args, "--json"]) == 0
    summary = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    last = summary["last_result"]
    assert last["task"] == "classification" and last["classes"][0]["label"] == "nodule"
    assert isinstance(last["decision"], bool) and last["heatmap"] == [128, 128]
    assert sum(summary["decisions"].values()) == summary["ok"] == 4
