"""The gate's verdict is bound to exactly what it validated (issue 14).

Real GE validation on the gate's synthetic home (``test_gate``), real Feast publication on the
publish tests' synthetic days (``test_publish``): a re-embed after validate is refused with a
message naming the changed files and the fix; the normal path passes; a crashed validate leaves
no verdict; stale, failed and missing verdicts are refused."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.core import publication as pubs
from jobs.core import verdict
from jobs.core.io import atomic_write_json, partition
from jobs.core.settings import Paths
from test_gate import D2, base, gate, home, mutate_profiles  # noqa: F401 (fixtures)
from test_publish import D1, run_publish, validated, write_day


def _reembed(paths: Paths, day) -> None:
    """What a re-embed after validate leaves: the same partition with other vectors, no new verdict."""
    f = partition(paths.profile_embeddings, day) / "part-0.parquet"
    t = pq.read_table(f)
    pq.write_table(t.slice(1).combine_chunks(), f)


def test_validate_stores_a_checksum_of_exactly_the_partitions_it_checked(home):
    out = gate(home)
    saved = json.loads(verdict.summary_path(home, D2).read_text())
    assert out["inputs_sha256"] == saved["inputs_sha256"] == verdict.combined(verdict.inputs(home, D2))
    assert set(saved["inputs"]) == {"tokens", "profile_embeddings", "title_embeddings"}
    assert set(saved["inputs"]["profile_embeddings"]) == {"part-0.parquet", "_manifest.json"}
    assert verdict.check(home, D2)["success"]


def test_a_reembed_after_validate_is_refused_until_validate_runs_again(home):
    gate(home)
    mutate_profiles(home, lambda m: m * 1.01)                       # re-embed after validate
    with pytest.raises(verdict.VerdictMismatch) as err:
        verdict.check(home, D2)
    msg = str(err.value)
    assert "refusing to publish 2026-11-03: the data changed after validation" in msg
    assert "profile_embeddings: changed ['part-0.parquet']" in msg
    assert "fmpipe validate date=2026-11-03" in msg
    gate(home)                                                      # the fix the message names
    assert verdict.check(home, D2)["success"]


def test_a_crashed_validate_leaves_no_verdict_not_the_previous_success(home, monkeypatch):
    from jobs import validate
    gate(home)
    assert verdict.check(home, D2)["success"]

    def crash(*a, **k):
        raise MemoryError("killed mid-validation")
    monkeypatch.setattr(validate, "run_suite", crash)
    with pytest.raises(MemoryError):
        gate(home)
    assert not verdict.summary_path(home, D2).exists()
    with pytest.raises(verdict.VerdictMismatch, match="no validation result at .*summary.json"):
        verdict.check(home, D2)


def test_inputs_changing_while_validate_reads_them_store_no_verdict(home, monkeypatch):
    from jobs import validate
    real = validate.run_suite

    def run_and_reembed(paths, check, build_docs=True):
        out = real(paths, check, build_docs)
        if check.suite == "title_embeddings":
            mutate_profiles(paths, lambda m: m * 1.01)           # a writer that ignored the date lock
        return out
    monkeypatch.setattr(validate, "run_suite", run_and_reembed)
    with pytest.raises(verdict.GateFailed, match="changed while validate was reading them"):
        gate(home)
    assert not verdict.summary_path(home, D2).exists()


def test_publish_refuses_a_reembed_after_validate_and_passes_after_revalidation(tmp_path, monkeypatch):
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    write_day(paths, D1, range(0, 20), "m1", 1)                   # embedded and validated
    _reembed(paths, D1)
    with pytest.raises(verdict.VerdictMismatch, match=r"data changed after validation \(profile_embeddings: changed"):
        run_publish(paths, D1)
    assert pubs.current(paths) is None and pubs.history(paths) == []
    validated(paths, D1)                                          # validate again: the normal path
    out = run_publish(paths, D1)
    assert pubs.current(paths)["publication"] == out["publication"]
    stored = json.loads(verdict.summary_path(paths, D1).read_text())["inputs_sha256"]
    assert pubs.manifest(paths, out["publication"])["validated_inputs"] == stored


@pytest.mark.parametrize("summary, pattern", [
    (None, "no validation result at"),
    ({"success": True, "suites": []}, "is stale: it records no checksum"),
    ("{ torn", "is unreadable"),
])
def test_publish_refuses_a_missing_stale_or_unreadable_verdict(tmp_path, monkeypatch, summary, pattern):
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    write_day(paths, D1, range(0, 20), "m1", 1)
    path = verdict.summary_path(paths, D1)
    if summary is None:
        path.unlink()
    elif isinstance(summary, str):
        path.write_text(summary)
    else:
        atomic_write_json(summary, path)
    with pytest.raises(verdict.VerdictMismatch, match=pattern) as err:
        run_publish(paths, D1)
    assert "fmpipe validate date=2026-11-01" in str(err.value) and pubs.current(paths) is None


def test_publish_refuses_a_failed_verdict_even_when_bound(tmp_path, monkeypatch):
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    write_day(paths, D1, range(0, 20), "m1", 1)
    bound = verdict.bind({"date": D1.isoformat(), "success": False, "suites": []}, verdict.inputs(paths, D1))
    atomic_write_json(bound, verdict.summary_path(paths, D1))
    with pytest.raises(verdict.GateFailed, match="validation failed"):
        run_publish(paths, D1)
    assert pubs.current(paths) is None
