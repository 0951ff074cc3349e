"""Batch inference: multi-layer profile embeddings and title embeddings for one date.

Streams the profiles active on day D (``history/dt=D`` rows with ``last_dt == D``, read row group
by row group) through the current model in token-budgeted, length-bucketed batches and writes one
Parquet row group per chunk of profiles, so memory stays flat in the number of profiles. Two
engines give the same table (up to float rounding): ``engine=local`` (this process, all cores) and
``engine=spark`` (``mapInArrow``; every task loads the checkpoint once, see :mod:`jobs.embed_spark`).
Every vocabulary title that exists on day D is embedded too, including titles new today
(content-only vectors); titles the catalogue releases later are not, so re-running an old date
after later ones writes the same title table as before (:func:`jobs.core.vocab.known_on`).

When the model version differs from the previous publication's, the new space is rotated onto the
published one (:mod:`jobs.alignment`).

Outputs are written aside and swapped in: ``embeddings/profile/dt=D``, ``embeddings/title/dt=D``,
each with a ``_manifest.json`` (model version, layers, dims, counts, source partition, alignment,
an order-independent checksum). Any failure (bad checkpoint, bad input, a crash mid-stream) removes
the staging directories: nothing partial is ever visible and the previous partition stays.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fm import checkpoint
from fm.checkpoint import CheckpointError
from fm.cold import add_titles
from fm.content import content_matrix
from fm.data import Sequences
from fm.extract import ProfileEncoder, head_column, parse_heads, parse_layers, title_embeddings
from fm.stream import embed_batches, history_files, iter_history, vector_array
from fm.model import FoundationModel
from fm.prompts import PromptViews, inference_encoder, prompt_column, prompt_score_column, prompt_states
from fm.schema import HEAD_CLASSES, N_SPECIAL, profile_embedding_schema, title_embedding_schema
from fm.fit import pick_device
from jobs.alignment import ALIGNMENT_FILE, layer_groups, plan_alignment, surface_manifest, surface_rotations
from jobs.core.checksum import CHECKSUM_ALGO, Checksum, table_checksum
from jobs.core.failpoints import failpoint
from jobs.core.io import atomic_write_json, partition, swap_dir, temp_sibling
from jobs.core.settings import run_cli, Paths, parse_date
from jobs.train import current_model_dir
from jobs.core.vocab import known_on, read_vocab, title_ids_by_idx

@dataclass(frozen=True)
class EmbedConfig:
    """Which date, which model, which layers, which engine. ``layers`` like '1:last,2:last,2:mean'
    ('' = default). ``heads``: side heads whose probabilities are published ('auto' = every head the
    model was trained with, 'none', or e.g. 'action,device'). ``prompts``: soft prompts of the model
    (``fmpipe prompt-tune``) whose views and task probabilities are published, e.g. 'buy,kids'."""
    date: str = ""
    model_version: str = ""
    layers: str = ""
    heads: str = "auto"
    prompts: str = ""
    engine: str = "local"                # local | spark
    batch_size: int = 0                  # at most this many profiles per forward batch ...
    batch_tokens: int = 0                # ... and padded tokens (0: the device's, fm.stream.BATCH_LIMITS)
    chunk_profiles: int = 4096           # profiles read, embedded and written per row group
    device: str = "auto"
    threads: int = 0                     # local engine: 0 = all cores
    spark_threads: int = 1               # torch threads per Spark task
    spark_partitions: int = 0            # spark engine: repartition the day's profiles (0 = as read)
    spark_device: str = "cpu"            # spark engine: cpu | cuda | auto (a task's GPU when its executor has one;
                                         # give tasks one with spark.task.resource.gpu.amount)
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
        add_titles(model, torch.from_numpy(content_matrix(encoder, new_ids, cat, cache=paths.content_cache)))
    return model.to(device), meta, n_trained


def load_for_inference(ckpt: str | Path, model_version: str, new_content: np.ndarray | None,
                       device: str | torch.device = "cpu") -> FoundationModel:
    """What a Spark task does: the checkpoint (already verified by the driver) + today's new titles."""
    model, _, meta = checkpoint.load(Path(ckpt), device="cpu")
    if meta.get("model_version") != model_version:
        raise CheckpointError(f"checkpoint {ckpt} now holds {meta.get('model_version')}, expected {model_version}")
    if new_content is not None and len(new_content):
        add_titles(model, torch.from_numpy(np.asarray(new_content, np.float32)))
    return model.to(device).eval()


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


def outputs_manifest(heads: tuple[str, ...], prompts: tuple[str, ...]) -> dict:
    """The manifest's description of the non-layer outputs: which column holds which head's
    probabilities over which classes, and which columns each prompt wrote."""
    out: dict = {}
    if heads:
        out["heads"] = {h: {"column": head_column(h), "classes": list(HEAD_CLASSES[h])} for h in heads}
    if prompts:
        out["prompts"] = {n: {"column": prompt_column(n), "score": prompt_score_column(n), "classes": ["no", "yes"]}
                          for n in prompts}
    return out


def parse_prompts(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def write_profiles_local(encoder: ProfileEncoder | PromptViews, source: Path, day: dt.date, out: Path, stamp: dt.datetime,
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
    if cfg.spark_device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"spark_device must be 'cpu', 'cuda' or 'auto', got {cfg.spark_device!r}")
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    ids = title_ids_by_idx(read_vocab(paths))
    model, meta, n_trained = load_model(paths, cfg, ids, device)        # CheckpointError: nothing written
    version = meta["model_version"]
    specs = parse_layers(cfg.layers, model.cfg.n_layers)
    heads, prompt_names = parse_heads(cfg.heads, model.cfg), parse_prompts(cfg.prompts)
    prompts = prompt_states(model, checkpoint_dir(paths, cfg), prompt_names, version)   # refused before writing
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
    if title_group in rotations:                    # a prompt's view is scored against titles, like a surface's
        col_rot.update({prompt_column(n): rotations[title_group] for n in prompt_names})
    encoder = inference_encoder(model, specs, surfaces, heads, prompts).to(device)
    names, dims = list(encoder.names), dict(zip(encoder.names, encoder.dims))
    if title_group in rotations:
        tv = tv @ rotations[title_group]

    prof_final, title_final = partition(paths.profile_embeddings, day), partition(paths.title_embeddings, day)
    prof_tmp, title_tmp = temp_sibling(prof_final), temp_sibling(title_final)
    try:
        title_tmp.mkdir(parents=True)
        if cfg.engine == "local":
            prof_tmp.mkdir(parents=True)
            n, checksum = write_profiles_local(encoder, source, day, prof_tmp, stamp, version, cfg, device, col_rot)
        else:
            from jobs.embed_spark import write_profiles_spark
            new_content = model.title.content[n_trained:].detach().cpu().numpy()
            write_profiles_spark(spark, source=source, day=day, ckpt=checkpoint_dir(paths, cfg), version=version,
                                 new_content=new_content, specs=specs, rotations=col_rot, out=prof_tmp,
                                 stamp=stamp, cfg=cfg, names=names, surfaces=surfaces, heads=heads,
                                 prompts={k: {t: v.numpy() for t, v in st.items()} for k, st in prompts.items()})
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
                           "dims": dims, **surface_manifest(surfaces), **outputs_manifest(heads, prompt_names),
                           "rows": n, "checksum": checksum, "checksum_columns": names,
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
            **outputs_manifest(heads, prompt_names),
            "dim": model.cfg.d_model,
            "device": str(device) if cfg.engine == "local" else f"spark tasks: {cfg.spark_device}", "engine": cfg.engine, "alignment": alignment.get("mode"),
            "seconds": round(elapsed, 3), "profiles_per_s": round(n / elapsed, 1) if elapsed > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(EmbedConfig, run, __doc__, argv)
