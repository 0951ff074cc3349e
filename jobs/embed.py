"""Batch inference: multi-layer profile embeddings and title embeddings for one date.

Streams the profiles active on day D (``history/dt=D`` rows with ``last_dt == D``, read row group
by row group) through the current model in token-budgeted, length-bucketed batches and writes one
Parquet row group per chunk of profiles, so memory stays flat in the number of profiles. Two
engines give the same table (up to float rounding): ``engine=local`` (this process, all cores) and
``engine=spark`` (``mapInArrow``; every task loads the checkpoint once, see :mod:`jobs.embed_spark`).
Every vocabulary title that exists on day D is embedded too, including titles new today
(content-only vectors); titles the catalogue releases later are not, so re-running an old date
after later ones writes the same title table as before (:func:`jobs.vocab.known_on`).

When the model version differs from the previous publication's, the new space is rotated onto the
published one (orthogonal low-rank alignment, :mod:`fm.align`; ``align=true``): dot products
profile·title are unchanged, coordinates of the same profile move as little as possible. Later
days of the same model reuse that rotation. The rotation (``_alignment.npz``) and the drift
figures are recorded with the publication.

Outputs are written aside and swapped in: ``embeddings/profile/dt=D``, ``embeddings/title/dt=D``,
each with a ``_manifest.json`` (model version, layers, dims, counts, source partition, alignment,
an order-independent checksum). Any failure (bad checkpoint, bad input, a crash mid-stream) removes
the staging directories: nothing partial is ever visible and the previous partition stays.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fm import checkpoint
from fm.align import align as fit_alignment
from fm.align import splitmix64
from fm.checkpoint import CheckpointError
from fm.content import content_matrix
from fm.data import Sequences
from fm.extract import (LayerSpec, ProfileEncoder, default_layers, embed_batches, history_files,  # noqa: F401
                        iter_history, parse_layers, profile_embeddings, surface_column, title_embeddings,
                        vector_array)
from fm.model import FoundationModel
from fm.schema import N_SPECIAL, profile_embedding_schema, title_embedding_schema
from fm.fit import pick_device
from jobs.failpoints import failpoint
from jobs.io import atomic_write_json, partition, swap_dir, temp_sibling
from jobs.settings import run_cli, Paths, parse_date
from jobs.train import current_model_dir
from jobs.vocab import known_on, read_vocab, title_ids_by_idx

ROW_GROUP = 8192
ALIGNMENT_FILE = "_alignment.npz"
CHECKSUM_ALGO = "sum64(splitmix64(key) ^ poly64(float32 bits)) per row, order-independent"


@dataclass(frozen=True)
class EmbedConfig:
    """Which date, which model, which layers, which engine. ``layers`` like '1:last,2:last,2:mean'
    ('' = default)."""
    date: str = ""
    model_version: str = ""
    layers: str = ""
    engine: str = "local"                # local | spark
    batch_size: int = 256                # at most this many profiles per forward batch ...
    batch_tokens: int = 8192             # ... and at most this many padded tokens
    chunk_profiles: int = 4096           # profiles read, embedded and written per row group
    device: str = "auto"
    threads: int = 0                     # local engine: 0 = all cores
    spark_threads: int = 1               # torch threads per Spark task
    spark_partitions: int = 0            # spark engine: repartition the day's profiles (0 = as read)
    align: bool = True                   # rotate a new model's space onto the previous publication
    align_rank: int = 0                  # truncated-SVD rank (0 = smallest rank holding align_energy)
    align_energy: float = 0.99
    align_max_profiles: int = 50000      # shared profiles sampled to fit the rotation


def published_at(day: dt.date) -> dt.datetime:
    """Features computed from day D's events are valid from the end of D (point-in-time joins)."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)


def active_profiles(paths: Paths, day: dt.date) -> Sequences:
    """The day's active profiles, all in memory (tests and small tools; ``run`` streams instead)."""
    path = partition(paths.history, day)
    if not path.exists():
        raise FileNotFoundError(f"history state for {day} missing: {path} (run tokenize for {day} first)")
    batches = list(iter_history(path, day))
    if not batches:
        return Sequences.from_table(pa.Table.from_batches([], schema=_history_schema(path)))
    return Sequences.from_table(pa.Table.from_batches(batches))


def _history_schema(path: Path) -> pa.Schema:
    from fm.schema import TOKEN_FIELDS
    s = pq.read_schema(history_files(path)[0])
    return pa.schema([s.field(n) for n in ("profile_id", *TOKEN_FIELDS)])


def checkpoint_dir(paths: Paths, cfg: EmbedConfig) -> Path:
    return paths.models / cfg.model_version if cfg.model_version else current_model_dir(paths)


def load_model(paths: Paths, cfg: EmbedConfig, ids: list[str | None], device: torch.device):
    """The checkpoint, verified against today's vocabulary and grown to it: (model, meta, n_trained).

    Raises :class:`CheckpointError` for a missing checkpoint, a vocabulary mismatch or a corrupt
    tensor — before anything is written."""
    ckpt = checkpoint_dir(paths, cfg)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    model, encoder, meta = checkpoint.load(ckpt, expected_vocab=ids[N_SPECIAL:], device="cpu")
    n_trained = model.cfg.n_titles
    new_ids = ids[n_trained:]
    if new_ids:
        cat = pq.read_table(paths.catalogue)
        model.grow_titles(torch.from_numpy(content_matrix(encoder, new_ids, cat, cache=paths.content_cache)))
    return model.to(device), meta, n_trained


def load_for_inference(ckpt: str | Path, model_version: str, new_content: np.ndarray | None,
                       device: str | torch.device = "cpu") -> FoundationModel:
    """What a Spark task does: the checkpoint (already verified by the driver) + today's new titles."""
    model, _, meta = checkpoint.load(Path(ckpt), device="cpu")
    if meta.get("model_version") != model_version:
        raise CheckpointError(f"checkpoint {ckpt} now holds {meta.get('model_version')}, expected {model_version}")
    if new_content is not None and len(new_content):
        model.grow_titles(torch.from_numpy(np.asarray(new_content, np.float32)))
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------
# Checksums: deterministic, independent of row order and row-group layout
# ------------------------------------------------------------------------------------------------
def _poly(n_words: int, salt: int) -> np.ndarray:
    return splitmix64(np.arange(n_words, dtype=np.int64) + np.int64(salt * 1_000_003)) | np.uint64(1)


def list_matrix(col) -> np.ndarray:
    """list<float32> column (equal lengths) -> (N, D) float32."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)


def key_hashes(keys) -> np.ndarray:
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if pa.types.is_integer(arr.type):
        return splitmix64(arr.to_numpy(zero_copy_only=False).astype(np.int64))
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little")
                     for k in arr.to_pylist()], dtype=np.uint64)


class Checksum:
    """Sum (mod 2^64) of one 64-bit hash per row over the key and the exact float32 bits of every
    vector column: the same rows give the same checksum in any order and any file layout."""

    def __init__(self, key: str, columns: list[str]):
        self.key, self.columns, self.acc, self.rows = key, list(columns), np.uint64(0), 0

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        h = key_hashes(batch.column(self.key))
        with np.errstate(over="ignore"):
            for j, name in enumerate(self.columns):
                w = list_matrix(batch.column(name)).view(np.uint32).astype(np.uint64)
                h = splitmix64(h ^ (w * _poly(w.shape[1], j + 1)).sum(axis=1, dtype=np.uint64))
            self.acc = np.uint64((self.acc + h.sum(dtype=np.uint64)) & np.uint64(0xFFFFFFFFFFFFFFFF))
        self.rows += batch.num_rows

    def hexdigest(self) -> str:
        text = f"{self.key}|{','.join(self.columns)}|{self.rows}|{int(self.acc)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_checksum(directory: Path, key: str, columns: list[str]) -> tuple[int, str]:
    """Row count and checksum of a written partition, streamed back file by file."""
    c = Checksum(key, columns)
    for f in history_files(directory):
        for b in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP, columns=[key, *columns]):
            c.update(b)
    return c.rows, c.hexdigest()


# ------------------------------------------------------------------------------------------------
# Alignment across model versions
# ------------------------------------------------------------------------------------------------
def previous_publication(paths: Paths, day: dt.date) -> tuple[dt.date, dict] | None:
    """The latest profile partition strictly before ``day`` that has a manifest and that no rollback
    undid (:func:`jobs.rollback.alignment_reference`): a new day is never aligned to a bad day."""
    from jobs.rollback import alignment_reference
    d = alignment_reference(paths, day)
    if d is None:
        return None
    return d, json.loads((partition(paths.profile_embeddings, d) / "_manifest.json").read_text())


def layer_groups(specs: tuple[LayerSpec, ...]) -> dict[str, list[str]]:
    """Columns that share one rotation: all columns of one transformer layer."""
    out: dict[str, list[str]] = {}
    for s in specs:
        out.setdefault(f"layer{s.layer}", []).append(s.name)
    return out


def _shared_sample(paths: Paths, day: dt.date, prev_dir: Path, limit: int) -> np.ndarray:
    today = np.concatenate([b.column("profile_id").to_numpy() for b in
                            iter_history(partition(paths.history, day), day, columns=("profile_id",))] or [np.zeros(0, np.int64)])
    before = pq.read_table(prev_dir, columns=["profile_id"])["profile_id"].to_numpy()
    shared = np.intersect1d(today, before)
    if len(shared) > limit:                                  # deterministic sample by hash of the id
        shared = np.sort(shared[np.argsort(splitmix64(shared), kind="stable")[:limit]])
    return shared


def _old_vectors(prev_dir: Path, ids: np.ndarray, columns: list[str]) -> pa.Table:
    parts = []
    for f in history_files(prev_dir):
        have = [c for c in columns if c in pq.read_schema(f).names]
        for b in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP, columns=["profile_id", *have]):
            b = b.filter(pc.is_in(b.column("profile_id"), value_set=pa.array(ids)))
            if b.num_rows:
                parts.append(pa.Table.from_batches([b]))
    if not parts:
        return pa.table({"profile_id": pa.array([], pa.int64())})
    return pa.concat_tables(parts, promote_options="default").sort_by("profile_id")


def plan_alignment(paths: Paths, day: dt.date, cfg: EmbedConfig, version: str, model: FoundationModel,
                   specs: tuple[LayerSpec, ...], titles: np.ndarray, title_ids: list[str],
                   device: torch.device) -> tuple[dict[str, np.ndarray], dict]:
    """Rotations {group: (D, D)} to apply today, and the manifest record explaining them."""
    prev = previous_publication(paths, day)
    groups = layer_groups(specs)
    title_group = f"layer{model.cfg.n_layers}"
    if prev is None:
        return {}, {"mode": "none", "reason": "no earlier publication", "space": version}
    prev_day, prev_manifest = prev
    prev_dir = partition(paths.profile_embeddings, prev_day)
    prev_align = prev_manifest.get("alignment") or {}
    reference = {"date": prev_day.isoformat(), "model_version": prev_manifest.get("model_version")}
    space = prev_align.get("space") or prev_manifest.get("model_version")
    if prev_manifest.get("model_version") == version:
        if prev_align.get("mode") in ("fitted", "carried") and (prev_dir / ALIGNMENT_FILE).exists():
            with np.load(prev_dir / ALIGNMENT_FILE) as z:
                rot = {g: z[g] for g in z.files if g in {*groups, title_group}}
            return rot, {"mode": "carried", "reference": reference, "fitted": prev_align.get("fitted", reference),
                         "groups": {g: v for g, v in prev_align.get("groups", {}).items() if g in rot},
                         "space": space}
        return {}, {"mode": "none", "reason": "same model version as the previous publication, which was not rotated",
                    "reference": reference, "space": prev_align.get("space", version)}
    if not cfg.align:
        return {}, {"mode": "disabled", "reason": "align=false", "reference": reference, "space": version}

    t0 = time.perf_counter()
    sample = _shared_sample(paths, day, prev_dir, cfg.align_max_profiles)
    fit_cols = {g: (f"emb_layer{g[5:]}_last" if f"emb_layer{g[5:]}_last" in cols else cols[0]) for g, cols in groups.items()}
    old = _old_vectors(prev_dir, sample, sorted(set(fit_cols.values())))
    sample = old["profile_id"].to_numpy()
    new_vecs: dict[str, np.ndarray] = {}
    if len(sample):
        encoder = ProfileEncoder(model, tuple(s for s in specs if s.name in fit_cols.values())).to(device)
        got = list(embed_batches(encoder, iter_history(partition(paths.history, day), day, ids=sample),
                                 batch_tokens=cfg.batch_tokens, max_batch=cfg.batch_size, device=device))
        new = pa.Table.from_batches(got).sort_by("profile_id")
        if not np.array_equal(new["profile_id"].to_numpy(), sample):
            raise RuntimeError(f"alignment sample: re-embedded {new.num_rows} of {len(sample)} shared profiles")
        new_vecs = {c: list_matrix(new[c]) for c in encoder.names}
    old_titles = None
    prev_titles_dir = partition(paths.title_embeddings, prev_day)
    if prev_titles_dir.exists():
        t = pq.read_table(prev_titles_dir, columns=["title_id", "title_embedding"])
        pos = {k: i for i, k in enumerate(title_ids)}
        keep = [(pos[k], i) for i, k in enumerate(t["title_id"].to_pylist()) if k in pos]
        if keep:
            old_titles = (np.array([a for a, _ in keep]), list_matrix(t["title_embedding"])[[b for _, b in keep]])

    rotations, record = {}, {}
    todo = dict(groups)
    todo.setdefault(title_group, [])
    for g, cols in todo.items():
        col = fit_cols.get(g)
        have_profiles = col is not None and col in old.column_names and len(sample) > 0
        t_new = t_old = None
        if g == title_group and old_titles is not None:
            t_new, t_old = titles[old_titles[0]], old_titles[1]
        if not have_profiles and t_new is None:
            record[g] = {"columns": cols, "skipped": "no column or title shared with the previous publication"}
            continue
        p_new = new_vecs[col] if have_profiles else np.zeros((0, titles.shape[1]), np.float32)
        p_old = list_matrix(old[col]) if have_profiles else np.zeros((0, t_old.shape[1] if t_old is not None else 0), np.float32)
        d_old = (p_old if have_profiles else t_old).shape[1]
        if d_old > model.cfg.d_model:
            record[g] = {"columns": cols, "skipped": f"model narrower ({model.cfg.d_model}) than the published space ({d_old})"}
            continue
        if not have_profiles:       # titles only: evaluate drift on the titles themselves
            r, rep = fit_alignment(t_new, t_old, np.arange(len(t_new)), rank=cfg.align_rank, energy=cfg.align_energy)
        else:
            r, rep = fit_alignment(p_new, p_old, sample, t_new, t_old, rank=cfg.align_rank, energy=cfg.align_energy)
        rotations[g] = r
        record[g] = {"columns": cols, "fit_column": col if have_profiles else None, "titles": g == title_group,
                     "report": rep.to_dict()}
    info = {"mode": "fitted" if rotations else "skipped", "reference": reference, "groups": record,
            "shared_profiles_sampled": int(len(sample)), "fit_seconds": round(time.perf_counter() - t0, 3),
            "space": space if rotations else version}
    if rotations:
        info["fitted"] = {"date": day.isoformat(), "model_version": version, "reference": reference}
    return rotations, info


def surface_rotations(surfaces: tuple[str, ...], title_rotation: np.ndarray | None) -> dict[str, np.ndarray]:
    """Surface columns turn with the titles' rotation: a surface vector is a last-layer state plus
    a query in the title space, so rotating it like the titles keeps every surface score."""
    if title_rotation is None:
        return {}
    return {surface_column(x): title_rotation for x in surfaces}


def surface_manifest(surfaces: tuple[str, ...]) -> dict:
    """The manifest's surface record ({surface: column}); nothing for a model without surfaces, so
    its manifest stays as before. Surface columns are listed in ``dims`` too but not in ``layers``
    (which holds transformer-layer columns ``emb_layer<N>_<pool>`` only, as export and the Feast
    spec parse it)."""
    return {"surfaces": {x: surface_column(x) for x in surfaces}} if surfaces else {}


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _with_stamp(batch: pa.RecordBatch, schema: pa.Schema, stamp: dt.datetime, version: str) -> pa.RecordBatch:
    n = batch.num_rows
    cols = {"profile_id": batch.column("profile_id"),
            "event_timestamp": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "model_version": pa.array([version] * n, pa.string())}
    return pa.RecordBatch.from_arrays([cols[f.name] if f.name in cols else batch.column(f.name) for f in schema],
                                      schema=schema)


def write_profiles_local(encoder: ProfileEncoder, source: Path, day: dt.date, out: Path, stamp: dt.datetime,
                         version: str, cfg: EmbedConfig, device: torch.device,
                         rotations: dict[str, np.ndarray]) -> tuple[int, str]:
    """Stream history row groups in, one Parquet row group per chunk out; (rows, checksum)."""
    schema = profile_embedding_schema(encoder.names)
    check = Checksum("profile_id", encoder.names)
    with pq.ParquetWriter(out / "part-0.parquet", schema) as writer:
        for rb in embed_batches(encoder, iter_history(source, day), chunk_profiles=cfg.chunk_profiles,
                                batch_tokens=cfg.batch_tokens, max_batch=cfg.batch_size, device=device,
                                rotations=rotations):
            writer.write_batch(_with_stamp(rb, schema, stamp, version))
            check.update(rb)
    return check.rows, check.hexdigest()


def _title_table(title_ids: list, idx: np.ndarray, tv: np.ndarray, n_trained: int, stamp: dt.datetime,
                 version: str) -> pa.Table:
    """One row per title (vocabulary ids ``idx``); ``is_new``: never seen in training (content-only)."""
    return pa.table({
        "title_id": title_ids, "event_timestamp": [stamp] * len(tv), "model_version": [version] * len(tv),
        "is_new": idx >= n_trained,
        "title_embedding": vector_array(tv),
    }, schema=title_embedding_schema())


def run(cfg: EmbedConfig, paths: Paths, spark=None) -> dict:
    t0 = time.perf_counter()
    day = parse_date(cfg.date)
    if cfg.engine not in ("local", "spark"):
        raise ValueError(f"engine must be 'local' or 'spark', got {cfg.engine!r}")
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    ids = title_ids_by_idx(read_vocab(paths))
    model, meta, n_trained = load_model(paths, cfg, ids, device)        # CheckpointError: nothing written
    version = meta["model_version"]
    specs = parse_layers(cfg.layers, model.cfg.n_layers)
    source = partition(paths.history, day)
    if not source.exists() or not history_files(source):
        raise FileNotFoundError(f"history state for {day} missing: {source} (run tokenize for {day} first)")
    stamp = published_at(day)

    known = np.flatnonzero(known_on(paths, ids[N_SPECIAL:], day))     # not titles released after the day
    tv = title_embeddings(model)[N_SPECIAL:][known]
    title_ids = [ids[N_SPECIAL + i] for i in known]
    rotations, alignment = plan_alignment(paths, day, cfg, version, model, specs, tv, title_ids, device)
    col_rot = {c: rotations[g] for g, cols in layer_groups(specs).items() if g in rotations for c in cols}
    title_group = f"layer{model.cfg.n_layers}"
    surfaces = tuple(model.cfg.surfaces)
    col_rot.update(surface_rotations(surfaces, rotations.get(title_group)))
    names = [s.name for s in specs] + [surface_column(x) for x in surfaces]
    if title_group in rotations:
        tv = tv @ rotations[title_group]

    prof_final, title_final = partition(paths.profile_embeddings, day), partition(paths.title_embeddings, day)
    prof_tmp, title_tmp = temp_sibling(prof_final), temp_sibling(title_final)
    try:
        title_tmp.mkdir(parents=True)
        if cfg.engine == "local":
            prof_tmp.mkdir(parents=True)
            encoder = ProfileEncoder(model, specs, surfaces).to(device)
            n, checksum = write_profiles_local(encoder, source, day, prof_tmp, stamp, version, cfg, device, col_rot)
        else:
            from jobs.embed_spark import write_profiles_spark
            new_content = model.title.content[n_trained:].detach().cpu().numpy()
            write_profiles_spark(spark, source=source, day=day, ckpt=checkpoint_dir(paths, cfg), version=version,
                                 new_content=new_content, specs=specs, rotations=col_rot, out=prof_tmp,
                                 stamp=stamp, cfg=cfg, surfaces=surfaces)
            n, checksum = table_checksum(prof_tmp, "profile_id", names)
        if n == 0:
            raise ValueError(f"no profiles active on {day} in {source}: nothing to embed")

        titles = _title_table(title_ids, known + N_SPECIAL, tv, n_trained, stamp, version)
        pq.write_table(titles, title_tmp / "part-0.parquet")
        tcheck = Checksum("title_id", ["title_embedding"])
        tcheck.update(titles)
        n_new = int(titles["is_new"].to_numpy().sum())
        align_file = {}
        if rotations:
            np.savez(prof_tmp / ALIGNMENT_FILE, **rotations)
            if title_group in rotations:
                np.savez(title_tmp / ALIGNMENT_FILE, **{title_group: rotations[title_group]})
            align_file = {"file": ALIGNMENT_FILE,
                          "sha256": hashlib.sha256((prof_tmp / ALIGNMENT_FILE).read_bytes()).hexdigest()[:16]}
        common = {"date": day.isoformat(), "model_version": version, "dim": model.cfg.d_model,
                  "source": str(source), "checksum_algo": CHECKSUM_ALGO,
                  "alignment": {**alignment, **align_file}, "space": alignment.get("space", version)}
        atomic_write_json({**common, "table": "profile", "layers": [s.name for s in specs],
                           "dims": {c: model.cfg.d_model for c in names}, **surface_manifest(surfaces),
                           "rows": n, "checksum": checksum,
                           "engine": cfg.engine, "model_config": model.cfg.to_dict()}, prof_tmp / "_manifest.json")
        title_align = {k: v for k, v in common["alignment"].items() if k != "groups"}
        if title_group in alignment.get("groups", {}):
            title_align["group"] = {title_group: alignment["groups"][title_group]}
        atomic_write_json({**common, "alignment": title_align, "table": "title", "rows": len(tv), "new_titles": n_new,
                           "checksum": tcheck.hexdigest()}, title_tmp / "_manifest.json")
        swap_dir(prof_tmp, prof_final)
        failpoint("embed.profiles_committed")          # profile table in place, title table not yet
        swap_dir(title_tmp, title_final)
        failpoint("embed.committed")                   # both tables in place, step record not yet written
    except BaseException:
        shutil.rmtree(prof_tmp, ignore_errors=True)
        shutil.rmtree(title_tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - t0
    return {"date": day.isoformat(), "model_version": version, "profiles": n, "titles": len(tv),
            "new_titles": n_new, "layers": [s.name for s in specs], **surface_manifest(surfaces),
            "dim": model.cfg.d_model,
            "device": str(device), "engine": cfg.engine, "alignment": alignment.get("mode"),
            "seconds": round(elapsed, 3), "profiles_per_s": round(n / elapsed, 1) if elapsed > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(EmbedConfig, run, __doc__, argv)
