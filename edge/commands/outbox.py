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

Which spool: ``--spool-dir``, else ``MEDGE_SPOOL_DIR``, else ``spool_dir``
of the file, else systemd's ``$STATE_DIRECTORY``; a ``--config`` file that
names none of them is refused (under systemd the spool comes from the unit's
``StateDirectory=``, which an operator's shell does not have: pass
``--spool-dir /var/lib/medge/<instance>``). ``requeue`` refuses to run as
another user than the outbox folder's owner: files it created as root would
stop the daemon from deleting what it has sent.

Exit status: 0 on success; 1 with a message when the configuration has no
such destination, no destination at all, no outbox folder, names no spool,
or the user is not the outbox's owner.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edge.config import MedgeConfig, load_config_and_spool_source
from edge.egress.dicom.outbox_files import outbox_status, requeue_dead_letters, requeue_unsent
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
        "fresh attempt count. A running daemon that has these destinations sends them within seconds; a stopped "
        "one (or one started before a destination was added) when it (re)starts.",
    )
    rq.add_argument("--destination", default=None, metavar="NAME", help="only this [[dicom.destinations]] name")
    rq.add_argument(
        "--dead-letter", action="store_true", help="also move dead letters back to pending (attempt counts reset)"
    )
    for p in (st, rq):
        p.add_argument("--config", type=Path, default=None, metavar="FILE", help="the daemon's TOML configuration")
        p.add_argument(
            "--spool-dir",
            type=Path,
            default=None,
            metavar="DIR",
            help="the daemon's spool folder (needed for a systemd unit whose spool comes from StateDirectory=, "
            "e.g. /var/lib/medge/<instance>)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _outbox_root(cfg: MedgeConfig, spool_source: str, args: argparse.Namespace) -> Path:
    config_path: Path | None = args.config
    if args.spool_dir is not None:
        spool = Path(args.spool_dir)
    else:
        if config_path is not None and spool_source == "default":  # the file's unit gives it: StateDirectory=
            raise MedgeError(
                f"{config_path} names no spool_dir, and neither MEDGE_SPOOL_DIR nor $STATE_DIRECTORY is set: the "
                "daemon's spool then comes from its systemd unit (StateDirectory=). Pass it: --spool-dir "
                "/var/lib/medge (medge.service) or /var/lib/medge/<instance> (medge@<instance>.service)."
            )
        spool = Path(cfg.spool_dir)
    root = spool / "outbox"
    if not root.is_dir():
        where = str(config_path) if config_path else "the defaults (no --config)"
        raise MedgeError(
            f"There is no outbox at {root} (--spool-dir, MEDGE_SPOOL_DIR, spool_dir from {where}, or "
            "$STATE_DIRECTORY): is this the daemon's spool, and has it run?"
        )
    return root


def _check_owner(root: Path) -> None:
    """Refuse to move files as another user than the outbox's owner (e.g. root via sudo)."""
    if not hasattr(os, "geteuid"):
        return
    owner = root.stat().st_uid
    if os.geteuid() != owner:
        try:
            import pwd

            name = pwd.getpwuid(owner).pw_name
        except (ImportError, KeyError):
            name = str(owner)
        raise MedgeError(
            f"{root} belongs to {name}, not to this user: folders and files made here would stop the daemon "
            f"from deleting what it has sent. Run it as the daemon's user: sudo -u {name} medge outbox requeue ..."
        )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _status(cfg: MedgeConfig, spool_source: str, args: argparse.Namespace) -> int:
    root = _outbox_root(cfg, spool_source, args)
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


def _requeue(cfg: MedgeConfig, spool_source: str, args: argparse.Namespace) -> int:
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
    root = _outbox_root(cfg, spool_source, args)
    _check_owner(root)
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
            "a running daemon started with these destinations configured sends them within seconds (at its next "
            "attempt while a destination is backing off); a stopped one, or one started before a destination "
            "was added, when it (re)starts"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``status`` or ``requeue``; see the module doc."""
    cfg, spool_source = load_config_and_spool_source(args.config, check_models=False)
    if args.outbox_command == "status":
        return _status(cfg, spool_source, args)
    return _requeue(cfg, spool_source, args)
