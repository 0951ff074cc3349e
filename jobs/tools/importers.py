"""Bring your own data: turn an interaction log into the pipeline's raw event partitions.

* ``fmpipe import events source=log.csv user=uid item=sku timestamp=time [action=... duration=...
  device=... canvas=... action_map=click:play,buy:complete catalogue=items.csv]`` — a generic
  CSV/Parquet log with a column mapping. Missing or mistyped columns fail with the column, the row
  and what was expected; nothing is written until the whole file has been checked.
* ``fmpipe import beauty [path=.../amazon-beauty]`` — the Amazon Beauty reviews (one line per user with
  day-resolution gaps; item attributes become the catalogue's content).
* ``fmpipe import movielens [path=.../ml-1m] [users=N]`` — MovieLens ``ratings.dat`` (+ movies and
  extra infos as the catalogue): each rating is an event; 4-5 -> thumbs_up, 1-2 -> thumbs_down,
  3 -> complete; device/canvas/locale are unknown (OOV tokens).

Events land in ``raw/dt=YYYY-MM-DD/`` by their UTC date (re-importing replaces those partitions),
with deterministic ``event_id`` = ``<source>-<row>``; then ``fmpipe tokenize date=<last> full=true``.

This module is only the command line (``fmpipe import`` resolves to ``jobs.tools.importers`` in
:mod:`jobs.cli`): it parses the options and dispatches. The generic mapped-log importer lives in
:mod:`jobs.tools.event_import`, the fixed-format dataset readers in :mod:`jobs.tools.dataset_import`, and
catalogue mapping in :mod:`jobs.tools.catalogue_import`; both importers depend only downwards, so the
command line can import them without a cycle.
"""
from __future__ import annotations

import argparse

from jobs.tools.dataset_import import import_beauty, import_movielens
from jobs.tools.event_import import ImportConfig, ImportError_, run
from jobs.core.settings import Paths, parse_overrides


TITLE_KEYS = {"id": "title_id", "name": "name", "kind": "kind", "genres": "genres", "release_date": "release_date",
              "synopsis": "synopsis", "runtime_s": "runtime_s"}


def title_options(overrides: list[str]) -> list[str]:
    """``title.<field>=COL`` options (``title.id=item title.genres=genres title.genres_sep='|'
    title.date_format=%d %b %Y``) -> ``catalogue_map`` / ``genres_sep`` / ``date_format``."""
    rest, mapping, extra = [], [], []
    for o in overrides:
        key, eq, value = o.partition("=")
        if not key.startswith("title."):
            rest.append(o)
            continue
        name = key[len("title."):]
        if name in ("genres_sep", "date_format"):
            extra.append(f"{name}={value}")
        elif name in TITLE_KEYS and eq:
            mapping.append(f"{TITLE_KEYS[name]}:{value}")
        else:
            raise ImportError_(f"unknown catalogue option {key!r}; valid: "
                               + ", ".join(f"title.{k}" for k in [*TITLE_KEYS, "genres_sep", "date_format"]))
    return rest + extra + ([f"catalogue_map={','.join(mapping)}"] if mapping else [])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["events", "movielens", "beauty"])
    ap.add_argument("overrides", nargs="*", help="key=value (events: ImportConfig fields; movielens: path=, users=)")
    args, flags = ap.parse_known_args(argv)       # --dry-run style flags are overrides too
    args.overrides = title_options(args.overrides + flags)
    paths = Paths.from_env()
    if args.kind == "beauty":
        opts = dict(o.split("=", 1) for o in args.overrides)
        if set(opts) - {"path", "users"}:
            raise SystemExit(f"unknown option(s) {sorted(set(opts) - {'path', 'users'})} for beauty; valid: path, users")
        out = import_beauty(paths, opts.get("path"), int(opts.get("users", 0)))
    elif args.kind == "movielens":
        opts = dict(o.split("=", 1) for o in args.overrides)
        unknown = set(opts) - {"path", "users", "ratings_file"}
        if unknown:
            raise SystemExit(f"unknown option(s) {sorted(unknown)} for movielens; valid: path, users, ratings_file")
        out = import_movielens(paths, opts.get("path"), int(opts.get("users", 0)), opts.get("ratings_file"))
    else:
        out = run(parse_overrides(ImportConfig, args.overrides), paths)
    print(out)
    return out
