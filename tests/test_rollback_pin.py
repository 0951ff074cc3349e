"""A rollback stays rolled back (issue 14): the next publish is refused with a clear message until
the operator releases the pin (``fmpipe rollback --release``) or forces the publish; an index
rebuild does not lift the pin; the dates a rollback undid are never the alignment reference
(:func:`jobs.rollback.alignment_reference`).
Real Feast publication on the publish tests' synthetic days."""
from __future__ import annotations

import datetime as dt

import pytest

from jobs import cli
from jobs.core import publication as pubs
from jobs import rollback as rb
from jobs.core.settings import Paths
from test_publish import D1, D2, D3, run_publish, validated, write_day

D4 = dt.date(2026, 11, 4)


@pytest.fixture
def rolled_back(tmp_path, monkeypatch):
    """D1, D2, D3 published in order, then ``fmpipe rollback --to D1`` (D2 and D3 were bad)."""
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    for i, (day, pids) in enumerate(((D1, range(0, 20)), (D2, range(10, 30)), (D3, range(20, 40))), 1):
        write_day(paths, day, pids, f"m{i}", i)
        run_publish(paths, day, with_index=False)
    rb.main(["--to", D1.isoformat()])
    return paths


def test_the_next_publish_after_a_rollback_is_refused_until_the_pin_is_released(rolled_back, live_state, capsys):
    paths = rolled_back
    served, state = pubs.current(paths), live_state(paths)
    with pytest.raises(rb.RollbackPinned) as err:
        run_publish(paths, D3, with_index=False)                   # the next daily run
    msg = str(err.value)
    assert "refusing to publish 2026-11-03: serving is pinned to 2026-11-01 by a rollback" in msg
    assert "`fmpipe rollback --release`" in msg and "`fmpipe publish date=2026-11-03 force=true`" in msg
    assert pubs.current(paths) == served and live_state(paths) == state
    assert cli.main(["publish", f"date={D2}", "with_index=false"]) == cli.FAILED   # the CLI: one message, exit 1
    assert "serving is pinned to 2026-11-01" in capsys.readouterr().err
    assert rb.main(["--list"])["pinned_by"]["publication"] == served["publication"]
    assert rb.main(["--release"])["action"] == "released"
    assert rb.main(["--release"])["action"].startswith("noop")
    out = run_publish(paths, D2, with_index=False)
    assert pubs.current(paths)["publication"] == out["publication"] and rb.pin(paths) is None


def test_a_later_rollback_pins_again_after_a_release(rolled_back):
    paths = rolled_back
    rb.release(paths)
    run_publish(paths, D2, with_index=False)
    rb.rollback(rb.RollbackConfig(to=D1.isoformat()), paths)
    with pytest.raises(rb.RollbackPinned, match="pinned to 2026-11-01"):
        run_publish(paths, D2, with_index=False)


def test_force_publishes_over_the_pin_and_ends_it(rolled_back):
    paths = rolled_back
    out = run_publish(paths, D3, with_index=False, force=True)
    assert pubs.current(paths)["publication"] == out["publication"] and rb.pin(paths) is None
    assert run_publish(paths, D3, with_index=False)["date"] == D3.isoformat()     # no pin any more


def test_an_index_rebuild_of_the_rolled_back_to_date_keeps_the_pin(rolled_back):
    from jobs import index
    paths = rolled_back
    out = index.run(index.IndexConfig(date=D1.isoformat(), kind="flat", profiles=False, target_recall=0), paths)
    assert out["reused"] is False and pubs.current(paths)["action"] == "index"
    with pytest.raises(rb.RollbackPinned, match="pinned to 2026-11-01"):
        run_publish(paths, D2, with_index=False)


def test_the_alignment_reference_skips_the_days_a_rollback_undid(rolled_back):
    paths = rolled_back
    assert rb.rolled_back_dates(paths).keys() == {D2.isoformat(), D3.isoformat()}
    for day in (D1, D2, D3):                                       # write_day leaves no embed manifest
        (paths.profile_embeddings / f"dt={day}" / "_manifest.json").write_text("{}")
    assert rb.alignment_reference(paths, D4) == D1                 # not D3, the bad day rolled back
    rb.release(paths)
    validated(paths, D2)                                           # D2 fixed, validated and published again
    run_publish(paths, D2, with_index=False)
    assert rb.rolled_back_dates(paths).keys() == {D3.isoformat()}
    assert rb.alignment_reference(paths, D4) == D2
