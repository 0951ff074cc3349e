"""Where state lives and how job configs are built.

All state goes under one directory, ``$FMPIPE_HOME`` (default ``<repo>/var``), so a test or a demo
run can point the whole pipeline at a scratch folder, and deleting it is a clean reset.
Every job takes one frozen dataclass config, built from defaults plus ``key=value`` overrides;
unknown keys are rejected so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import typing
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
T = typing.TypeVar("T")

# Permissions of everything written under $FMPIPE_HOME. Why: the tables hold user behaviour and
# the state decides what is served, so no other local user may read or alter them, and lock files
# are owner-only so nobody else can open one and hold it to block publishing. The group may read
# outputs (analysts, a Feast server in the pipeline's group); nothing is ever world-writable.
FILE_MODE = 0o640          # tables, manifests, reports, history, pointers
DIR_MODE = 0o750           # partitions and publication folders
LOCK_MODE = 0o600          # lock files: owner only
LOCK_DIR_MODE = 0o700      # the lock folder: nobody else can create (and hold) a lock file in it
UMASK = 0o027              # what every entry point adds to the process umask (Spark, Feast, GE too)


def restrict_umask() -> int:
    """Add :data:`UMASK` to the process umask (never loosen it); returns the previous umask.

    Called by every entry point, so files that libraries create on our behalf (Spark partitions,
    the Feast registry and SQLite store, GE results) are never group-writable or world-readable."""
    old = os.umask(UMASK)
    os.umask(old | UMASK)
    return old


@dataclass(frozen=True)
class Paths:
    """Every table and artefact location, derived from one root."""
    home: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(Path(os.environ.get("FMPIPE_HOME", REPO_ROOT / "var")).resolve())

    def __truediv__(self, name: str) -> Path:
        return self.home / name

    @property
    def raw(self) -> Path: return self.home / "raw"
    @property
    def catalogue(self) -> Path: return self.home / "catalogue" / "catalogue.parquet"
    @property
    def title_vocab(self) -> Path: return self.home / "vocab" / "titles.parquet"
    @property
    def tokens(self) -> Path: return self.home / "tokens"
    @property
    def quarantine(self) -> Path: return self.home / "quarantine"
    @property
    def history(self) -> Path: return self.home / "history"
    @property
    def models(self) -> Path: return self.home / "models"
    @property
    def content(self) -> Path: return self.home / "content"

    @property
    def content_cache(self) -> Path: return self.home / "content" / "cache"
    @property
    def profile_embeddings(self) -> Path: return self.home / "embeddings" / "profile"
    @property
    def title_embeddings(self) -> Path: return self.home / "embeddings" / "title"
    @property
    def gx(self) -> Path: return self.home / "gx"
    @property
    def feast(self) -> Path: return self.home / "feast"
    @property
    def index(self) -> Path: return self.home / "index"
    @property
    def reports(self) -> Path: return self.home / "reports"


def parse_date(value: str | dt.date) -> dt.date:
    """Accept a date or an ISO string; name the bad value on failure."""
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError as e:
        raise ValueError(f"not a date (expected YYYY-MM-DD): {value!r}") from e


def _coerce(tp: typing.Any, raw: str) -> typing.Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, x) for x in raw.split(",") if x)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        for i, a in enumerate(args):           # the first member that takes the text (float | str: 0.5, auto)
            try:
                return _coerce(a, raw)
            except ValueError:
                if i == len(args) - 1:
                    raise
    return tp(raw)


def parse_overrides(cls: type[T], overrides: list[str] | dict | None = None) -> T:
    """Build ``cls`` from ``key=value`` strings (or a dict); unknown keys raise with the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    items = overrides.items() if isinstance(overrides, dict) else (
        tuple(o.split("=", 1)) if "=" in o else (o, None) for o in (overrides or []))
    values = {}
    for key, raw in items:
        key = key.lstrip("-").replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown option {key!r} for {cls.__name__}; valid: {sorted(names)}")
        if raw is None and hints.get(key) is bool:
            raw = "true"                                       # a bare flag: --dry-run
        if raw is None:
            raise ValueError(f"option {key!r} needs a value (key=value)")
        try:
            values[key] = raw if not isinstance(raw, str) else _coerce(hints[key], raw)
        except ValueError as e:
            raise ValueError(f"option {key}: {e}") from e
    return cls(**values)


def run_cli(cls: type[T], run: typing.Callable[[T, Paths], dict], doc: str | None, argv: list[str] | None,
            show: typing.Callable[[dict], object] = lambda out: out) -> dict:
    """The thin CLI every job shares: ``key=value`` overrides of ``cls`` -> ``run(cfg, Paths.from_env())``,
    holding the step's date and shared-state locks like the pipeline does (:func:`jobs.pipeline.cli_locks`)."""
    import argparse
    from jobs.pipeline import cli_locks
    from jobs.core.redact import redact
    ap = argparse.ArgumentParser(description=(doc or cls.__doc__ or "").strip().splitlines()[0])
    ap.add_argument("overrides", nargs="*", help=f"key=value overrides of {cls.__name__}")
    args, flags = ap.parse_known_args(argv)       # --flag style booleans are overrides too
    cfg, paths = parse_overrides(cls, args.overrides + flags), Paths.from_env()
    restrict_umask()
    with cli_locks(paths, cfg):
        out = redact(run(cfg, paths))           # stdout and the caller never see a credential
    print(show(out))
    return out
