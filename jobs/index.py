"""FAISS title index over the day's title embeddings, saved with its id map.

Vectors are L2-normalised and searched by inner product (cosine), so "titles like this title"
and profile -> title retrieval share one index. Exact ``IndexFlatIP`` below ``exact_below``
vectors; an IVF index trained on a sample above it, with recall@10 against exact search measured
at build time and stored with the index. Written aside, then swapped in as ``index/dt=D`` and made
current through ``index/CURRENT.json``. ``faiss-gpu`` is used automatically when installed and a
GPU is visible (``use_gpu=auto``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.io import atomic_write_json, atomic_write_table, partition, swap_dir, temp_sibling
from jobs.settings import Paths, parse_date, parse_overrides

INDEX_FILE, IDS_FILE, META_FILE = "titles.faiss", "title_ids.parquet", "index_meta.json"


@dataclass(frozen=True)
class IndexConfig:
    date: str = ""
    exact_below: int = 100_000
    nlist: int = 0                       # 0 = 4*sqrt(n)
    nprobe: int = 32
    train_sample: int = 100_000
    use_gpu: str = "auto"                # auto | yes | no
    seed: int = 0


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def build(vectors: np.ndarray, cfg: IndexConfig) -> tuple[faiss.Index, dict]:
    """Choose the index type by size and report recall@10 against exact search on a sample."""
    n, d = vectors.shape
    if n < cfg.exact_below:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, {"type": "Flat", "recall_at_10": 1.0}
    nlist = cfg.nlist or int(4 * np.sqrt(n))
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(cfg.seed)
    sample = vectors[rng.choice(n, size=min(n, max(cfg.train_sample, 40 * nlist)), replace=False)]
    index.train(sample)
    index.add(vectors)
    faiss.extract_index_ivf(index).nprobe = cfg.nprobe
    return index, {"type": f"IVF{nlist},Flat", "nprobe": cfg.nprobe, "recall_at_10": recall_at_10(index, vectors, rng)}


def recall_at_10(index: faiss.Index, vectors: np.ndarray, rng: np.random.Generator, queries: int = 1000) -> float:
    q = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(q, 10)
    _, got = index.search(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)]))


def maybe_gpu(index: faiss.Index, use_gpu: str) -> faiss.Index:
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu == "yes" and not has_gpu:
        raise RuntimeError("use_gpu=yes but faiss has no GPU support here (install the `gpu` extra on a CUDA host)")
    if has_gpu and use_gpu in ("auto", "yes"):
        return faiss.index_cpu_to_all_gpus(index)
    return index


def run(cfg: IndexConfig, paths: Paths) -> dict:
    day = parse_date(cfg.date)
    src = partition(paths.title_embeddings, day)
    table = pq.read_table(src, columns=["title_id", "title_embedding", "model_version"])
    vectors = normalise(np.stack(table["title_embedding"].to_numpy(zero_copy_only=False)))
    t0 = time.perf_counter()
    index, meta = build(vectors, cfg)
    meta.update({"date": day.isoformat(), "vectors": len(vectors), "dim": int(vectors.shape[1]),
                 "model_version": table["model_version"][0].as_py(), "build_s": round(time.perf_counter() - t0, 3),
                 "metric": "inner_product_on_l2_normalised"})
    final = partition(paths.index, day)
    tmp = temp_sibling(final)
    tmp.mkdir(parents=True)
    faiss.write_index(faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index, str(tmp / INDEX_FILE))
    atomic_write_table(table.select(["title_id"]), tmp / IDS_FILE)
    atomic_write_json(meta, tmp / META_FILE)
    swap_dir(tmp, final)
    atomic_write_json({"date": day.isoformat()}, paths.index / "CURRENT.json")
    return meta


class TitleIndex:
    """A loaded title index: nearest titles of a title id, or of any query vector."""

    def __init__(self, directory: Path, use_gpu: str = "auto"):
        self.index = maybe_gpu(faiss.read_index(str(directory / INDEX_FILE)), use_gpu)
        self.title_ids = pq.read_table(directory / IDS_FILE)["title_id"].to_pylist()
        self.meta = json.loads((directory / META_FILE).read_text())
        self.position = {t: i for i, t in enumerate(self.title_ids)}

    @classmethod
    def current(cls, paths: Paths) -> "TitleIndex":
        pointer = paths.index / "CURRENT.json"
        if not pointer.exists():
            raise FileNotFoundError(f"no current index: {pointer} missing (run `fmpipe index date=...`)")
        return cls(partition(paths.index, parse_date(json.loads(pointer.read_text())["date"])))

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        scores, idx = self.index.search(normalise(np.atleast_2d(queries)), k)
        return [[(self.title_ids[i], float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(idx, scores)]

    def similar_titles(self, title_id: str, k: int = 10) -> list[tuple[str, float]]:
        if title_id not in self.position:
            raise KeyError(f"title {title_id!r} is not in the index ({self.meta['date']}, {len(self.title_ids)} titles)")
        vec = self.index.reconstruct(self.position[title_id])
        return self.search(vec, k)[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of IndexConfig")
    out = run(parse_overrides(IndexConfig, ap.parse_args(argv).overrides), Paths.from_env())
    print(out)
    return out
