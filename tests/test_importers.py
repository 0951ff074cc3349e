"""Bring-your-own-data importers: column mapping, clear errors, MovieLens ratings -> events."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.tools import dataset_import, event_import
from jobs.core.io import partition

CSV = """uid,sku,when,what,secs,dev
7,A1,2026-11-01T10:00:00Z,click,,tv
7,B2,2026-11-01T11:00:00Z,buy,120.5,mobile
8,A1,2026-11-02T09:30:00Z,click,,web
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "log.csv"
    p.write_text(text)
    return p


def test_generic_csv_with_mapping(tmp_path, home):
    src = write(tmp_path, CSV)
    out = event_import.run(event_import.ImportConfig(source=str(src), user="uid", item="sku", timestamp="when",
                                                     action="what", action_map="click:impression,buy:complete",
                                                     duration="secs", device="dev"), home)
    assert out["events"] == 3 and out["days"] == 2 and out["catalogue_titles"] == 2
    day1 = pq.read_table(partition(home.raw, dt.date(2026, 11, 1))).to_pylist()
    assert [r["action"] for r in day1] == ["impression", "complete"]
    assert day1[1]["duration_s"] == 120.5 and day1[1]["device"] == "mobile" and day1[0]["profile_id"] == 7
    key = event_import.source_key(src)
    assert day1[0]["event_id"] == f"{key}-0" and key.startswith("log-") and day1[0]["canvas"] is None
    assert [r["seq"] for r in day1] == [0, 1]
    # re-import is idempotent: same partitions, same rows
    event_import.run(event_import.ImportConfig(source=str(src), user="uid", item="sku", timestamp="when"), home)
    assert pq.read_table(partition(home.raw, dt.date(2026, 11, 1))).num_rows == 2


@pytest.mark.parametrize("text,mapping,message", [
    (CSV, {"user": "user_id"}, r"column 'user_id' \(mapped as user\) not found; columns are \['uid'"),
    (CSV.replace("8,A1", "x8,A1"), {}, r"column 'uid' \(user\) row 2: 'x8' is not an integer id"),
    (CSV.replace("2026-11-01T11:00:00Z", "soon"), {}, r"column 'when' \(timestamp\) row 1: 'soon' is not unix"),
    (CSV.replace("120.5", "long"), {"duration": "secs"}, r"column 'secs' \(duration\) row 1: 'long' is not a finite"),
    (CSV.replace("120.5", "inf"), {"duration": "secs"}, r"column 'secs' \(duration\) row 1: inf is not a finite"),
    (CSV.replace("120.5", "-3"), {"duration": "secs"}, r"row 1: -3.0 is not a finite, non-negative"),
    (CSV.replace("2026-11-02T09:30:00Z", ""), {}, r"column 'when' \(timestamp\) row 2 is empty"),
    ("uid,sku,when\n7,A1,1762000000\n7,B2,1762000000000\n", {}, r"mixes unix seconds \(row 0: 1762000000\) and milliseconds \(row 1"),
    ("uid,sku,when\n7,A1,-5\n", {}, r"row 0: -5 is before 1970"),
])
def test_bad_columns_name_column_row_and_expectation(tmp_path, home, text, mapping, message):
    cfg = {"source": str(write(tmp_path, text)), "user": "uid", "item": "sku", "timestamp": "when", **mapping}
    with pytest.raises(event_import.ImportError_, match=message):
        event_import.run(event_import.ImportConfig(**cfg), home)
    assert not home.raw.exists()                          # nothing written


def test_movielens_ratings_become_events(tmp_path, home):
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.dat").write_text("1::10::5::978300760\n1::20::2::978300760\n2::10::3::978302109\n")
    (ml / "movies.dat").write_text("10::Toy Story (1995)::Animation|Comedy\n20::Heat (1995)::Crime\n", encoding="latin-1")
    out = dataset_import.import_movielens(home, str(ml), ratings_file="ratings.dat")
    assert out["events"] == 3 and out["profiles"] == 2
    rows = pq.read_table(home.raw).to_pylist()
    by_id = {r["event_id"]: r for r in rows}
    assert by_id["ml-0"]["action"] == "thumbs_up" and by_id["ml-1"]["action"] == "thumbs_down"
    assert by_id["ml-2"]["action"] == "complete" and by_id["ml-0"]["device"] is None
    cat = pq.read_table(home.catalogue).to_pylist()
    assert {c["title_id"] for c in cat} == {"10", "20"} and "Animation" in cat[0]["genres"]


def test_beauty_lines_become_events_in_file_order_with_relative_time(tmp_path, home):
    """One line per user; gaps give relative time (each user's last event on the fixed day); attributes
    become the catalogue's content; a malformed line names its number."""
    import gzip
    import json as js
    d = tmp_path / "beauty"
    d.mkdir()
    with gzip.open(d / "Beauty_with_gaps.txt.gz", "wt") as f:
        f.write("1 5 6 7\t0 0 86400\n2 6 5\t0 172800\n")
    with gzip.open(d / "Beauty_item2attributes.json.gz", "wt") as f:
        f.write(js.dumps({"5": [1, 2], "6": [2]}))
    out = dataset_import.import_beauty(home, str(d))
    assert out["events"] == 5 and out["profiles"] == 2 and out["last_day"] == "2014-07-01"
    rows = sorted(pq.read_table(home.raw).to_pylist(), key=lambda r: r["seq"])
    assert [(r["profile_id"], r["title_id"]) for r in rows] == [(1, "5"), (1, "6"), (1, "7"), (2, "6"), (2, "5")]
    assert rows[0]["ts"] == rows[1]["ts"] == "2014-06-30T00:00:00Z" and rows[2]["ts"] == "2014-07-01T00:00:00Z"
    assert rows[3]["ts"] == "2014-06-29T00:00:00Z"
    cat = {c["title_id"]: c for c in pq.read_table(home.catalogue).to_pylist()}
    assert cat["5"]["genres"] == ["attr1", "attr2"] and cat["7"]["genres"] == []
    assert js.loads((home.home / "dataset.json").read_text())["target_actions"] == ["play"]
    with gzip.open(d / "Beauty_with_gaps.txt.gz", "wt") as f:
        f.write("1 5 6\t0\n")
    with pytest.raises(event_import.ImportError_, match="line 1: expected"):
        dataset_import.import_beauty(home, str(d))


def test_a_second_log_appends_and_same_named_files_keep_their_events(tmp_path, home):
    """Two logs touching the same day: both stay; two files with the same name from different folders
    get different event ids; re-importing one replaces only its own events; catalogues merge."""
    a = tmp_path / "a" / "log.csv"
    b = tmp_path / "b" / "log.csv"
    a.parent.mkdir(), b.parent.mkdir()
    a.write_text(CSV)
    b.write_text("uid,sku,when\n9,C3,2026-11-01T12:00:00Z\n")
    cfg = dict(user="uid", item="sku", timestamp="when")
    event_import.run(event_import.ImportConfig(source=str(a), **cfg), home)
    event_import.run(event_import.ImportConfig(source=str(b), **cfg), home)
    day1 = pq.read_table(partition(home.raw, dt.date(2026, 11, 1))).to_pylist()
    assert sorted(r["title_id"] for r in day1) == ["A1", "B2", "C3"]
    assert len({r["event_id"] for r in day1}) == 3
    event_import.run(event_import.ImportConfig(source=str(a), **cfg), home)           # re-run: idempotent
    assert pq.read_table(partition(home.raw, dt.date(2026, 11, 1))).num_rows == 3
    assert sorted(pq.read_table(home.catalogue)["title_id"].to_pylist()) == ["A1", "B2", "C3"]


def test_a_catalogue_listing_a_title_twice_is_refused(tmp_path, home):
    cat = tmp_path / "cat.csv"
    cat.write_text("title_id,name\nA1,One\nB2,Two\nA1,Again\n")
    with pytest.raises(event_import.ImportError_, match=r"title_id 'A1' appears twice \(rows 0 and 2\)"):
        event_import.run(event_import.ImportConfig(source=str(write(tmp_path, CSV)), user="uid", item="sku",
                                                   timestamp="when", catalogue=str(cat)), home)


ITEMS = """item,title,release_date,genres,plot,director
101,Heat,15 Dec 1995,Crime|Thriller,A heist crew and a detective.,Michael Mann
102,Toy Story,1995-11-22,Animation|Comedy,,John Lasseter
103,Later Film,2030-01-01,,Not out yet.,
"""
LOG = """uid,sku,when
7,101,2026-11-01T10:00:00Z
7,102,2026-11-01T11:00:00Z
8,103,2026-11-02T09:30:00Z
8,103,2026-11-03T09:30:00Z
"""


def test_plain_csv_catalogue_with_a_mapping_and_the_release_policy(tmp_path, home):
    """A catalogue in the user's own columns: numeric ids kept as strings, '|' genres, day-month-name
    dates, several columns joined into the synopsis; events before release counted, then accepted."""
    log, items = write(tmp_path, LOG), tmp_path / "items.csv"
    items.write_text(ITEMS)
    cfg = dict(source=str(log), user="uid", item="sku", timestamp="when", catalogue=str(items),
               catalogue_map="title_id:item,name:title,synopsis:plot+director")
    dry = event_import.run(event_import.ImportConfig(**cfg, dry_run=True), home)
    assert dry["written"] is False and not home.raw.exists() and not home.catalogue.exists()
    assert dry["events_per_day"] == {"2026-11-01": 2, "2026-11-02": 1, "2026-11-03": 1}
    assert dry["before_release"]["events_before_release"] == 2 and dry["before_release"]["examples"] == ["103"]
    event_import.run(event_import.ImportConfig(**cfg), home)
    rows = {r["title_id"]: r for r in pq.read_table(home.catalogue).to_pylist()}
    assert rows["101"]["genres"] == ["Crime", "Thriller"] and rows["101"]["release_date"] == dt.date(1995, 12, 15)
    assert rows["101"]["synopsis"] == "A heist crew and a detective.. Michael Mann" and rows["101"]["name"] == "Heat"
    assert rows["102"]["release_date"] == dt.date(1995, 11, 22) and rows["102"]["synopsis"] == "John Lasseter"
    assert rows["103"]["release_date"] == dt.date(2030, 1, 1)            # quarantine policy: date kept
    out = event_import.run(event_import.ImportConfig(**cfg, before_release="accept"), home)
    assert out["before_release"]["policy"] == "accept"
    rows = {r["title_id"]: r for r in pq.read_table(home.catalogue).to_pylist()}
    assert rows["103"]["release_date"] == dt.date(2026, 11, 2)            # moved back to its first event


@pytest.mark.parametrize("items, mapping, message", [
    ("item,released\n1,someday\n", "title_id:item,release_date:released", "'released' (release_date) row 0: 'someday'"),
    ("sku,title\n1,A\n", "", "no title id column"),
    ("item,title\n1,A\n", "title_id:item,name:nme", "column(s) ['nme'] not found"),
])
def test_bad_catalogues_name_file_row_and_column(tmp_path, home, items, mapping, message):
    log, cat = write(tmp_path, LOG), tmp_path / "items.csv"
    cat.write_text(items)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        event_import.run(event_import.ImportConfig(source=str(log), user="uid", item="sku", timestamp="when",
                                                   catalogue=str(cat), catalogue_map=mapping), home)
    assert not home.raw.exists()


def test_cli_errors_are_one_message_without_traceback(tmp_path, home):
    import subprocess
    import sys
    log, cat = write(tmp_path, LOG), tmp_path / "items.csv"
    cat.write_text("item,released\n1,someday\n")
    exe = Path(sys.executable).with_name("fmpipe")
    args = [str(exe), "import", "events", f"source={log}", "user=uid", "item=sku", "timestamp=when",
            f"catalogue={cat}", "catalogue_map=title_id:item,release_date:released"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "row 0: 'someday' is not a date" in r.stderr and "date_format" in r.stderr
    r = subprocess.run([*args, "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([str(exe), "import", "events", f"source={log}", "user=uid", "item=sku", "timestamp=when",
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and "'dry_run': True" in r.stdout and not home.raw.exists()


def test_catalogue_mapping_by_title_options_on_the_command_line(tmp_path, home):
    """The CLI form: title.id=COL title.name=COL title.genres=COL title.genres_sep=SEP
    title.release_date=COL title.date_format=FMT (other title.* keys for synopsis, kind, runtime)."""
    import subprocess
    import sys
    log, items = write(tmp_path, LOG), tmp_path / "items.csv"
    items.write_text("sku,label,cats,out,about\n101,Heat,Crime/Thriller,15.12.1995,A heist.\n"
                     "102,Toy Story,Animation,22.11.1995,Toys.\n103,Later,,01.01.2030,\n")
    exe = Path(sys.executable).with_name("fmpipe")
    r = subprocess.run([str(exe), "import", "events", f"source={log}", "user=uid", "item=sku", "timestamp=when",
                        f"catalogue={items}", "title.id=sku", "title.name=label", "title.genres=cats",
                        "title.genres_sep=/", "title.release_date=out", "title.date_format=%d.%m.%Y",
                        "title.synopsis=about"], capture_output=True, text=True, env={**__import__("os").environ,
                                                                                     "FMPIPE_HOME": str(home.home)})
    assert r.returncode == 0, r.stderr
    rows = {x["title_id"]: x for x in pq.read_table(home.catalogue).to_pylist()}
    assert rows["101"]["genres"] == ["Crime", "Thriller"] and rows["101"]["release_date"] == dt.date(1995, 12, 15)
    assert rows["101"]["name"] == "Heat" and rows["101"]["synopsis"] == "A heist."
    bad = subprocess.run([str(exe), "import", "events", f"source={log}", "user=uid", "item=sku", "timestamp=when",
                          f"catalogue={items}", "title.colour=x"], capture_output=True, text=True,
                         env={**__import__("os").environ, "FMPIPE_HOME": str(home.home)})
    assert bad.returncode == 1 and "unknown catalogue option 'title.colour'" in bad.stderr and "Traceback" not in bad.stderr
