"""FAISS indexes of one date: titles (cosine and raw inner product) and profiles, saved with id maps.

Three indexes per date, written aside into the date's publication folder and made current with it
(:mod:`jobs.core.publication`; ``TitleIndex.current`` / ``ProfileIndex.current`` follow
``publications/CURRENT.json``):

* ``titles.faiss`` — L2-normalised title vectors, inner product = cosine: "titles like this title".
* ``titles_ip.faiss`` — the raw title vectors, inner product: the model's score of a title for a
  profile is the raw dot product profile·title, so retrieval (:mod:`jobs.tools.retrieve`) searches this
  one (normalising would rank by cosine and drop each title's norm, which carries popularity).
* ``profiles.faiss`` — normalised profile vectors (``profile_layer``, default the mean-pooled last
  layer) of the profiles active that day: "similar profiles".

The type is chosen by size: exact ``IndexFlatIP`` below ``exact_below`` vectors; above it
``IVF<nlist>,Flat`` (nlist = 4·sqrt(n)) trained on a sample (or ``kind=hnsw``), with the probe
depth tuned against exact search on 1,000 sampled vectors at build time: starting at ``nprobe``,
doubled until recall@10 reaches ``target_recall``, or halved while it stays 0.01 above it; the
curve, the chosen value and its recall are stored in the index's meta. ``faiss-gpu`` is used for building and searching when installed and a GPU is visible
(``use_gpu=auto``); indexes are always saved as CPU indexes, and the CPU path is the default.

``fmpipe index date=D`` rebuilds the indexes of the current publication when it is for D (skipped
when the publication already has indexes built with the same settings), or, with no publication
of D, builds ``index/dt=D`` standalone.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from jobs.core.io import atomic_write_json, atomic_write_table, partition, swap_dir, temp_sibling
from jobs.core.failpoints import failpoint
from jobs.core.settings import run_cli, Paths, parse_date

INDEX_FILE, IDS_FILE, META_FILE = "titles.faiss", "title_ids.parquet", "index_meta.json"
IP_FILE = "titles_ip.faiss"
PROFILE_FILE, PROFILE_IDS_FILE, PROFILE_META_FILE = "profiles.faiss", "profile_ids.parquet", "profile_meta.json"


@dataclass(frozen=True)
class IndexConfig:
    date: str = ""
    exact_below: int = 100_000
    kind: str = "auto"                   # auto (Flat below exact_below, IVF above) | flat | ivf | hnsw
    nlist: int = 0                       # 0 = 4*sqrt(n)
    nprobe: int = 32                     # first nprobe tried (IVF); efSearch/2 for HNSW
    target_recall: float = 0.95          # raise nprobe until recall@10 vs exact reaches this (0 = no tuning)
    train_sample: int = 100_000
    profiles: bool = True                # also build the "similar profiles" index
    profile_layer: str = "emb_layer2_mean"
    use_gpu: str = "auto"                # auto | yes | no
    seed: int = 0


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def maybe_gpu(index: faiss.Index, use_gpu: str) -> faiss.Index:
    gpu = has_gpu()
    if use_gpu == "yes" and not gpu:
        raise RuntimeError("use_gpu=yes but faiss has no GPU support here (install the `gpu` extra on a CUDA host)")
    if gpu and use_gpu in ("auto", "yes") and not isinstance(index, faiss.IndexHNSW):
        return faiss.index_cpu_to_all_gpus(index)
    return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (single GPU or replicated); CPU indexes are returned as they are."""
    if not has_gpu() or isinstance(index, (faiss.IndexFlat, faiss.IndexIVF, faiss.IndexHNSW)):
        return index
    return faiss.index_gpu_to_cpu(index)


def _set_probe(index: faiss.Index, value: int) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = value
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = value
    else:                                               # GPU index (or replicas over GPUs)
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", value)


def exact_truth(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    return exact.search(queries, k)[1]


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(got, truth)]))


def recall_at_10(index: faiss.Index, vectors: np.ndarray, rng: np.random.Generator, queries: int = 1000) -> float:
    q = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    return recall(index.search(q, 10)[1], exact_truth(vectors, q))


def build(vectors: np.ndarray, cfg: IndexConfig) -> tuple[faiss.Index, dict]:
    """Choose the index type by size; for approximate ones, tune the probe depth to the recall target.

    Vectors are indexed as given (normalise first for cosine); the metric is inner product.
    """
    n, d = vectors.shape
    kind = cfg.kind if cfg.kind != "auto" else ("flat" if n < cfg.exact_below else "ivf")
    if kind == "flat" or n < 1000:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return maybe_gpu(index, cfg.use_gpu), {"type": "Flat", "recall_at_10": 1.0, "exact": True}
    rng = np.random.default_rng(cfg.seed)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(vectors)
        name, knob = "HNSW32,Flat", "efSearch"
        start = max(cfg.nprobe * 2, 16)
    elif kind == "ivf":
        nlist = cfg.nlist or int(4 * np.sqrt(n))
        nlist = max(1, min(nlist, n // 39))
        index = maybe_gpu(faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT), cfg.use_gpu)
        sample = vectors[rng.choice(n, size=min(n, max(cfg.train_sample, 40 * nlist)), replace=False)]
        index.train(sample)
        index.add(vectors)
        name, knob, start = f"IVF{nlist},Flat", "nprobe", min(cfg.nprobe, nlist)
    else:
        raise ValueError(f"kind must be auto, flat, ivf or hnsw, not {cfg.kind!r}")
    q = vectors[rng.choice(n, size=min(1000, n), replace=False)]
    truth = exact_truth(vectors, q)
    limit = nlist if kind == "ivf" else 4096
    curve: dict[int, float] = {}

    def measure(v: int) -> float:
        _set_probe(index, v)
        curve[v] = round(recall(index.search(q, 10)[1], truth), 4)
        return curve[v]

    value = start
    if measure(value) >= cfg.target_recall > 0:
        # already there: probe less while a 0.01 margin remains (build-time queries are indexed vectors)
        while value > 1 and measure(max(value // 2, 1)) >= cfg.target_recall + 0.01:
            value = max(value // 2, 1)
    else:
        while cfg.target_recall > 0 and curve[value] < cfg.target_recall and value < limit:
            value = min(value * 2, limit)
            measure(value)
    _set_probe(index, value)
    curve = dict(sorted(curve.items()))
    meta = {"type": name, knob: value, "recall_at_10": curve[value], f"{knob}_curve": curve,
            "target_recall": cfg.target_recall, "exact": False, "recall_queries": len(q)}
    if kind == "ivf":
        meta["nprobe"] = value
    return index, meta


def _vectors(table, column: str) -> np.ndarray:
    col = table[column].combine_chunks()
    dim = len(col[0].as_py()) if len(col) else 0
    return np.ascontiguousarray(col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim), dtype=np.float32)


def _write(index: faiss.Index, path: Path) -> None:
    tmp = temp_sibling(path)
    faiss.write_index(to_cpu(index), str(tmp))
    failpoint(f"index.write:{path.name}")        # index file written aside, not yet renamed (its folder is fsynced by swap_dir)
    os.replace(tmp, path)


def settings(cfg: IndexConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("date", "use_gpu")}


def build_publication_indexes(cfg: IndexConfig, paths: Paths, out: Path) -> dict:
    """Build the date's title (cosine, raw IP) and profile indexes into ``out``, written aside first."""
    day = parse_date(cfg.date)
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        table = pq.read_table(partition(paths.title_embeddings, day), columns=["title_id", "title_embedding", "model_version"])
        raw = _vectors(table, "title_embedding")
        version = table["model_version"][0].as_py()
        common = {"date": day.isoformat(), "model_version": version, "settings": settings(cfg)}
        t0 = time.perf_counter()
        index, meta = build(normalise(raw), cfg)
        meta.update(common, vectors=len(raw), dim=int(raw.shape[1]), build_s=round(time.perf_counter() - t0, 3),
                    metric="inner_product_on_l2_normalised")
        _write(index, tmp / INDEX_FILE)
        t0 = time.perf_counter()
        ip_index, ip_meta = build(raw, cfg)
        ip_meta.update(common, vectors=len(raw), dim=int(raw.shape[1]), build_s=round(time.perf_counter() - t0, 3),
                       metric="inner_product_raw")
        _write(ip_index, tmp / IP_FILE)
        meta["inner_product"] = ip_meta
        atomic_write_table(table.select(["title_id"]), tmp / IDS_FILE)
        atomic_write_json(meta, tmp / META_FILE)
        result = {"titles": meta, "titles_ip": ip_meta}
        if cfg.profiles:
            ptable = pq.read_table(partition(paths.profile_embeddings, day), columns=["profile_id", cfg.profile_layer])
            pv = normalise(_vectors(ptable, cfg.profile_layer))
            t0 = time.perf_counter()
            pindex, pmeta = build(pv, cfg)
            pmeta.update(common, vectors=len(pv), dim=int(pv.shape[1]), build_s=round(time.perf_counter() - t0, 3),
                         metric="inner_product_on_l2_normalised", layer=cfg.profile_layer)
            _write(pindex, tmp / PROFILE_FILE)
            atomic_write_table(ptable.select(["profile_id"]), tmp / PROFILE_IDS_FILE)
            atomic_write_json(pmeta, tmp / PROFILE_META_FILE)
            result["profiles"] = pmeta
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def run(cfg: IndexConfig, paths: Paths) -> dict:
    """Indexes for ``cfg.date``: attached to the current publication of that date (atomic pointer
    update), reused when it already has indexes built with the same settings."""
    from jobs.core import publication as pubs
    day = parse_date(cfg.date)
    t0 = time.perf_counter()
    with pubs.lock(paths):
        pubs.reconcile(paths)                 # finish a commit a killed publisher left unmirrored
        cur = pubs.current(paths)
        if cur and cur["date"] == day.isoformat():
            if cur.get("index_dir"):
                meta_file = paths.home / cur["index_dir"] / META_FILE
                if meta_file.exists():
                    meta = json.loads(meta_file.read_text())
                    if meta.get("settings") == settings(cfg):
                        return {**_summary(paths.home / cur["index_dir"], meta), "publication": cur["publication"], "reused": True}
            out = pubs.pub_dir(paths, cur["publication"]) / f"index-{uuid.uuid4().hex[:8]}"
            result = build_publication_indexes(cfg, paths, out)
            record = {**cur, "index_dir": str(out.relative_to(paths.home)), "action": "index",
                      "seq": pubs.next_seq(paths, cur),
                      "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
            m = pubs.manifest(paths, cur["publication"])
            m["index"] = result
            pubs.write_manifest(paths, cur["publication"], m)
            failpoint("index.before_pointer")           # rebuilt indexes in place, pointer not yet moved to them
            pubs.settle(paths, record)
            failpoint("index.pointer_moved")            # pointer names the new indexes, the old folder not yet removed
            old = paths.home / cur["index_dir"] if cur.get("index_dir") else None
            if old is not None and old != out and old.exists():
                shutil.rmtree(old, ignore_errors=True)
            return {**_summary(out, result["titles"]), "publication": cur["publication"], "reused": False,
                    "index_s": round(time.perf_counter() - t0, 3)}
        # no publication of this date: a standalone build under index/dt=D
        final = partition(paths.index, day)
        result = build_publication_indexes(cfg, paths, final)
        made_current = cur is None
        if made_current:
            atomic_write_json({"date": day.isoformat()}, paths.index / "CURRENT.json")
        return {**_summary(final, result["titles"]), "publication": None, "current": made_current,
                "index_s": round(time.perf_counter() - t0, 3)}


def _summary(directory: Path, meta: dict) -> dict:
    out = {k: meta.get(k) for k in ("type", "recall_at_10", "nprobe", "date", "vectors", "dim", "model_version", "build_s", "metric")}
    pm = directory / PROFILE_META_FILE
    if pm.exists():
        p = json.loads(pm.read_text())
        out["profiles"] = {k: p.get(k) for k in ("type", "vectors", "recall_at_10", "nprobe", "build_s", "layer")}
    out["index_dir"] = str(directory)
    return out


def current_dir(paths: Paths) -> Path:
    """The folder of the current indexes: the current publication's, else a standalone build's."""
    from jobs.core import publication as pubs
    cur = pubs.current(paths)
    if cur is not None:
        if not cur.get("index_dir"):
            raise FileNotFoundError(f"publication {cur['publication']} has no index yet (run `fmpipe index date={cur['date']}`)")
        return paths.home / cur["index_dir"]
    pointer = paths.index / "CURRENT.json"
    if not pointer.exists():
        raise FileNotFoundError(f"no current index: neither {pubs.pointer_path(paths)} nor {pointer} exists "
                                "(run `fmpipe publish date=...`)")
    return partition(paths.index, parse_date(json.loads(pointer.read_text())["date"]))


def reconstruct(cpu_index: faiss.Index, i: int) -> np.ndarray:
    """Stored vector ``i`` of a CPU index of any of our types (IVF needs its direct map, built once)."""
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return cpu_index.reconstruct(i)


class TitleIndex:
    """A loaded title index: nearest titles of a title id, of a query vector, or by raw score."""

    def __init__(self, directory: Path, use_gpu: str = "auto"):
        self.directory = directory
        self.cpu_index = faiss.read_index(str(directory / INDEX_FILE))
        self.index = maybe_gpu(self.cpu_index, use_gpu)
        ip = directory / IP_FILE
        self.ip_index = maybe_gpu(faiss.read_index(str(ip)), use_gpu) if ip.exists() else None
        self.title_ids = pq.read_table(directory / IDS_FILE)["title_id"].to_pylist()
        self.meta = json.loads((directory / META_FILE).read_text())
        self.position = {t: i for i, t in enumerate(self.title_ids)}

    @classmethod
    def current(cls, paths: Paths) -> "TitleIndex":
        return cls(current_dir(paths))

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Cosine neighbours of each query vector."""
        scores, idx = self.index.search(normalise(np.atleast_2d(queries)), k)
        return [[(self.title_ids[i], float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(idx, scores)]

    def score(self, query: np.ndarray, k: int = 10, exclude: set[str] | frozenset = frozenset()) -> list[tuple[str, float]]:
        """Top ``k`` titles by the raw dot product query·title (the model's score), skipping ``exclude``."""
        if self.ip_index is None:
            raise FileNotFoundError(f"{self.directory} has no {IP_FILE} (built before raw-score indexes): re-run `fmpipe index`")
        q = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        fetch = min(len(self.title_ids), k + len(exclude))
        scores, idx = self.ip_index.search(q, fetch)
        out = [(self.title_ids[i], float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0 and self.title_ids[i] not in exclude]
        return out[:k]

    def similar_titles(self, title_id: str, k: int = 10) -> list[tuple[str, float]]:
        if title_id not in self.position:
            raise KeyError(f"title {title_id!r} is not in the index ({self.meta['date']}, {len(self.title_ids)} titles)")
        return self.search(reconstruct(self.cpu_index, self.position[title_id]), k)[0]


class ProfileIndex:
    """The day's "similar profiles" index (cosine over ``profile_layer``)."""

    def __init__(self, directory: Path, use_gpu: str = "auto"):
        self.cpu_index = faiss.read_index(str(directory / PROFILE_FILE))
        self.index = maybe_gpu(self.cpu_index, use_gpu)
        self.profile_ids = pq.read_table(directory / PROFILE_IDS_FILE)["profile_id"].to_pylist()
        self.meta = json.loads((directory / PROFILE_META_FILE).read_text())
        self.position = {p: i for i, p in enumerate(self.profile_ids)}

    @classmethod
    def current(cls, paths: Paths) -> "ProfileIndex":
        return cls(current_dir(paths))

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[int, float]]]:
        scores, idx = self.index.search(normalise(np.atleast_2d(queries)), k)
        return [[(self.profile_ids[i], float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(idx, scores)]

    def similar_profiles(self, profile_id: int, k: int = 10) -> list[tuple[int, float]]:
        if profile_id not in self.position:
            raise KeyError(f"profile {profile_id} is not in the profile index of {self.meta['date']}")
        return self.search(reconstruct(self.cpu_index, self.position[profile_id]), k)[0]


def main(argv: list[str] | None = None) -> dict:
    return run_cli(IndexConfig, run, __doc__, argv)
