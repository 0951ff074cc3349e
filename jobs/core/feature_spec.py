"""The profile feature view's layer columns, derived from what the embed job wrote.

Why: ``feature_repo/definitions.py`` used to declare three fixed layer columns, so ``embed
layers=...`` with another selection, or a deeper model, either broke publish (a declared column
missing) or silently dropped the extra columns from Feast. Now publish records the day's layer
specification in ``$FMPIPE_HOME/feast/layers.json`` (:func:`record`) before applying, and
``definitions.py`` builds one ``Array(Float32)`` field per recorded layer (:func:`load`), the
dimension and model version in each field's description. The spec comes from the profile
partition's ``_manifest.json`` (``layers``, ``dims``) or, without one, from its Parquet columns
named ``emb_layer<N>_<pool>``. ``jobs.core.feast_store.apply_if_changed`` fingerprints this file, so a
change of layers re-applies the definitions.

Limits: a change of layers applies to the registry at the publish that brings it; entities carried
forward from earlier publications keep their old columns until they are active again, and the
offline ``published/`` tree mixes partitions of both layouts (query the new columns from the first
date that has them).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from jobs.core.io import atomic_write_json, partition
from jobs.core.settings import Paths

DEFAULT = {"layers": ["emb_layer1_last", "emb_layer2_last", "emb_layer2_mean"], "dims": {}, "model_version": None,
           "surfaces": {}, "heads": {}, "prompts": {}}
LAYER_RE = re.compile(r"^emb_layer(\d+)_(last|mean)$")
SURFACE_RE = re.compile(r"^emb_surface_[a-z0-9_]+$")     # per-surface profile vectors (fm.extract.surface_column)
HEAD_RE = re.compile(r"^head_[a-z0-9_]+$")               # class probabilities (fm.extract.head_column, prompt scores)
PROMPT_RE = re.compile(r"^emb_prompt_[a-z0-9_]+$")       # a soft prompt's view (fm.prompts.prompt_column)


def spec_path(home: Path) -> Path:
    return home / "feast" / "layers.json"


def from_partition(paths: Paths, day: dt.date) -> dict:
    """``{layers, dims, model_version}`` of ``day``'s profile partition (manifest, else Parquet columns)."""
    part = partition(paths.profile_embeddings, day)
    manifest = part / "_manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("layers"):
            return {"layers": list(m["layers"]), "dims": dict(m.get("dims") or {}), "model_version": m.get("model_version"),
                    "surfaces": dict(m.get("surfaces") or {}), "heads": dict(m.get("heads") or {}),
                    "prompts": dict(m.get("prompts") or {})}
    files = sorted(part.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no profile embeddings under {part} (run `fmpipe embed date={day}` first)")
    names = pq.read_schema(files[0]).names
    layers = [n for n in names if LAYER_RE.match(n)]
    if not layers:
        raise ValueError(f"{files[0]} has no layer column named emb_layer<N>_<last|mean>: nothing to publish")
    surfaces = {n.removeprefix("emb_surface_"): n for n in names if SURFACE_RE.match(n)}
    heads = {n.removeprefix("head_"): {"column": n, "classes": []} for n in names
             if HEAD_RE.match(n) and not n.startswith("head_prompt_")}
    prompts = {n.removeprefix("emb_prompt_"): {"column": n, "score": f"head_prompt_{n.removeprefix('emb_prompt_')}"}
               for n in names if PROMPT_RE.match(n)}
    return {"layers": layers, "dims": {}, "model_version": None, "surfaces": surfaces, "heads": heads, "prompts": prompts}


def record(paths: Paths, day: dt.date) -> bool:
    """Write ``day``'s layer spec for the definitions when it differs from the recorded one."""
    spec = from_partition(paths, day)
    path = spec_path(paths.home)
    try:
        if json.loads(path.read_text()) == spec:
            return False
    except (OSError, ValueError):
        pass
    atomic_write_json(spec, path)
    return True


def load(home: str | Path) -> dict:
    """The recorded spec under ``home``, or the default three layers before any publish."""
    try:
        spec = json.loads(spec_path(Path(home)).read_text())
    except (OSError, ValueError):
        return DEFAULT
    bad = [n for n in spec.get("layers", []) if not LAYER_RE.match(n)]
    bad += [c for c in (spec.get("surfaces") or {}).values() if not SURFACE_RE.match(c)]
    bad += [h.get("column") for h in (spec.get("heads") or {}).values() if not HEAD_RE.match(str(h.get("column")))]
    bad += [c for p in (spec.get("prompts") or {}).values() for c, rx in ((p.get("column"), PROMPT_RE),
                                                                           (p.get("score"), HEAD_RE))
            if not rx.match(str(c))]
    if bad or not spec.get("layers"):
        raise ValueError(f"{spec_path(Path(home))} lists no layers or bad names {bad}: re-run `fmpipe publish`")
    return spec


def deepest(layers: list[str]) -> list[str]:
    """The columns of the deepest layer recorded, 'last' first (the space titles are scored in)."""
    depth = max(int(LAYER_RE.match(n).group(1)) for n in layers)
    cols = [n for n in layers if int(LAYER_RE.match(n).group(1)) == depth]
    return sorted(cols, key=lambda n: not n.endswith("_last"))
