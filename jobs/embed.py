"""Batch inference: multi-layer profile embeddings and title embeddings for one date.

Streams the profiles active on day D (from ``history/dt=D``) through the current model in
length-bucketed batches, writes row groups as they are produced (memory stays flat in the number
of profiles), and embeds every vocabulary title, including titles new today (content only).
Outputs are written aside and swapped in: ``embeddings/profile/dt=D``, ``embeddings/title/dt=D``,
each with a ``_manifest.json`` (model version, layers, dims, counts, source partition, checksum).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from fm import checkpoint
from fm.content import content_matrix
from fm.data import Sequences
from fm.extract import LayerSpec, default_layers, profile_embeddings, title_embeddings
from fm.schema import N_SPECIAL, profile_embedding_schema, title_embedding_schema
from fm.train import pick_device
from jobs.io import atomic_write_json, partition, swap_dir, temp_sibling
from jobs.settings import Paths, parse_date, parse_overrides
from jobs.train import current_model_dir
from jobs.vocab import read_vocab, title_ids_by_idx

ROW_GROUP = 8192


@dataclass(frozen=True)
class EmbedConfig:
    """Which date, which model, which layers. ``layers`` like '1:last,2:last,2:mean' ('' = default)."""
    date: str = ""
    model_version: str = ""
    layers: str = ""
    batch_size: int = 256
    device: str = "auto"
    threads: int = 0                     # 0 = all cores


def published_at(day: dt.date) -> dt.datetime:
    """Features computed from day D's events are valid from the end of D (point-in-time joins)."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)


def active_profiles(paths: Paths, day: dt.date) -> Sequences:
    path = partition(paths.history, day)
    if not path.exists():
        raise FileNotFoundError(f"history state for {day} missing: {path} (run tokenize for {day} first)")
    return Sequences.read(path, filter_expr=pc.field("last_dt") == pa.scalar(day, pa.date32()))


def load_model(paths: Paths, cfg: EmbedConfig, ids: list[str | None], device: torch.device):
    ckpt = paths.models / cfg.model_version if cfg.model_version else current_model_dir(paths)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    model, encoder, meta = checkpoint.load(ckpt, expected_vocab=ids[N_SPECIAL:], device="cpu")
    n_trained = model.cfg.n_titles
    new_ids = ids[n_trained:]
    if new_ids:
        cat = pq.read_table(paths.catalogue)
        model.grow_titles(torch.from_numpy(content_matrix(encoder, new_ids, cat)))
    return model.to(device), meta, n_trained


def _write_profiles(model, seqs: Sequences, specs, cfg: EmbedConfig, out: Path, stamp: dt.datetime, version: str, device) -> tuple[int, str]:
    schema = profile_embedding_schema([s.name for s in specs])
    digest, n = hashlib.sha256(), 0
    buf: list[pa.RecordBatch] = []
    with pq.ParquetWriter(out / "part-0.parquet", schema) as writer, tqdm(total=len(seqs), desc="embed profiles", unit="profile") as bar:
        for pids, vecs in profile_embeddings(model, seqs, specs, cfg.batch_size, device):
            cols = {"profile_id": pa.array(pids, pa.int64()),
                    "event_timestamp": pa.array([stamp] * len(pids), pa.timestamp("us", tz="UTC")),
                    "model_version": pa.array([version] * len(pids), pa.string())}
            for name, v in vecs.items():
                digest.update(v.tobytes())
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(pa.list_(pa.float32()))
            buf.append(pa.RecordBatch.from_pydict(cols, schema=schema))
            n += len(pids)
            bar.update(len(pids))
            if sum(b.num_rows for b in buf) >= ROW_GROUP:
                writer.write_table(pa.Table.from_batches(buf).sort_by("profile_id"))
                buf = []
        if buf:
            writer.write_table(pa.Table.from_batches(buf).sort_by("profile_id"))
    return n, digest.hexdigest()[:16]


def run(cfg: EmbedConfig, paths: Paths) -> dict:
    day = parse_date(cfg.date)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    ids = title_ids_by_idx(read_vocab(paths))
    model, meta, n_trained = load_model(paths, cfg, ids, device)
    version = meta["model_version"]
    specs = tuple(LayerSpec.parse(x) for x in cfg.layers.split(",") if x) or default_layers(model.cfg.n_layers)
    seqs = active_profiles(paths, day)
    if len(seqs) == 0:
        raise ValueError(f"no profiles active on {day} in {partition(paths.history, day)}: nothing to embed")
    stamp = published_at(day)

    prof_final, title_final = partition(paths.profile_embeddings, day), partition(paths.title_embeddings, day)
    prof_tmp, title_tmp = temp_sibling(prof_final), temp_sibling(title_final)
    prof_tmp.mkdir(parents=True), title_tmp.mkdir(parents=True)
    n, checksum = _write_profiles(model, seqs, specs, cfg, prof_tmp, stamp, version, device)

    tv = title_embeddings(model)[N_SPECIAL:]
    titles = pa.table({
        "title_id": ids[N_SPECIAL:], "event_timestamp": [stamp] * len(tv), "model_version": [version] * len(tv),
        "is_new": np.arange(N_SPECIAL, N_SPECIAL + len(tv)) >= n_trained,
        "title_embedding": pa.FixedSizeListArray.from_arrays(pa.array(tv.reshape(-1)), tv.shape[1]).cast(pa.list_(pa.float32())),
    }, schema=title_embedding_schema())
    pq.write_table(titles, title_tmp / "part-0.parquet")
    common = {"date": day.isoformat(), "model_version": version, "dim": model.cfg.d_model,
              "source": str(partition(paths.history, day))}
    atomic_write_json({**common, "table": "profile", "layers": [s.name for s in specs], "rows": n,
                       "checksum": checksum}, prof_tmp / "_manifest.json")
    atomic_write_json({**common, "table": "title", "rows": len(tv), "new_titles": int(titles["is_new"].to_numpy().sum()),
                       "checksum": hashlib.sha256(tv.tobytes()).hexdigest()[:16]}, title_tmp / "_manifest.json")
    swap_dir(prof_tmp, prof_final)
    swap_dir(title_tmp, title_final)
    return {"date": day.isoformat(), "model_version": version, "profiles": n, "titles": len(tv),
            "new_titles": int(titles["is_new"].to_numpy().sum()), "layers": [s.name for s in specs],
            "dim": model.cfg.d_model, "device": str(device)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of EmbedConfig")
    out = run(parse_overrides(EmbedConfig, ap.parse_args(argv).overrides), Paths.from_env())
    print(out)
    return out
