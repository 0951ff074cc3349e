"""``fmpipe <command> [key=value ...]``: the thin command line over the jobs."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": "jobs.generate", "tokenize": "jobs.tokenize", "train": "jobs.train", "evaluate": "jobs.evaluate",
    "embed": "jobs.embed", "validate": "jobs.validate", "publish": "jobs.publish",
    "index": "jobs.index", "report": "jobs.report", "demo": "jobs.demo", "retrieve": "jobs.retrieve",
    "sql": "jobs.sql", "import": "jobs.importers", "rollback": "jobs.rollback",
    "backfill": "jobs.pipeline", "export": "jobs.export",
}
LOCKED = 75          # EX_TEMPFAIL: another run holds the lock; retry later


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: fmpipe {{{','.join(COMMANDS)}}} [key=value ...]", file=sys.stderr)
        return 2
    from jobs.locks import LockBusy
    try:
        importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    except LockBusy as e:                    # another run holds the date or shared state: say who, no traceback
        print(f"fmpipe {argv[0]}: {e}", file=sys.stderr)
        return LOCKED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
