"""Rollback: make a previous publication (features and indexes) current again, and keep it there.

``fmpipe rollback --to DATE``; see :mod:`jobs.core.publication` for the protocol.

A rollback *pins* serving: the operator rolled back because something published later was bad, so
the next daily publish must not silently put a (possibly just as bad) day back on top. While the
latest serving move (publish or rollback; index rebuilds do not count) is a rollback, publish
refuses with :class:`RollbackPinned`, naming the pin and the two ways on: ``fmpipe rollback
--release`` once the cause is fixed (recorded in ``publications/PIN_RELEASED.json`` with the
rollback's sequence number, so a later rollback pins again), or ``fmpipe publish date=D force=true``.
The pin is derived from the committed pointer record itself, so it is exactly as durable as the
rollback; losing the release file can only re-pin, never unpin.

The dates a rollback undid (published after the date rolled back to, before the rollback) stay
*rolled back* until they are published again (:func:`rolled_back_dates`): embed must not align a
new day to one of them, nor the gate compare with one (:func:`alignment_reference`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass

from jobs.core.online_store import open_online
from jobs.core.io import atomic_write_json, partition, partition_dates
from jobs.core.failpoints import failpoint
from jobs.core.publication import (FEATURE_VIEWS, PublishOrderError, collect_garbage, commit, current, history, lock,
                              manifest, new_id, pub_dir, reconcile, root, write_manifest)
from jobs.core.redact import redact
from jobs.core.settings import Paths, parse_date, restrict_umask
from jobs.core.staging import content_digest, stage_day


ROLLBACK_ACTIONS = ("rollback", "rollback_rebuild")


class RollbackPinned(PublishOrderError):
    """Serving is pinned by a rollback; publishing over it needs a release or ``force=true``."""


def release_path(paths: Paths):
    return root(paths) / "PIN_RELEASED.json"


def moves(paths: Paths, cur: dict | None = None) -> list[dict]:
    """Every pointer move, oldest first, with ``cur`` (the current record) when history lacks it."""
    recs = history(paths)
    if cur is not None and cur.get("seq") not in {r.get("seq") for r in recs}:
        recs.append(cur)
    return sorted(recs, key=lambda r: r.get("seq", 0))


def serving_move(paths: Paths, cur: dict | None = None) -> dict | None:
    """The latest publish or rollback (an index rebuild re-points the same publication: skipped)."""
    return next((r for r in reversed(moves(paths, cur)) if r.get("action") != "index"), None)


def pin(paths: Paths, cur: dict | None = None) -> dict | None:
    """The rollback record pinning serving, or None (no rollback in force, or it was released)."""
    move = serving_move(paths, cur)
    if move is None or move.get("action") not in ROLLBACK_ACTIONS:
        return None
    try:
        released = json.loads(release_path(paths).read_text()).get("seq")
    except (OSError, ValueError, AttributeError):
        released = None
    return None if released == move.get("seq") else move


def check_not_pinned(paths: Paths, day: dt.date, cur: dict | None, force: bool) -> None:
    """Refuse to publish over a rollback still in force (call under the publication lock)."""
    held = pin(paths, cur)
    if held is None or force:
        return
    raise RollbackPinned(
        f"refusing to publish {day}: serving is pinned to {held['date']} by a rollback (publication "
        f"{held['publication']}, seq {held['seq']}, at {held.get('committed_at', '?')}); publishing now would silently "
        f"undo it. When the cause is fixed, release the pin with `fmpipe rollback --release` and re-run; or "
        f"publish over it on purpose with `fmpipe publish date={day} force=true`.")


def release(paths: Paths) -> dict:
    """Release the rollback pin (``fmpipe rollback --release``): the next publish may move serving."""
    with lock(paths):
        reconcile(paths)
        held = pin(paths, current(paths))
        if held is None:
            return {"released": None, "action": "noop (no rollback pin in force)"}
        failpoint("rollback.release")                    # pin release decided, PIN_RELEASED.json not yet written
        atomic_write_json({"seq": held["seq"], "publication": held["publication"], "date": held["date"],
                           "released_at": dt.datetime.now(dt.timezone.utc).isoformat()}, release_path(paths))
    return {"released": held["publication"], "date": held["date"], "seq": held["seq"], "action": "released"}


def rolled_back_dates(paths: Paths) -> dict[str, int]:
    """``{date: seq of the rollback that undid it}`` for every date whose latest publish a later
    rollback to an earlier date undid; a new publish of the date clears it."""
    published: dict[str, int] = {}
    undone: dict[str, int] = {}
    for rec in moves(paths):
        if rec.get("action") == "publish":
            published[rec["date"]] = rec["seq"]
            undone.pop(rec["date"], None)
        elif rec.get("action") in ROLLBACK_ACTIONS:
            for d in [d for d in published if d > rec["date"]]:
                undone[d] = rec["seq"]
                del published[d]
    return undone


def published_dates(paths: Paths) -> list[dt.date]:
    """Every date whose embeddings consumers were served and no rollback undid: what the offline
    views expose (a day that failed the gate was never published; a rolled-back day is withdrawn)."""
    undone = rolled_back_dates(paths)
    return sorted({dt.date.fromisoformat(r["date"]) for r in moves(paths)} - {dt.date.fromisoformat(d) for d in undone})


def alignment_reference(paths: Paths, day: dt.date) -> dt.date | None:
    """The latest profile partition before ``day`` with a manifest that no rollback undid: what a
    new day's vectors should be aligned to (never the bad day an operator rolled back)."""
    bad = rolled_back_dates(paths)
    days = partition_dates(paths.profile_embeddings, marker="_manifest.json")[::-1]
    return next((d for d in days if d < day and d.isoformat() not in bad
                 and partition(paths.profile_embeddings, d).exists()), None)


@dataclass(frozen=True)
class RollbackConfig:
    to: str = ""
    keep: int = 3
    batch_rows: int = 4096


def rollback(cfg: RollbackConfig, paths: Paths) -> dict:
    """Make the latest committed publication of ``cfg.to`` current again (features and index)."""
    from jobs.core.feast_store import get_store
    day = parse_date(cfg.to)
    candidates = [r for r in reversed(history(paths)) if r["date"] == day.isoformat()]
    if not candidates:
        dates = sorted({r["date"] for r in history(paths)})
        raise ValueError(f"no publication of {day} to roll back to; published dates: {dates}")
    t0 = time.perf_counter()
    store = get_store(paths)
    online = open_online(store)
    try:
        with lock(paths):
            reconcile(paths, online)
            target = candidates[0]
            pub_id, index_dir = target["publication"], target.get("index_dir")
            cur = current(paths)
            if cur and cur["publication"] == pub_id:
                return {"rolled_back_to": pub_id, "date": day.isoformat(), "action": "noop (already current)"}
            snaps = {fv: online.snapshot(pub_id, fv) for fv in FEATURE_VIEWS}
            restorable = (online.atomic and all(online.exists(t) for t in snaps.values())
                          and index_dir and (paths.home / index_dir).exists())
            if restorable:
                action, incoming, model_version = "rollback", snaps, target.get("model_version")
            else:                                     # rebuild the date's state as a new publication
                from jobs.index import IndexConfig, build_publication_indexes
                old = pub_id
                pub_id = new_id(day)
                pub_dir(paths, pub_id).mkdir(parents=True)
                write_manifest(paths, pub_id, {"publication": pub_id, "date": day.isoformat(), "status": "staging",
                                               "rebuilt_from": old, "content": content_digest(paths, day)})
                staged = stage_day(store, paths, online, day, pub_id, "write", cfg.batch_rows)
                meta = build_publication_indexes(IndexConfig(date=day.isoformat()), paths, pub_dir(paths, pub_id) / "index")
                index_dir = str((pub_dir(paths, pub_id) / "index").relative_to(paths.home))
                m = manifest(paths, pub_id)
                m.update({k: staged[k] for k in ("base", "rows", "carried", "seeded")}, index=meta)
                write_manifest(paths, pub_id, m)
                action, incoming, model_version = "rollback_rebuild", staged["staging"], meta["titles"]["model_version"]
            failpoint("rollback.staged")                # target chosen (or rebuilt aside), nothing committed
            record = commit(paths, online, pub_id, day, incoming if online.atomic else {}, index_dir, model_version, action,
                            backwards_ok=True)            # a rollback is the explicit way back
            failpoint("rollback.committed")             # rolled back and mirrored, garbage not yet collected
            gc = collect_garbage(paths, online, cfg.keep)
    finally:
        online.close()
    from jobs.tools.sql import refresh_catalogue
    return {"rolled_back_to": pub_id, "date": day.isoformat(), "action": action, "seq": record["seq"],
            "previous": record["previous"], "index_dir": index_dir, "rollback_s": round(time.perf_counter() - t0, 3),
            "dropped": gc["dropped"], **refresh_catalogue(paths)}


def main(argv: list[str] | None = None) -> dict:
    """``fmpipe rollback --to DATE`` (or ``to=DATE``); ``--list`` shows the publication history."""
    ap = argparse.ArgumentParser(description="Make a previous publication (features + indexes) current again.")
    ap.add_argument("--to", default="")
    ap.add_argument("--keep", type=int, default=RollbackConfig.keep)
    ap.add_argument("--list", action="store_true", help="print the publication history and the current pointer")
    ap.add_argument("--release", action="store_true", help="release the rollback pin: the next publish may move serving")
    ap.add_argument("overrides", nargs="*", help="to=DATE keep=N")
    args = ap.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    unknown = set(opts) - {"to", "keep"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}; valid: ['keep', 'to']")
    paths = Paths.from_env()
    restrict_umask()
    if args.list:
        out = {"current": current(paths), "history": history(paths), "pinned_by": pin(paths, current(paths)),
               "rolled_back_dates": rolled_back_dates(paths)}
    elif args.release:
        out = release(paths)
    else:
        to = opts.get("to") or args.to
        if not to:
            raise SystemExit("usage: fmpipe rollback --to YYYY-MM-DD")
        out = rollback(RollbackConfig(to=to, keep=int(opts.get("keep", args.keep))), paths)
    print(json.dumps(redact(out), indent=2, default=str))
    return out
