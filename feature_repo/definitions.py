"""Feast declarations for the embeddings the daily pipeline publishes.

Reads Entity -> Source -> FeatureView -> FeatureService. The sources are the published dates of
the date-partitioned Parquet tables written by ``jobs/embed.py``: ``published/profile/dt=*/`` and
``published/title/dt=*/`` hold hard links to the partitions of every date that was published and
not rolled back (``jobs/published.py``), so ``get_historical_features`` never returns a day that
failed the gate or was withdrawn. Field names mirror those tables' columns. Vectors are ``Array(Float32)``, one field per layer.
"""
import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, String

# The pipeline's state root: $FMPIPE_HOME if set, else ../var relative to this repo folder.
_HOME = os.environ.get("FMPIPE_HOME") or "../var"
EMBEDDING_DIM_NOTE = "dimension = model d_model (64 by default); see the table's _manifest.json"

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
    schema=[
        Field(name="emb_layer1_last", dtype=Array(Float32),
              description=f"Layer 1 (middle) state at the last event. {EMBEDDING_DIM_NOTE}"),
        Field(name="emb_layer2_last", dtype=Array(Float32),
              description=f"Last layer state at the last event; dot with title_embedding scores titles. {EMBEDDING_DIM_NOTE}"),
        Field(name="emb_layer2_mean", dtype=Array(Float32),
              description=f"Last layer mean-pooled over the history window. {EMBEDDING_DIM_NOTE}"),
        Field(name="model_version", dtype=String, description="Checkpoint that produced the vectors."),
    ],
    source=profile_embeddings_source,
    online=True,
    tags={"producer": "jobs/embed.py", "owner": "fm-platform"},
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
    features=[profile_embeddings[["emb_layer2_last", "emb_layer2_mean", "model_version"]],
              title_embeddings[["title_embedding"]]],
    description="Inputs of the downstream ranker, version 1.",
)
retrieval_v1 = FeatureService(
    name="retrieval_v1",
    features=[profile_embeddings[["emb_layer2_last", "model_version"]]],
    description="Profile query vector for FAISS title retrieval.",
)
