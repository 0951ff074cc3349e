"""The quality gate (real GE suites from ``expectations/``) on a synthetic FMPIPE_HOME, no Spark, no
model: a good day passes, and each bad kind of token or embedding table is caught with a message
naming the suite, the expectation, the column, the observed value and the threshold.

Day D1 is the previous publication (the reference); day D2 is validated against it: its profile
vectors are D1's plus a little noise, as the embed job's aligned output is from one day to the next.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm import schema as S
from jobs import validate
from jobs.embed import published_at
from jobs.core.io import atomic_write_json, atomic_write_table, partition
from jobs.core.settings import Paths

D0, D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)
LAYERS = ("emb_layer1_last", "emb_layer2_last", "emb_layer2_mean")
DIM, PROFILES, INACTIVE, TITLES = 16, 200, 30, 40


def _vectors(m: np.ndarray) -> pa.Array:
    m = np.asarray(m, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1]).cast(pa.list_(pa.float32()))


def _base_vectors(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal((n, DIM)) * (1 + i) for i, layer in enumerate(LAYERS)}


def write_static(paths: Paths) -> None:
    """Catalogue (one title released after D2: not required), title vocabulary, history states."""
    ids = [f"t{i:03d}" for i in range(TITLES)]
    release = [D0] * TITLES + [D2 + dt.timedelta(days=30)]
    atomic_write_table(pa.table({"title_id": ids + ["t_future"], "release_date": pa.array(release, pa.date32())}),
                       paths.catalogue)
    atomic_write_table(pa.table({"title_id": ids, "idx": pa.array(range(S.N_SPECIAL, S.N_SPECIAL + TITLES), pa.int32()),
                                 "first_dt": pa.array([D0] * TITLES, pa.date32())}, schema=S.TITLE_VOCAB_SCHEMA),
                       paths.title_vocab)
    for day in (D1, D2):
        last = [day] * PROFILES + [D0] * INACTIVE
        atomic_write_table(pa.table({"profile_id": pa.array(range(PROFILES + INACTIVE), pa.int64()),
                                     "last_dt": pa.array(last, pa.date32())}), partition(paths.history, day) / "part-0.parquet")


def token_table(day: dt.date, seed: int) -> pa.Table:
    """Two tokens per active profile, every field a valid id."""
    rng = np.random.default_rng(seed)
    n = 2 * PROFILES
    ts = [dt.datetime.combine(day, dt.time(12), tzinfo=dt.timezone.utc) + dt.timedelta(minutes=i) for i in range(n)]
    cols = {"profile_id": pa.array(np.repeat(np.arange(PROFILES), 2), pa.int64()),
            "event_id": pa.array([f"{day}-e{i}" for i in range(n)]), "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "seq": pa.array(np.arange(n), pa.int64())}
    hi = {f: r[1] for f, r in validate.token_ranges(S.N_SPECIAL + TITLES - 1).items()}
    for f in S.TOKEN_FIELDS:
        cols[f] = pa.array(rng.integers(S.N_SPECIAL, hi[f] + 1, n), pa.int32())
    cols["n_events"] = pa.array(rng.integers(1, 4, n), pa.int32())
    return pa.table(cols, schema=S.TOKEN_SCHEMA)


def write_day(paths: Paths, day: dt.date, profiles: dict[str, np.ndarray], titles: np.ndarray) -> None:
    """The tokenize and embed outputs of one day."""
    atomic_write_table(token_table(day, day.day), partition(paths.tokens, day) / "part-0.parquet")
    stamp, n = published_at(day), len(next(iter(profiles.values())))
    prof = {"profile_id": pa.array(range(n), pa.int64()), "event_timestamp": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "model_version": pa.array(["m1"] * n)}
    prof.update({layer: _vectors(v) for layer, v in profiles.items()})
    write_embeddings(paths, day, "profile", pa.table(prof, schema=S.profile_embedding_schema(list(LAYERS))))
    tids = [f"t{i:03d}" for i in range(TITLES)]
    write_embeddings(paths, day, "title", pa.table({
        "title_id": tids, "event_timestamp": pa.array([stamp] * TITLES, pa.timestamp("us", tz="UTC")),
        "model_version": ["m1"] * TITLES, "is_new": [False] * TITLES, "title_embedding": _vectors(titles)},
        schema=S.title_embedding_schema()))


def write_embeddings(paths: Paths, day: dt.date, kind: str, table: pa.Table) -> None:
    root = paths.profile_embeddings if kind == "profile" else paths.title_embeddings
    atomic_write_table(table, partition(root, day) / "part-0.parquet")
    atomic_write_json({"dim": DIM, "rows": table.num_rows}, partition(root, day) / "_manifest.json")


def publish_record(paths: Paths, day: dt.date) -> None:
    """What jobs.publish leaves behind that the gate reads: the publication history line."""
    atomic_write_json({}, paths.home / "publications" / "CURRENT.json")
    with open(paths.home / "publications" / "history.jsonl", "a") as f:
        f.write(json.dumps({"date": day.isoformat(), "publication": f"{day}.abc", "seq": 1}) + "\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Paths:
    """D1 published; D2 written as a normal next day (same profiles, vectors moved a little)."""
    paths = Paths(tmp_path_factory.mktemp("gate") / "var")
    write_static(paths)
    v1, t1 = _base_vectors(1, PROFILES), np.random.default_rng(2).standard_normal((TITLES, DIM))
    write_day(paths, D1, v1, t1)
    publish_record(paths, D1)
    rng = np.random.default_rng(3)
    v2 = {k: v + 0.3 * rng.standard_normal(v.shape) * np.linalg.norm(v, axis=1, keepdims=True) / np.sqrt(DIM)
          for k, v in v1.items()}
    write_day(paths, D2, v2, t1 + 0.01 * rng.standard_normal(t1.shape))
    return paths


@pytest.fixture
def home(base, tmp_path) -> Paths:
    paths = Paths(tmp_path / "var")
    shutil.copytree(base.home, paths.home)
    return paths


def gate(paths: Paths, day: dt.date = D2, **kw) -> dict:
    return validate.run(validate.ValidateConfig(date=day.isoformat(), build_docs=False, **kw), paths)


def mutate_profiles(paths: Paths, fn, layer: str = "emb_layer2_last") -> None:
    f = partition(paths.profile_embeddings, D2) / "part-0.parquet"
    t = pq.read_table(f)
    m = np.asarray(t[layer].combine_chunks().flatten().to_numpy(), np.float64).reshape(t.num_rows, DIM)
    pq.write_table(t.set_column(t.schema.get_field_index(layer), layer, _vectors(fn(m))), f)


def mutate_tokens(paths: Paths, fn) -> None:
    f = partition(paths.tokens, D2) / "part-0.parquet"
    pq.write_table(fn(pq.read_table(f)), f)


def set_value(t: pa.Table, column: str, row: int, value) -> pa.Table:
    values = t[column].to_pylist()
    values[row] = value
    return t.set_column(t.schema.get_field_index(column), column, pa.array(values, t.schema.field(column).type))


def test_a_good_day_passes_every_suite_against_the_previous_publication(home):
    out = gate(home)
    assert out["success"] and [s["suite"] for s in out["suites"]] == ["tokens", "profile_embeddings", "title_embeddings"]
    prof = {s["suite"]: s for s in out["suites"]}["profile_embeddings"]
    ref = prof["context"]["reference"]
    assert ref["date"] == D1.isoformat() and ref["source"].startswith("publication")
    assert prof["context"]["norm_bounds"]["learned"] == list(LAYERS)
    for layer in LAYERS:
        assert ref["columns"][layer]["shared"] == PROFILES and ref["columns"][layer]["mean_cosine"] > 0.8
    saved = json.loads((partition(home.gx / "results", D2) / "summary.json").read_text())
    assert saved["success"] and (partition(home.gx / "results", D2) / "tokens.json").exists()


def test_the_first_publication_falls_back_to_static_bounds(home):
    shutil.rmtree(home.home / "publications")
    out = gate(home, D1)
    prof = {s["suite"]: s for s in out["suites"]}["profile_embeddings"]
    assert out["success"] and prof["context"]["reference"] is None
    assert prof["context"]["norm_bounds"] == {"learned": [], "static": list(LAYERS)}
    # with no publication, the latest earlier date whose gate passed is the reference
    assert validate.reference_date(home, D2) == (D1, "last passed gate (nothing published before)")


def _fails(paths: Paths, pattern: str, **kw) -> str:
    with pytest.raises(validate.GateFailed) as e:
        gate(paths, **kw)
    msg = str(e.value)
    assert re.search(pattern, msg), msg
    return msg


def test_zero_vectors_are_caught_and_the_message_names_observed_and_threshold(home):
    mutate_profiles(home, lambda m: np.where(np.arange(len(m))[:, None] < 10, 0.0, m))        # 10 of 200 = 5 %
    msg = _fails(home, r"\[profile_embeddings\] expect_column_mean_to_be_between on column emb_layer2_last__zero: "
                       r"observed 0\.05; threshold min_value=0(\.0)?, max_value=0\.001")
    assert "emb_layer1_last__zero" not in msg
    # the threshold is configuration: a looser bound lets the same table through
    assert gate(home, thresholds=("profile_embeddings.max_zero_share=0.1", "norm_mostly=0.9"))["success"]


def test_duplicate_vectors_are_caught(home):
    mutate_profiles(home, lambda m: np.where(np.arange(len(m))[:, None] < 8, m[100], m), layer="emb_layer1_last")
    _fails(home, r"expect_column_mean_to_be_between on column emb_layer1_last__duplicate: observed 0\.04; "
                 r"threshold min_value=0(\.0)?, max_value=0\.01")


def test_norms_outside_the_learned_range_are_caught_though_inside_the_static_bounds(home):
    mutate_profiles(home, lambda m: np.where(np.arange(len(m))[:, None] < 6, m * 5, m))
    msg = _fails(home, r"expect_column_values_to_be_between on column emb_layer2_last__norm: observed "
                       r"unexpected_rows=6, of_rows=200, unexpected_percent=3\.0; threshold min_value=[0-9.]+, "
                       r"max_value=[0-9.]+, mostly=0\.999")
    assert "emb_layer2_last__prev_cos" not in msg                # 6 vectors scaled: direction unchanged
    shutil.rmtree(home.home / "publications")
    shutil.rmtree(home.gx)
    assert gate(home)["success"]                                  # no reference: the static bounds pass it


def test_a_title_norm_outlier_is_tolerated_only_below_a_tenth_of_a_percent(home):
    """One title in 40 (2.5%) scaled 5x fails; the same share passes where the threshold allows it."""
    f = partition(home.title_embeddings, D2) / "part-0.parquet"
    t = pq.read_table(f)
    m = np.asarray(t["title_embedding"].combine_chunks().flatten().to_numpy(), np.float64).reshape(t.num_rows, DIM)
    m[3] *= 5
    pq.write_table(t.set_column(t.schema.get_field_index("title_embedding"), "title_embedding", _vectors(m)), f)
    _fails(home, r"\[title_embeddings\] expect_column_values_to_be_between on column title_embedding__norm: observed "
                 r"unexpected_rows=1, of_rows=40, unexpected_percent=2\.5; threshold min_value=[0-9.]+, "
                 r"max_value=[0-9.]+, mostly=0\.999")
    assert gate(home, thresholds=("title_embeddings.norm_mostly=0.97",))["success"]


def test_a_shift_of_the_norm_distribution_is_caught(home):
    mutate_profiles(home, lambda m: m * 1.8)
    _fails(home, r"expect_column_median_to_be_between on column emb_layer2_last__norm: observed [0-9.]+; "
                 r"threshold min_value=[0-9.]+, max_value=[0-9.]+")


@pytest.mark.parametrize("kind", ["rotation", "sign_flip"])
def test_drift_against_the_previous_publication_is_caught(home, kind):
    q, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((DIM, DIM)))        # orthogonal: norms unchanged
    mutate_profiles(home, (lambda m: m @ q) if kind == "rotation" else (lambda m: -m))
    msg = _fails(home, r"expect_column_mean_to_be_between on column emb_layer2_last__prev_cos: observed -?[0-9.]+; "
                       r"threshold min_value=0\.2")
    observed = float(re.search(r"__prev_cos: observed (-?[0-9.e-]+)", msg).group(1))
    assert observed < (0.3 if kind == "rotation" else -0.8)
    assert "__norm" not in msg                                    # the norms did not move


def test_missing_titles_are_caught_and_named(home):
    f = partition(home.title_embeddings, D2) / "part-0.parquet"
    t = pq.read_table(f)
    pq.write_table(t.filter(pa.compute.not_equal(t["title_id"], "t007")), f)
    msg = _fails(home, r"\[title_embeddings\] expect_column_distinct_values_to_contain_set on column title_id: "
                       r"observed missing=1, examples=\['t007'\]; threshold value_set=<40 values")
    assert "expect_table_row_count_to_equal" in msg and "t_future" not in msg


@pytest.mark.parametrize("kind,pattern", [
    ("duplicate_key", r"\[tokens\] expect_column_values_to_be_unique on column event_id: observed unexpected_rows=2"),
    ("out_of_range", r"\[tokens\] expect_column_values_to_be_between on column device: observed unexpected_rows=1, "
                     r"of_rows=400.*threshold min_value=1, max_value=6"),
    ("title_beyond_vocab", r"\[tokens\] expect_column_values_to_be_between on column title: .*max_value=41"),
    ("null", r"\[tokens\] expect_column_values_to_not_be_null on column gap: observed unexpected_rows=1"),
    ("missing_profile", r"\[tokens\] expect_column_unique_value_count_to_be_between on column profile_id: "
                        r"observed 199; threshold min_value=200, max_value=200"),
])
def test_bad_token_tables_are_caught(home, kind, pattern):
    def bad(t: pa.Table) -> pa.Table:
        if kind == "duplicate_key":
            return set_value(t, "event_id", 5, t["event_id"][4].as_py())
        if kind == "out_of_range":
            return set_value(t, "device", 3, S.vocab_size(S.DEVICES))
        if kind == "title_beyond_vocab":
            return set_value(t, "title", 3, S.N_SPECIAL + TITLES)
        if kind == "null":
            return set_value(t, "gap", 7, None)
        return t.filter(pa.compute.not_equal(t["profile_id"], 17))
    mutate_tokens(home, bad)
    msg = _fails(home, pattern)
    assert "[profile_embeddings]" not in msg and "[title_embeddings]" not in msg


def test_threshold_overrides_are_validated(home):
    with pytest.raises(ValueError, match="unknown threshold 'max_zero'"):
        gate(home, thresholds=("max_zero=0.1",))
    with pytest.raises(ValueError, match="unknown suite 'profiles'"):
        gate(home, thresholds=("profiles.max_zero_share=0.1",))
    t = validate.thresholds("title_embeddings", ("min_mean_cosine=0.5", "profile_embeddings.max_zero_share=0.2"))
    assert t["min_mean_cosine"] == 0.5 and t["max_zero_share"] == 0.0


def test_a_model_change_uses_static_norm_bounds_but_still_checks_drift(home):
    """The day a retrained model takes over, its norm scale may differ: not a failure by itself."""
    def new_model(t: pa.Table) -> pa.Table:
        return t.set_column(t.schema.get_field_index("model_version"), "model_version", pa.array(["m2"] * t.num_rows))
    mutate_profiles(home, lambda m: m * 1.8)
    part = partition(home.profile_embeddings, D2)
    for f in part.glob("*.parquet"):
        pq.write_table(new_model(pq.read_table(f)), f)
    res = gate(home)
    assert res["success"], res
    mutate_profiles(home, lambda m: -m)                            # a flipped space is still caught
    _fails(home, r"emb_layer2_last__prev_cos")


def test_duplicate_flags_compare_exact_bits_per_length_without_a_row_loop():
    """Exact float bits: -0.0 is not 0.0, equal NaN bits repeat, nulls never count, vectors of
    another length never match, and a sliced array starts its own count."""
    from jobs.core.vector_stats import duplicate_flags
    nan = float("nan")
    a = pa.array([[1.0, 2.0], None, [1.0, 2.0], [0.0, -0.0], [0.0, 0.0], [1.0], [1.0, 2.0], [], [], [nan, 1.0],
                  [nan, 1.0], None], pa.list_(pa.float32()))
    assert duplicate_flags(a).tolist() == [0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0]
    assert duplicate_flags(a.slice(2)).tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 1, 0]


def put_head(paths: Paths, day: dt.date, probs: np.ndarray, column: str = "head_action") -> None:
    """Add (or replace) a head probability column of its own width, recorded in the manifest's dims."""
    f = partition(paths.profile_embeddings, day) / "part-0.parquet"
    t = pq.read_table(f)
    if column in t.column_names:
        t = t.drop_columns([column])
    pq.write_table(t.append_column(pa.field(column, pa.list_(pa.float32())), _vectors(probs)), f)
    man = partition(paths.profile_embeddings, day) / "_manifest.json"
    m = json.loads(man.read_text())
    m["dims"] = {**{c: DIM for c in LAYERS}, column: probs.shape[1]}
    atomic_write_json(m, man)


def test_head_probabilities_pass_at_their_own_width_and_must_sum_to_one(home):
    rng = np.random.default_rng(7)
    for day in (D1, D2):
        put_head(home, day, rng.dirichlet(np.ones(8), PROFILES))
    out = gate(home)
    prof = {s["suite"]: s for s in out["suites"]}["profile_embeddings"]
    assert out["success"] and "head_action" in prof["context"]["norm_bounds"]["learned"]
    bad = rng.dirichlet(np.ones(8), PROFILES)
    bad[:5] *= 1.5                                          # five rows no longer sum to 1
    put_head(home, D2, bad)
    _fails(home, r"head_action__psum")
    negative = rng.dirichlet(np.ones(8), PROFILES)
    negative[:3, 0] -= 0.5
    negative[:3, 1] += 0.5                                  # still sums to 1, one value below 0
    put_head(home, D2, negative)
    _fails(home, r"head_action__pmin")
    put_head(home, D2, rng.dirichlet(np.ones(8), PROFILES))
    assert gate(home)["success"]
    m = json.loads((partition(home.profile_embeddings, D2) / "_manifest.json").read_text())
    m["dims"]["head_action"] = 5                                    # the manifest says 5, the table holds 8
    atomic_write_json(m, partition(home.profile_embeddings, D2) / "_manifest.json")
    _fails(home, r"head_action__dim")
