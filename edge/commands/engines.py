"""``medge engines list|verify``: the installed models and their artifacts.

``list`` shows every model folder under the engines dir (name, version,
task, labels, artifacts); ``verify`` recomputes each artifact's sha256 and
compares it with the manifest (the daemon refuses a mismatch at start-up;
this finds it first). Two folders whose manifests carry the same model name
are an error naming both folders (``medge serve`` refuses them too: one
would silently shadow the other). Exit status: 0 when everything verifies,
1 otherwise (a broken manifest, a duplicate name, a bad artifact).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge.inference.manifest import Manifest, default_engines_dir, duplicate_message, scan, sha256_file

__all__ = ["configure_parser", "run", "verify_manifest"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``medge engines``."""
    sub = parser.add_subparsers(dest="engines_command", metavar="list|verify", required=True)
    for name, help_text in (
        ("list", "list the models in the engines folder"),
        ("verify", "check every artifact's sha256 against its manifest"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--engines-dir",
            type=Path,
            default=None,
            help="engines folder (default: $MEDGE_ENGINES_DIR or the bundled engines/)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "verify":
            p.add_argument("models", nargs="*", help="model names (default: all)")


def verify_manifest(manifest: Manifest) -> dict[str, str]:
    """``{precision: "ok" | problem}`` for each artifact of ``manifest``."""
    out: dict[str, str] = {}
    base = manifest.directory or Path(".")
    for prec, art in sorted(manifest.artifacts.items()):
        path = base / art.path
        if not path.is_file():
            out[prec] = f"missing: {path}"
            continue
        actual = sha256_file(path)
        out[prec] = "ok" if actual == art.sha256 else f"sha256 mismatch: file {actual[:12]}…, manifest {art.sha256[:12]}…"
    return out


def _scan(root: Path) -> tuple[list[Manifest], list[tuple[str, str]], dict[str, list[Manifest]]]:
    """Loadable manifests (every folder, duplicates included), broken folders, duplicate names."""
    if not root.is_dir():
        return [], [(str(root), "engines folder does not exist")], {}
    by_name, broken = scan(root)
    found = sorted((m for ms in by_name.values() for m in ms), key=lambda m: str(m.directory))
    dups = {n: ms for n, ms in by_name.items() if len(ms) > 1}
    return found, [(p.name, why) for p, why in broken], dups


def run(args: argparse.Namespace) -> int:
    """List or verify; see the module doc."""
    root = args.engines_dir or default_engines_dir()
    manifests, broken, dups = _scan(root)
    dup_errors = {n: duplicate_message(n, ms) for n, ms in sorted(dups.items())}
    if args.engines_command == "list":
        rows: list[dict[str, Any]] = [
            {
                "name": m.name,
                "version": m.version,
                "task": m.task,
                "labels": list(m.labels),
                "input": [m.input.channels, *m.input.size],
                "artifacts": sorted(m.artifacts),
                "research_only": m.research_only,
                "directory": str(m.directory),
            }
            for m in manifests
        ]
        if args.json:
            print(json.dumps({"engines_dir": str(root), "models": rows, "broken": dict(broken),
                              "duplicates": {n: [str(m.directory) for m in ms] for n, ms in sorted(dups.items())}},
                             indent=2))
        else:
            print(f"engines: {root}")
            for r in rows:
                print(
                    f"  {r['name']:<20} v{r['version']:<6} {r['task']:<14} labels={','.join(r['labels'])} "
                    f"input={'x'.join(map(str, r['input']))} artifacts={','.join(r['artifacts'])}"
                )
            for name, why in broken:
                print(f"  {name:<20} BROKEN: {why}")
            for name, why in dup_errors.items():
                print(f"  {name:<20} DUPLICATE: {why}")
            if not rows and not broken:
                print("  (no models)")
        return 1 if broken or dups else 0
    wanted = set(args.models)
    unknown = wanted - {m.name for m in manifests}
    report: dict[str, Any] = {}
    bad = bool(broken) or bool(unknown) or any(not wanted or n in wanted for n in dups)
    for m in manifests:
        if wanted and m.name not in wanted:
            continue
        res = verify_manifest(m)
        # A duplicated name is reported per folder, so neither copy hides the other.
        key = m.name if m.name not in dups else f"{m.name} ({m.directory})"
        report[key] = res
        bad = bad or any(v != "ok" for v in res.values())
    if args.json:
        print(json.dumps({"engines_dir": str(root), "models": report, "broken": dict(broken),
                          "duplicates": {n: [str(m.directory) for m in ms] for n, ms in sorted(dups.items())},
                          "unknown": sorted(unknown), "ok": not bad}, indent=2))
    else:
        for name, res in report.items():
            for prec, status in res.items():
                print(f"{name:<20} {prec:<13} {status}")
        for name, why in broken:
            print(f"{name:<20} BROKEN: {why}")
        for name, why in dup_errors.items():
            if not wanted or name in wanted:
                print(f"{name:<20} DUPLICATE: {why}")
        for name in sorted(unknown):
            print(f"{name:<20} not found in {root}")
        print("all artifacts verified" if not bad else "verification FAILED")
    return 1 if bad else 0
