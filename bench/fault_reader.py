"""Reader consistency for ``bench/faults.py``: a separate reader process while publications move.

The reader (``python bench/fault_reader.py HOME OUT``) repeats one *read*, as a serving consumer
would: the current pointer record, Feast ``get_online_features`` of every layer of a fixed set of
profiles, and a FAISS search of the pointer's title index with fixed queries, then the pointer again;
when the pointer moved during the read it retries (counted, not a read). Each read logs the
publication it followed and a fingerprint of what it saw.

The driver (:func:`run`) meanwhile publishes, rolls back and kill -9s publishers at failpoints
(>= 20 operations), and after each one — with no writer running — fingerprints the served state the
same way: ``{publication: fingerprint}`` of every publication that was ever committed. A read is
*mixed* when its fingerprint is not the one of the publication it followed (values of two
publications, or an index of another one).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

N_ENTITIES = 16


def read_once(store, paths, entities: list[int], features: list[str], cache: dict) -> dict | None:
    """One consistent read, or None when the pointer moved meanwhile (the caller retries)."""
    import faiss
    from jobs.core import publication as pubs
    cur = pubs.current(paths)
    got = store.get_online_features(features=features, entity_rows=[{"profile_id": p} for p in entities]).to_dict()
    d = paths.home / cur["index_dir"]
    if d not in cache:
        cache[d] = faiss.read_index(str(d / "titles.faiss"))
    index = cache[d]
    q = np.random.default_rng(0).standard_normal((4, index.d)).astype(np.float32)
    _, ids = index.search(q, 10)
    again = pubs.current(paths)
    if again.get("seq") != cur.get("seq"):
        return None
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(got):
        for v in got[f]:
            h.update(repr(v if v is None or isinstance(v, (str, int)) else np.round(np.asarray(v, np.float32), 5).tolist()).encode())
    h.update(ids.tobytes())
    return {"publication": cur["publication"], "seq": cur["seq"], "date": cur["date"], "fp": h.hexdigest()}


def setup_read(paths):
    from jobs.core.feast_store import get_store
    store = get_store(paths)
    fv = store.get_feature_view("profile_embeddings")
    features = [f"profile_embeddings:{f.name}" for f in fv.features]
    return store, features


def reader_main(home: str, out: str, entities: str) -> None:
    """Read until ``OUT.stop`` exists; one JSON line per read in ``OUT``, the count in ``OUT.count``."""
    from jobs.core.settings import Paths
    warnings.simplefilter("ignore")
    paths = Paths(Path(home))
    store, features = setup_read(paths)
    ents = [int(x) for x in entities.split(",")]
    cache: dict = {}
    n = retries = errors = 0
    with open(out, "w") as f:
        while not os.path.exists(out + ".stop"):
            try:
                r = read_once(store, paths, ents, features, cache)
            except Exception as e:                            # noqa: BLE001 (a read that failed: counted, retried)
                errors += 1
                f.write(json.dumps({"error": f"{type(e).__name__}: {str(e)[:120]}"}) + "\n")
                time.sleep(0.01)
                continue
            if r is None:
                retries += 1
                continue
            n += 1
            f.write(json.dumps(r) + "\n")
            if n % 100 == 0:
                f.flush()
                Path(out + ".count").write_text(f"{n} {retries} {errors}")
    Path(out + ".count").write_text(f"{n} {retries} {errors}")


def run(w, home_paths, reads: int, min_ops: int, log) -> dict:
    """Drive publishes, rollbacks and kill -9 crashes under a reader; returns the reader's counts."""
    import subprocess
    import pyarrow.parquet as pq
    from bench.fault_harness import run_step, steps_code
    from jobs import pipeline
    from jobs.core.io import partition
    from jobs.rollback import RollbackConfig, release, rollback
    paths = home_paths
    os.environ["FMPIPE_HOME"] = str(paths.home)
    ids = pq.read_table(partition(paths.profile_embeddings, w.day), columns=["profile_id"])["profile_id"].to_pylist()
    ents = ",".join(str(p) for p in sorted(ids)[:N_ENTITIES])
    store, features = setup_read(paths)
    cache: dict = {}
    expected: dict[str, str] = {}

    def settle_fp() -> None:
        r = None
        while r is None:
            r = read_once(store, paths, [int(x) for x in ents.split(",")], features, cache)
        expected[r["publication"]] = r["fp"]

    settle_fp()
    out = str(w.root / "reader.jsonl")
    proc = subprocess.Popen([sys.executable, __file__, str(paths.home), out, ents], stdout=subprocess.DEVNULL,
                            stderr=open(w.root / "reader.stderr", "wb"), start_new_session=True)
    code = steps_code(w.day, ["publish", "index"])
    ops: list[str] = []
    t0 = time.time()

    def count() -> int:
        try:
            return int(Path(out + ".count").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    cycle = 0
    while (len(ops) < min_ops or count() < reads) and proc.poll() is None and time.time() - t0 < 3600:
        rollback(RollbackConfig(to=w.yesterday.isoformat()), paths)
        ops.append("rollback")
        settle_fp()
        release(paths)
        point = ("publish.staged_view", "publish.swapped", "publish.swap.uncommitted", "publish.settle.pointer#2")[cycle % 4]
        r = run_step(paths, code, point=point)
        ops.append(f"kill9@{point}" if r.reached else f"failed_to_reach@{point}")
        settle_fp()
        pipeline.publish(w.day.isoformat())
        ops.append("publish")
        settle_fp()
        cycle += 1
        log(f"reader: {len(ops)} operations, {count()} reads")
    Path(out + ".stop").write_text("")
    proc.wait(timeout=120)
    n, retries, errors = (int(x) for x in Path(out + ".count").read_text().split())
    mixed, unknown = 0, 0
    for line in Path(out).read_text().splitlines():
        r = json.loads(line)
        if "fp" not in r:
            continue
        if r["publication"] not in expected:
            unknown += 1
        elif expected[r["publication"]] != r["fp"]:
            mixed += 1
    return {"reader_reads": n, "reader_mixed_reads": mixed + unknown, "reader_unknown_publication": unknown,
            "reader_retries": retries, "reader_errors": errors, "reader_operations": len(ops),
            "reader_publications": len(expected), "reader_ops": ops}


if __name__ == "__main__":
    reader_main(*sys.argv[1:4])
