"""Secrets never reach an output: stdout of every CLI, the step records under reports/, the values
returned to Airflow (XCom). Configs are real Feast ``RepoConfig`` objects with credentials in them."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json

from jobs import pipeline
from jobs.core.io import partition
from jobs.core.redact import MASK, redact, redact_text
from jobs.core.settings import Paths, run_cli

SECRETS = ("s3cr3t-pg", "hunter2-redis", "tok-123", "k3y")


def feast_config_with_credentials(tmp_path):
    """A real Feast RepoConfig: SQL registry URL with a password, Redis online store with a password."""
    from feast.repo_config import load_repo_config
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        "project: fm_embeddings\nprovider: local\n"
        "registry:\n  registry_type: sql\n  path: postgresql://fm:s3cr3t-pg@db.internal:5432/feast\n"
        "online_store:\n  type: redis\n  connection_string: \"redis.internal:6379,ssl=true,password=hunter2-redis\"\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n")
    return load_repo_config(repo, repo / "feature_store.yaml")


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_redact_masks_credentials_and_keeps_everything_else():
    out = redact({"password": "k3y", "redis_password": "k3y", "access_token": "tok-123", "tokens": 7,
                  "events_per_token": 1.5, "registry": "postgresql://fm:s3cr3t-pg@db.internal:5432/feast",
                  "online": {"connection_string": "redis.internal:6379,password=hunter2-redis"},
                  "runs": [{"api_key": "k3y"}, "redis://:hunter2-redis@cache:6379/0"], "n": None, "day": dt.date(2026, 11, 1)})
    assert not leaked(json.dumps(out, default=str))
    assert out["tokens"] == 7 and out["events_per_token"] == 1.5 and out["day"] == dt.date(2026, 11, 1)
    assert out["registry"] == f"postgresql://fm:{MASK}@db.internal:5432/feast"
    assert out["online"]["connection_string"] == f"redis.internal:6379,password={MASK}"
    assert out["runs"][1] == f"redis://:{MASK}@cache:6379/0" and out["password"] == MASK
    assert redact_text('{"password": "a b c", "user": "fm"}') == f'{{"password": "{MASK}", "user": "fm"}}'
    assert redact_text("secret: k3y token=tok-123 events_per_token=2") == f"secret: {MASK} token={MASK} events_per_token=2"


def test_every_output_path_redacts_a_feast_config_with_passwords(tmp_path, monkeypatch, capsys):
    """What publish reports about its store (the registry config's text, the online store config
    object) through the CLI (stdout + return), the pipeline step record and its XCom return."""
    cfg = feast_config_with_credentials(tmp_path)
    assert "s3cr3t-pg" in str(cfg.registry_config) and "hunter2-redis" in str(cfg.online_store)   # the leak, unredacted

    def report_store(_paths, _day=None) -> dict:
        return {"registry": str(cfg.registry_config), "online_store": cfg.online_store, "rows": 3}
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "var"))

    @dataclasses.dataclass(frozen=True)
    class StoreReportConfig:
        date: str = ""
    returned = run_cli(StoreReportConfig, lambda c, p: report_store(p), "report the store", ["date=2026-11-01"])
    printed = capsys.readouterr().out
    assert not leaked(printed) and not leaked(json.dumps(returned, default=str))
    assert "db.internal" in printed and "redis.internal" in printed and returned["rows"] == 3

    xcom = pipeline._timed("publish", "2026-11-01", report_store)
    record = (partition(Paths.from_env().reports, dt.date(2026, 11, 1)) / "steps" / "publish.json").read_text()
    assert not leaked(record) and not leaked(json.dumps(xcom, default=str))
    assert f"postgresql://fm:{MASK}@db.internal:5432/feast" in json.loads(record)["registry"]
