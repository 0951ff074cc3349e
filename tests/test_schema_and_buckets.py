"""Token field bucketing: the Spark column expressions must equal the reference functions."""
from __future__ import annotations


from fm import schema as S


def test_duration_buckets_by_runtime_fraction_and_log():
    assert S.duration_bucket(None, 100) == S.NO_DURATION
    assert S.duration_bucket(0, 100) == S.NO_DURATION
    first = S.NO_DURATION + 1
    assert S.duration_bucket(1, 100) == first                      # (0, 10%]
    assert S.duration_bucket(10, 100) == first                     # exactly 10%
    assert S.duration_bucket(11, 100) == first + 1
    assert S.duration_bucket(100, 100) == first + 9
    assert S.duration_bucket(500, 100) == first + 9                # capped at 100%
    log0 = first + S.DURATION_FRACTION_BUCKETS
    assert S.duration_bucket(1, None) == log0
    assert S.duration_bucket(8, None) == log0 + 3
    assert S.duration_bucket(1e12, None) == log0 + S.DURATION_LOG_BUCKETS - 1
    assert S.duration_bucket(1e12, None) < S.N_DURATION


def test_gap_and_row_buckets():
    assert S.gap_bucket(None) == S.OOV
    assert S.gap_bucket(0) == S.N_SPECIAL
    assert S.gap_bucket(3600) == S.N_SPECIAL + 11
    assert S.gap_bucket(1e15) == S.N_GAP - 1
    assert [S.row_bucket(r) for r in (0, 1, 2, 3, 4, 5, 6, 9, 10, 19, 20, 500)] == \
        [S.N_SPECIAL + b for b in (0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7)]
    assert S.row_bucket(None) == S.row_bucket(-1) == S.OOV
    assert max(S.row_bucket(r) for r in range(100)) < S.N_ROW


def test_spark_bucket_columns_match_reference(spark):
    from pyspark.sql import functions as F
    from jobs.tokenize import duration_bucket_col, gap_bucket_col, row_bucket_col
    cases = [(None, 100.0, None, None), (0.0, 100.0, 0.0, 0), (5.0, 100.0, 1.0, 1), (10.0, 100.0, 59.0, 3),
             (99.0, 100.0, 3600.0, 6), (250.0, None, 1e9, 25), (1e9, None, 2.0, -3), (3.0, 0.0, 0.5, 19)]
    df = spark.createDataFrame(cases, "dur double, runtime double, gap double, row int")
    got = df.select(duration_bucket_col(F.col("dur"), F.col("runtime")).alias("d"),
                    gap_bucket_col(F.col("gap")).alias("g"), row_bucket_col(F.col("row")).alias("r")).collect()
    for (dur, runtime, gap, row), r in zip(cases, got):
        assert r["d"] == S.duration_bucket(dur, runtime if runtime else None), (dur, runtime)
        assert r["g"] == S.gap_bucket(gap), gap
        assert r["r"] == S.row_bucket(row), row


def test_vocab_index_reserves_pad_and_oov():
    idx = S.vocab_index(S.DEVICES)
    assert min(idx.values()) == S.N_SPECIAL and S.vocab_size(S.DEVICES) == len(S.DEVICES) + 2
