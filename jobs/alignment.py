"""Alignment of embedding spaces across model versions.

When the model version differs from the previous publication's, the new space is rotated onto the
published one (orthogonal low-rank alignment, :mod:`fm.align`; ``align=true``): dot products
profile·title are unchanged, coordinates of the same profile move as little as possible. Later
days of the same model reuse that rotation. The rotation (``_alignment.npz``) and the drift
figures are recorded with the publication.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fm.align import align as fit_alignment
from fm.align import splitmix64
from fm.extract import LayerSpec, ProfileEncoder, surface_column
from fm.stream import embed_batches, history_files, iter_history
from fm.model import FoundationModel
from jobs.core.checksum import ROW_GROUP, list_matrix
from jobs.core.io import partition
from jobs.core.settings import Paths

if TYPE_CHECKING:                       # jobs.embed imports this module: annotation only, no cycle
    from jobs.embed import EmbedConfig

ALIGNMENT_FILE = "_alignment.npz"


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
