"""Build a Feast FeatureStore for the repo in ``feature_repo/``, pointed at the current FMPIPE_HOME.

``feature_store.yaml`` is the source of truth for backends (set ``online_store.type: redis`` etc.
there, no code change). Only when the state root is not the default ``var/`` do we rewrite the
local SQLite/registry paths, so tests and scratch runs never touch the default store.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jobs.settings import REPO_ROOT, Paths

FEATURE_REPO = REPO_ROOT / "feature_repo"


def get_store(paths: Paths):
    from feast import FeatureStore
    from feast.repo_config import load_repo_config

    cfg = load_repo_config(FEATURE_REPO, FEATURE_REPO / "feature_store.yaml")
    if paths.home != (REPO_ROOT / "var").resolve():
        paths.feast.mkdir(parents=True, exist_ok=True)
        cfg.registry_config = str(paths.feast / "registry.db")
        cfg._registry = None                      # drop the one parsed from the yaml path
        if getattr(cfg.online_store, "type", None) == "sqlite":
            cfg.online_store.path = str(paths.feast / "online.db")
    return FeatureStore(repo_path=str(FEATURE_REPO), config=cfg)


def load_definitions(paths: Paths) -> list:
    """Import ``feature_repo/definitions.py`` with FMPIPE_HOME set, and return its Feast objects."""
    from feast import Entity, FeatureService, FeatureView, FileSource

    os.environ["FMPIPE_HOME"] = str(paths.home)
    spec = importlib.util.spec_from_file_location("fmpipe_feature_definitions", FEATURE_REPO / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, FeatureView, FeatureService, FileSource)
    return [v for v in vars(module).values() if isinstance(v, kinds)]
