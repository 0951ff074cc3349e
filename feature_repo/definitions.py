"""Feast declarations for the embeddings the daily pipeline publishes.

Reads Entity -> Source -> FeatureView -> FeatureService. The sources are the published dates of
the date-partitioned Parquet tables written by ``jobs/embed.py``: ``published/profile/dt=*/`` and
``published/title/dt=*/`` hold hard links to the partitions of every date that was published and
not rolled back (``jobs/core/published.py``), so ``get_historical_features`` never returns a day that
failed the gate or was withdrawn. Field names mirror those tables' columns. Vectors are
``Array(Float32)``, one field per layer the embed job wrote (recorded by publish in
``feast/layers.json``, see ``jobs/core/feature_spec.py``); the services use the deepest layer's columns.
"""
import json
import os
import re
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, String

# The pipeline's state root: $FMPIPE_HOME if set, else ../var relative to this repo folder.
_HOME = os.environ.get("FMPIPE_HOME") or "../var"
EMBEDDING_DIM_NOTE = "dimension = model d_model (64 by default); see the table's _manifest.json"

# The profile layer columns follow what the embed job wrote: publish records the day's layers in
# $FMPIPE_HOME/feast/layers.json (jobs/core/feature_spec.py); before any publish, the default three.
_LAYER_RE = re.compile(r"^emb_layer(\d+)_(last|mean)$")
try:
    with open(f"{_HOME}/feast/layers.json") as _f:
        _SPEC = json.load(_f)
except (OSError, ValueError):
    _SPEC = {"layers": ["emb_layer1_last", "emb_layer2_last", "emb_layer2_mean"], "dims": {}}
_LAYERS = [n for n in _SPEC.get("layers", []) if _LAYER_RE.match(n)]
if not _LAYERS or len(_LAYERS) != len(_SPEC.get("layers", [])):
    raise ValueError(f"{_HOME}/feast/layers.json must list layer columns named emb_layer<N>_<last|mean>, "
                     f"not {_SPEC.get('layers')}: re-run `fmpipe publish`")
# per-surface profile vectors of a model trained with surfaces=... ("what next on this canvas")
_SURFACES = {k: v for k, v in (_SPEC.get("surfaces") or {}).items() if re.match(r"^emb_surface_[a-z0-9_]+$", v)}
# side heads' class probabilities and soft prompts' views / task probabilities (fm.prompts)
_HEADS = {k: v for k, v in (_SPEC.get("heads") or {}).items() if re.match(r"^head_[a-z0-9_]+$", v.get("column", ""))}
_PROMPTS = {k: v for k, v in (_SPEC.get("prompts") or {}).items()
            if re.match(r"^emb_prompt_[a-z0-9_]+$", v.get("column", "")) and re.match(r"^head_prompt_[a-z0-9_]+$", v.get("score", ""))}
_DEPTH = max(int(_LAYER_RE.match(n).group(1)) for n in _LAYERS)
_DEEPEST = sorted((n for n in _LAYERS if n.startswith(f"emb_layer{_DEPTH}_")), key=lambda n: not n.endswith("_last"))


def _layer_description(name: str) -> str:
    """What a layer column is, its dimension and the model that produced it (from the spec)."""
    layer, pool = _LAYER_RE.match(name).groups()
    where = "last layer" if int(layer) == _DEPTH else f"layer {layer}"
    what = "state at the last event" if pool == "last" else "mean-pooled over the history window"
    scores = "; dot with title_embedding scores titles" if name == f"emb_layer{_DEPTH}_last" else ""
    dim = (_SPEC.get("dims") or {}).get(name)
    return (f"{where.capitalize()} {what}{scores}. " + (f"dimension = {dim}" if dim else EMBEDDING_DIM_NOTE)
            + (f"; model {_SPEC['model_version']}" if _SPEC.get("model_version") else ""))

profile = Entity(name="profile", join_keys=["profile_id"], value_type=ValueType.INT64,
                 description="A viewing profile (one person on an account).")
title = Entity(name="title", join_keys=["title_id"], value_type=ValueType.STRING,
               description="A catalogue title: movie, show, game or live event.")

profile_embeddings_source = FileSource(
    name="profile_embeddings_source",
    path=f"{_HOME}/published/profile",
    timestamp_field="event_timestamp",
    description="Published daily profile embeddings from the foundation model, partitioned by dt.",
)
title_embeddings_source = FileSource(
    name="title_embeddings_source",
    path=f"{_HOME}/published/title",
    timestamp_field="event_timestamp",
    description="Published daily title embeddings (ID + content; content-only for titles new since training).",
)

profile_embeddings = FeatureView(
    name="profile_embeddings",
    entities=[profile],
    ttl=timedelta(days=30),
    schema=[Field(name=name, dtype=Array(Float32), description=_layer_description(name)) for name in _LAYERS]
    + [Field(name=col, dtype=Array(Float32),
             description=f"Last-layer state plus the '{s}' surface query: what next on the {s} canvas; dot with "
                         f"title_embedding ranks titles for that surface.") for s, col in sorted(_SURFACES.items())]
    + [Field(name=h["column"], dtype=Array(Float32),
             description=f"Probabilities of the profile's next {name} predicted by the model's {name} head, in "
                         f"this class order: {', '.join(h.get('classes') or []) or 'see the manifest'}.")
       for name, h in sorted(_HEADS.items())]
    + [f for name, p in sorted(_PROMPTS.items()) for f in (
        Field(name=p["column"], dtype=Array(Float32),
              description=f"Last-layer state under the '{name}' soft prompt: the '{name}' task's view of the "
                          f"profile; dot with title_embedding ranks titles for it."),
        Field(name=p["score"], dtype=Array(Float32),
              description=f"The '{name}' task's probabilities [no, yes] from its prompt and readout."))]
    + [Field(name="model_version", dtype=String, description="Checkpoint that produced the vectors.")],
    source=profile_embeddings_source,
    online=True,
    tags={"producer": "jobs/embed.py", "owner": "fm-platform", "model_version": str(_SPEC.get("model_version") or ""),
          "layers": ",".join(_LAYERS)},
)

title_embeddings = FeatureView(
    name="title_embeddings",
    entities=[title],
    ttl=timedelta(days=30),
    schema=[
        Field(name="title_embedding", dtype=Array(Float32),
              description=f"Title vector in the last layer's space. {EMBEDDING_DIM_NOTE}"),
        Field(name="is_new", dtype=Bool, description="Title unseen in training: content-only vector."),
        Field(name="model_version", dtype=String, description="Checkpoint that produced the vectors."),
    ],
    source=title_embeddings_source,
    online=True,
    tags={"producer": "jobs/embed.py", "owner": "fm-platform"},
)

ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[profile_embeddings[_DEEPEST + ["model_version"]],
              title_embeddings[["title_embedding"]]],
    description="Inputs of the downstream ranker, version 1.",
)
ranker_v2 = FeatureService(
    name="ranker_v2",
    features=[profile_embeddings[_DEEPEST + [h["column"] for _, h in sorted(_HEADS.items())] + ["model_version"]],
              title_embeddings[["title_embedding"]]],
    description="Version 1 plus the side heads' next-action / duration / device probabilities (when published), "
                "so a ranker uses the model's predictions without running it.",
)
retrieval_v1 = FeatureService(
    name="retrieval_v1",
    features=[profile_embeddings[_DEEPEST[:1] + ["model_version"]]],
    description="Profile query vector for FAISS title retrieval.",
)

# The same inputs as ranker_v2 under the name of the model that produced what is being published
# (ranker_<model version>). The *_v1/_v2 services above are stable aliases that follow whichever
# model serves; a consumer that must never mix embedding spaces without noticing asks for the
# pinned name instead, and gets an error (the service is gone) rather than a new model's vectors
# once another model's publication is applied.
_VERSION = str(_SPEC.get("model_version") or "")
if _VERSION:
    ranker_pinned = FeatureService(
        name="ranker_" + re.sub(r"[^a-z0-9_]", "_", _VERSION.lower()),
        features=[profile_embeddings[_DEEPEST + [h["column"] for _, h in sorted(_HEADS.items())] + ["model_version"]],
                  title_embeddings[["title_embedding"]]],
        description=f"ranker_v2 pinned to model {_VERSION}: removed when another model's publication is applied.",
        tags={"model_version": _VERSION},
    )
