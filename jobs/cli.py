"""``fmpipe <command> [key=value ...]``: the thin command line over the jobs."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": "jobs.tools.generate", "tokenize": "jobs.tokenize", "train": "jobs.train", "evaluate": "jobs.evaluate",
    "embed": "jobs.embed", "validate": "jobs.validate", "publish": "jobs.publish",
    "index": "jobs.index", "report": "jobs.report", "demo": "jobs.tools.demo", "retrieve": "jobs.tools.retrieve",
    "sql": "jobs.tools.sql", "import": "jobs.tools.importers", "rollback": "jobs.rollback",
    "backfill": "jobs.pipeline", "export": "jobs.export",
    "status": "jobs.tools.status", "distill": "jobs.distill", "finetune-task": "jobs.finetune_task",
    "prompt-tune": "jobs.prompt_tune",
}
LOCKED = 75          # EX_TEMPFAIL: another run holds the lock; retry later
FAILED = 1           # an expected failure (bad input, missing data, failed gate): the message says what to fix


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: fmpipe {{{','.join(COMMANDS)}}} [key=value ...]", file=sys.stderr)
        return 2
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from jobs.core.locks import LockBusy
    try:
        importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    except LockBusy as e:                    # another run holds the date or shared state: say who, no traceback
        print(f"fmpipe {argv[0]}: {e}", file=sys.stderr)
        return LOCKED
    except expected_errors() as e:
        if debug:
            raise
        print(f"fmpipe {argv[0]}: error: {_message(e)}\n(run with --debug for the traceback)", file=sys.stderr)
        return FAILED
    except store_unreachable() as e:
        if debug:
            raise
        print(f"fmpipe {argv[0]}: error: the online store is unreachable ({_message(e)}). Nothing was committed: the "
              f"last publication keeps serving. Start it (or fix connection_string in feature_store.yaml) and re-run "
              f"the same command.\n(run with --debug for the traceback)", file=sys.stderr)
        return FAILED
    return 0


def store_unreachable() -> tuple[type[BaseException], ...]:
    """A network online store (Redis) that is down or unreachable: an operator fixes that, not the code.

    Why apart from :func:`expected_errors`: redis-py's errors are not ``OSError``s, and the message
    must say what a half-done publish means (nothing committed; the publication commit is one
    swap in the store, :mod:`jobs.core.redis_store`)."""
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:
        return ()
    return (RedisConnectionError, RedisTimeoutError)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix (bad input or option, missing data, a failed gate, a gap in the
    history chain, a bad checkpoint): one message naming what, where and how, no traceback."""
    from fm.checkpoint import CheckpointError
    from fm.content import EncoderUnavailable
    from jobs.core.publication import PublishOrderError
    from jobs.core.history import HistoryGapError
    from jobs.validate import GateFailed
    return (ValueError, LookupError, OSError, CheckpointError, EncoderUnavailable, GateFailed, HistoryGapError,
            PublishOrderError)


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return str(text) or type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
