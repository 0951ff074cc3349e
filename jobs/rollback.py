"""Rollback: make a previous publication (features and indexes) current again.

``fmpipe rollback --to DATE``; see :mod:`jobs.publication` for the protocol.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from jobs.online_store import OnlineTables
from jobs.publication import (FEATURE_VIEWS, collect_garbage, commit, current, history, lock, manifest, new_id,
                              pub_dir, reconcile, write_manifest)
from jobs.redact import redact
from jobs.settings import Paths, parse_date, restrict_umask
from jobs.staging import content_digest, stage_day


@dataclass(frozen=True)
class RollbackConfig:
    to: str = ""
    keep: int = 3
    batch_rows: int = 4096


def rollback(cfg: RollbackConfig, paths: Paths) -> dict:
    """Make the latest committed publication of ``cfg.to`` current again (features and index)."""
    from jobs.feast_store import get_store
    day = parse_date(cfg.to)
    candidates = [r for r in reversed(history(paths)) if r["date"] == day.isoformat()]
    if not candidates:
        dates = sorted({r["date"] for r in history(paths)})
        raise ValueError(f"no publication of {day} to roll back to; published dates: {dates}")
    t0 = time.perf_counter()
    store = get_store(paths)
    online = OnlineTables(store)
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
            record = commit(paths, online, pub_id, day, incoming if online.atomic else {}, index_dir, model_version, action,
                            backwards_ok=True)            # a rollback is the explicit way back
            gc = collect_garbage(paths, online, cfg.keep)
    finally:
        online.close()
    return {"rolled_back_to": pub_id, "date": day.isoformat(), "action": action, "seq": record["seq"],
            "previous": record["previous"], "index_dir": index_dir, "rollback_s": round(time.perf_counter() - t0, 3),
            "dropped": gc["dropped"]}


def main(argv: list[str] | None = None) -> dict:
    """``fmpipe rollback --to DATE`` (or ``to=DATE``); ``--list`` shows the publication history."""
    ap = argparse.ArgumentParser(description="Make a previous publication (features + indexes) current again.")
    ap.add_argument("--to", default="")
    ap.add_argument("--keep", type=int, default=RollbackConfig.keep)
    ap.add_argument("--list", action="store_true", help="print the publication history and the current pointer")
    ap.add_argument("overrides", nargs="*", help="to=DATE keep=N")
    args = ap.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    unknown = set(opts) - {"to", "keep"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}; valid: ['keep', 'to']")
    paths = Paths.from_env()
    restrict_umask()
    if args.list:
        out = {"current": current(paths), "history": history(paths)}
    else:
        to = opts.get("to") or args.to
        if not to:
            raise SystemExit("usage: fmpipe rollback --to YYYY-MM-DD")
        out = rollback(RollbackConfig(to=to, keep=int(opts.get("keep", args.keep))), paths)
    print(json.dumps(redact(out), indent=2, default=str))
    return out
