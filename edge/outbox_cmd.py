"""``medge outbox status|requeue``: what waits in the outbox, and sending it again.

Both read the configuration the daemon uses (``--config``, then ``MEDGE_*``)
to find ``<spool_dir>/outbox`` and the ``[[dicom.destinations]]``, and work
whether the daemon is running or not (run them as the daemon's user):

``status``
    Per destination: objects pending, the age of the oldest, dead letters;
    and the results in ``unsent/`` (written while no destination was
    configured). Folders of destinations no longer configured are listed
    too: their objects are not sent.
``requeue``
    Moves the results in ``unsent/`` into each destination's (or the
    ``--destination``'s) pending folder; ``--dead-letter`` also moves that
    destination's dead letters back, with a fresh attempt count. A running
    daemon picks them up on its sender's next turn (within a second, or at
    its next attempt while the destination is backing off); a stopped one
    when it starts. The daemon re-queues ``unsent/`` by itself at start
    once a destination is configured.

Exit status: 0 on success; 1 with a message when the configuration has no
such destination, no destination at all, or no outbox folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge.config import MedgeConfig, load_config
from edge.egress.outbox import outbox_status, requeue_dead_letters, requeue_unsent
from edge.errors import ConfigError, MedgeError

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``medge outbox``."""
    sub = parser.add_subparsers(dest="outbox_command", metavar="status|requeue", required=True)
    st = sub.add_parser(
        "status",
        help="pending objects, oldest age and dead letters per destination; unsent results",
        description="Show what waits in the outbox: per destination the objects pending, the age of the oldest "
        "and the dead letters; and the results in unsent/ (written while no destination was configured).",
    )
    rq = sub.add_parser(
        "requeue",
        help="queue unsent results (and, with --dead-letter, dead letters) for sending again",
        description="Move the results in unsent/ into each configured destination's pending folder (or only "
        "--destination's); with --dead-letter also move the destinations' dead letters back to pending with a "
        "fresh attempt count. A running daemon sends them within seconds; a stopped one when it starts.",
    )
    rq.add_argument("--destination", default=None, metavar="NAME", help="only this [[dicom.destinations]] name")
    rq.add_argument(
        "--dead-letter", action="store_true", help="also move dead letters back to pending (attempt counts reset)"
    )
    for p in (st, rq):
        p.add_argument("--config", type=Path, default=None, metavar="FILE", help="the daemon's TOML configuration")
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _outbox_root(cfg: MedgeConfig, config_path: Path | None) -> Path:
    root = Path(cfg.spool_dir) / "outbox"
    if not root.is_dir():
        where = str(config_path) if config_path else "the defaults (no --config)"
        raise MedgeError(
            f"There is no outbox at {root} (spool_dir from {where} and MEDGE_SPOOL_DIR): "
            "is this the daemon's configuration, and has it run?"
        )
    return root


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _status(cfg: MedgeConfig, args: argparse.Namespace) -> int:
    root = _outbox_root(cfg, args.config)
    st = outbox_status(root, [d.name for d in cfg.dicom.destinations])
    if args.json:
        print(
            json.dumps(
                {
                    "outbox": str(root),
                    "destinations": [row.__dict__ for row in st.destinations],
                    "unsent": st.unsent,
                },
                indent=2,
            )
        )
        return 0
    print(f"outbox: {root}")
    if st.destinations:
        print(f"{'destination':<24} {'pending':>8} {'oldest':>9} {'dead letters':>13}")
        for row in st.destinations:
            note = "" if row.configured else "  (not configured: not sent)"
            oldest = _age(row.oldest_age_s) if row.pending else "-"
            print(f"{row.destination:<24} {row.pending:>8} {oldest:>9} {row.dead_letters:>13}{note}")
    else:
        print("no destination configured")
    hint = ""
    if st.unsent:
        hint = " (sent once a destination is configured: at the daemon's start, or with 'medge outbox requeue')"
    print(f"unsent: {st.unsent}{hint}")
    return 0


def _requeue(cfg: MedgeConfig, args: argparse.Namespace) -> int:
    names = [d.name for d in cfg.dicom.destinations]
    where = str(args.config) if args.config else "the defaults (no --config)"
    if args.destination is not None and args.destination not in names:
        listed = ", ".join(names) if names else "none"
        raise ConfigError(
            f"Destination {args.destination!r} is not in the configuration ({where}); configured: {listed}."
        )
    if not names:
        raise ConfigError(
            f"The configuration ({where}) has no [[dicom.destinations]]: there is nowhere to re-queue to. "
            "Add one, then run this again (or restart the daemon, which re-queues unsent results itself)."
        )
    targets = [args.destination] if args.destination is not None else names
    root = _outbox_root(cfg, args.config)
    try:
        unsent = requeue_unsent(root, targets)
        dead = {name: requeue_dead_letters(root, name) for name in targets} if args.dead_letter else {}
    except OSError as exc:
        raise MedgeError(f"Cannot move files in {root}: {exc} (run this as the daemon's user).") from exc
    if args.json:
        print(json.dumps({"outbox": str(root), "destinations": targets, "unsent": unsent, "dead_letters": dead}, indent=2))
        return 0
    others = [n for n in names if n not in targets]
    only = f" (not for {', '.join(others)}: they do not get these)" if unsent and others else ""
    print(f"re-queued {unsent} unsent result(s) for {', '.join(targets)}{only}")
    for name, n in dead.items():
        print(f"re-queued {n} dead letter(s) of {name}")
    if unsent or any(dead.values()):
        print(
            "a running daemon sends them within seconds (at its next attempt while a destination is backing off); "
            "a stopped one when it starts"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``status`` or ``requeue``; see the module doc."""
    cfg = load_config(args.config, check_models=False)
    if args.outbox_command == "status":
        return _status(cfg, args)
    return _requeue(cfg, args)
