"""``medge demo``: the daemon, a simulated ultrasound probe and X-ray streams, a DICOM push, and a report.

Argument parsing only; the demo itself (what it runs, in what order, and
the report it writes) is :func:`edge.tools.demo.run_demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.tools.demo import run_demo

__all__ = ["configure_parser", "run"]

SEG_MODEL = "us-lesion-seg"
DET_MODEL = "xray-nodule-det"
CLS_MODEL = "xray-nodule-cls"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``medge demo``."""
    parser.add_argument("--duration-s", type=float, default=8.0, help="how long to stream (default 8)")
    parser.add_argument("--fps", type=float, default=30.0, help="probe frame rate (default 30)")
    parser.add_argument("--report", type=Path, default=Path("report"), help="report folder (default ./report)")
    parser.add_argument("--no-dicom", action="store_true", help="skip the DICOM push")
    parser.add_argument("--precision", default="auto", choices=["fp32", "int8", "auto"],
                        help="model precision (default auto: int8 where the model has it, on the CPU)")
    parser.add_argument("--engines-dir", type=Path, default=None, help="engines folder (default: bundled)")
    parser.add_argument("--seg-model", default=SEG_MODEL, help="segmentation model (default %(default)s)")
    parser.add_argument("--det-model", default=DET_MODEL, help="detection model (default %(default)s)")
    parser.add_argument("--cls-model", default=CLS_MODEL,
                        help="classification model (default %(default)s; its stream is skipped when absent)")
    parser.add_argument("--xray-fps", type=float, default=2.0, help="X-ray stream rate (default 2)")
    parser.add_argument("--cls-fps", type=float, default=4.0,
                        help="rate of the labelled X-ray stream to the classifier (default 4; "
                             "plus 1 fps asking for the heatmap)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every frame got an ``ok`` or ``dropped`` reply, 1 otherwise."""
    return run_demo(args)
