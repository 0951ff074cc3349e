"""One place that defines every table the pipeline reads or writes.

The raw event log, the title catalogue, the daily token table, the per-profile history state and
the embedding tables are pyarrow schemas here. Spark jobs convert them with
``pyspark.sql.pandas.types.from_arrow_schema``; torch code reads the same column names through
:data:`TOKEN_FIELDS`; tests build fixtures from them. Change a field here and every layer sees it.

Categorical vocabularies that are closed sets (actions, devices, canvases) are declared here too.
Index 0 is padding and index 1 is the out-of-vocabulary id in every vocabulary, so a value the
pipeline has never seen maps to OOV instead of corrupting a neighbouring id.
"""
from __future__ import annotations

import math

import pyarrow as pa

SCHEMA_VERSION = 1
PAD, OOV = 0, 1
N_SPECIAL = 2

ACTIONS: tuple[str, ...] = (
    "impression", "play", "pause", "complete", "add_to_list", "thumbs_up", "thumbs_down", "search",
)
DEVICES: tuple[str, ...] = ("tv", "mobile", "web", "tablet", "console")
CANVASES: tuple[str, ...] = (
    "home", "search", "kids", "more_like_this", "continue_watching", "my_list", "trending", "genre_row",
)
LOCALES: tuple[str, ...] = ("en-US", "en-GB", "es-ES", "es-MX", "fr-FR", "de-DE", "pt-BR", "ja-JP", "ko-KR", "hi-IN")
# How strongly an action expresses intent; adjacent actions on one title merge into the strongest.
ACTION_STRENGTH: dict[str, int] = {
    "impression": 0, "search": 0, "pause": 1, "play": 2, "complete": 3, "add_to_list": 4,
    "thumbs_down": 5, "thumbs_up": 6,
}
SESSION_GAP_S = 30 * 60                 # a pause longer than this starts a new session
TITLE_KINDS: tuple[str, ...] = ("movie", "show", "game", "live")

# Bucket edges. Durations: fraction of runtime when the runtime is known, else log2 seconds.
DURATION_FRACTION_BUCKETS = 10          # ids N_SPECIAL .. N_SPECIAL+10 (0%, (0,10%], ..., (90%,100%+])
DURATION_LOG_BUCKETS = 16               # log2(seconds) buckets after the fraction buckets
N_DURATION = N_SPECIAL + 1 + DURATION_FRACTION_BUCKETS + DURATION_LOG_BUCKETS
N_GAP = N_SPECIAL + 24                  # log2(seconds since previous event), capped
N_ROW = N_SPECIAL + 8                   # row position buckets: 0,1,2,3,4-5,6-9,10-19,20+
N_HOUR = N_SPECIAL + 24
N_DOW = N_SPECIAL + 7
NO_DURATION = N_SPECIAL                 # the event carried no duration (impressions, clicks)
DURATION_LABELS: tuple[str, ...] = (
    ("none",) + tuple(f"{10 * i}-{10 * (i + 1)}%" for i in range(DURATION_FRACTION_BUCKETS))
    + tuple(f"2^{i}s" for i in range(DURATION_LOG_BUCKETS)))        # ids NO_DURATION .. N_DURATION-1
# The side heads' classes in id order after PAD/OOV: what a published ``head_<name>`` probability
# vector's positions mean (fm.extract.ProfileEncoder, feature_repo/definitions.py).
HEAD_CLASSES: dict[str, tuple[str, ...]] = {"action": ACTIONS, "duration": DURATION_LABELS, "device": DEVICES}


def vocab_index(values: tuple[str, ...]) -> dict[str, int]:
    """Map each value of a closed vocabulary to its id (after PAD and OOV)."""
    return {v: i + N_SPECIAL for i, v in enumerate(values)}


def vocab_size(values: tuple[str, ...]) -> int:
    return len(values) + N_SPECIAL


def duration_bucket(duration_s: float | None, runtime_s: float | None) -> int:
    """Reference (pure Python) bucketing of a watch duration; Spark implements the same formula.

    Kept here so tests can compare the Spark column expression to it value by value.
    """
    if duration_s is None or duration_s <= 0:
        return NO_DURATION
    if runtime_s is not None and runtime_s > 0:
        frac = min(duration_s / runtime_s, 1.0)
        return NO_DURATION + 1 + min(int(math.ceil(frac * DURATION_FRACTION_BUCKETS)) - 1, DURATION_FRACTION_BUCKETS - 1)
    log_b = min(int(math.log2(max(duration_s, 1.0))), DURATION_LOG_BUCKETS - 1)
    return NO_DURATION + 1 + DURATION_FRACTION_BUCKETS + log_b


def gap_bucket(gap_s: float | None) -> int:
    """log2 bucket of the seconds since the profile's previous event; OOV for the first event."""
    if gap_s is None:
        return OOV
    return N_SPECIAL + min(int(math.log2(max(gap_s, 1.0))), N_GAP - N_SPECIAL - 1)


ROW_EDGES = (0, 1, 2, 3, 4, 6, 10, 20)


def row_bucket(row_position: int | None) -> int:
    if row_position is None or row_position < 0:
        return OOV
    return N_SPECIAL + sum(1 for e in ROW_EDGES[1:] if row_position >= e)


# ---------------------------------------------------------------------------------------------
# Raw inputs
# ---------------------------------------------------------------------------------------------
RAW_EVENT_SCHEMA = pa.schema([
    pa.field("event_id", pa.string()),
    pa.field("profile_id", pa.int64()),           # null = malformed (quarantined)
    pa.field("ts", pa.string()),                  # ISO-8601 UTC as sent by clients; parsed by tokenize
    pa.field("title_id", pa.string()),
    pa.field("action", pa.string()),
    pa.field("duration_s", pa.float64()),         # nullable: only watch actions carry it
    pa.field("device", pa.string()),
    pa.field("canvas", pa.string()),
    pa.field("row_position", pa.int32()),
    pa.field("locale", pa.string()),
    # The order the event arrived in (source row / client sequence number). Ties in ``ts`` keep this
    # order everywhere -- tokens, history, training and evaluation -- so "the last two events" of a
    # profile are the same events in every step (MovieLens has 53% equal timestamps per user).
    pa.field("seq", pa.int64()),
])

CATALOGUE_SCHEMA = pa.schema([
    pa.field("title_id", pa.string(), nullable=False),
    pa.field("name", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("genres", pa.list_(pa.string())),
    pa.field("release_date", pa.date32()),
    pa.field("synopsis", pa.string()),
    pa.field("runtime_s", pa.int32()),            # nullable: unknown runtime -> log-bucketed durations
])

# ---------------------------------------------------------------------------------------------
# Tokens: one token per event; every field an integer id into its vocabulary.
# ---------------------------------------------------------------------------------------------
TOKEN_FIELDS: tuple[str, ...] = (
    "title", "action", "duration", "device", "canvas", "locale", "row", "hour", "dow", "gap",
)
TOKEN_SCHEMA = pa.schema(
    [pa.field("profile_id", pa.int64(), nullable=False), pa.field("event_id", pa.string()),
     pa.field("ts", pa.timestamp("us", tz="UTC")), pa.field("seq", pa.int64())]
    + [pa.field(f, pa.int32()) for f in TOKEN_FIELDS]
    + [pa.field("n_events", pa.int32())]          # raw events merged into this token
)

# History state after day D: the last N tokens per profile, oldest first (by ts, then seq), one array per field.
HISTORY_SCHEMA = pa.schema(
    [pa.field("profile_id", pa.int64(), nullable=False), pa.field("last_dt", pa.date32()),
     pa.field("n_tokens", pa.int32()), pa.field("ts", pa.list_(pa.timestamp("us", tz="UTC"))),
     pa.field("seq", pa.list_(pa.int64()))]
    + [pa.field(f, pa.list_(pa.int32())) for f in TOKEN_FIELDS]
)

TITLE_VOCAB_SCHEMA = pa.schema([
    pa.field("title_id", pa.string(), nullable=False),
    pa.field("idx", pa.int32(), nullable=False),
    pa.field("first_dt", pa.date32()),
])

QUARANTINE_REASONS: tuple[str, ...] = (
    "missing_event_id", "missing_profile_id", "unparseable_ts", "future_ts", "unknown_action",
    "missing_title_id", "unknown_title", "negative_duration",
)


def profile_embedding_schema(layer_names: list[str]) -> pa.Schema:
    """Profile embedding table: one float32 array column per extracted layer."""
    return pa.schema(
        [pa.field("profile_id", pa.int64(), nullable=False),
         pa.field("event_timestamp", pa.timestamp("us", tz="UTC")),
         pa.field("model_version", pa.string())]
        + [pa.field(n, pa.list_(pa.float32())) for n in layer_names]
    )


def title_embedding_schema() -> pa.Schema:
    return pa.schema([
        pa.field("title_id", pa.string(), nullable=False),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC")),
        pa.field("model_version", pa.string()),
        pa.field("is_new", pa.bool_()),            # not seen in training: content-only vector
        pa.field("title_embedding", pa.list_(pa.float32())),
    ])
