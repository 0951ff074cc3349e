"""Export the profile encoder as an artefact a downstream model loads as a subgraph:
``fmpipe export [model=current|<version>] [date=D] [format=export|torchscript]``.

The artefact is the exact module the embed job runs (``fm.export``), grown to today's title
vocabulary, with the publication's layers and its alignment rotation folded in -- so a ranker
that embeds a profile with it gets the vector the feature store serves for that profile on that
date. It is written next to the checkpoint, one folder per publication date and format
(``models/<version>/export/<date>-<format>/``: ``encoder.pt2`` or ``encoder.ts`` + ``encoder.json``),
aside then renamed. ``docs/examples/subgraph_ranker.py`` shows a ranker built on it.

``date`` defaults to the latest profile publication made with this model; with none, the
encoder is exported unrotated with the default layers (``<version>/export/unaligned-<format>``).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import torch

from fm.export import FORMATS, export_encoder
from fm.extract import LayerSpec, default_layers
from jobs import alignment, embed
from jobs.core.io import partition
from jobs.core.settings import Paths, parse_date, run_cli
from jobs.train import current_model_dir
from jobs.core.vocab import read_vocab, title_ids_by_idx


@dataclass
class ExportConfig:
    model: str = "current"          # current | a model version under models/
    date: str = ""                  # publication whose layers + alignment are folded in (default: latest of this model)
    format: str = "export"          # export (torch.export, .pt2) | torchscript (.ts)


def _publication(paths: Paths, version: str, date: str) -> tuple[dt.date, dict] | None:
    """(date, manifest) of the requested or latest profile publication made with ``version``."""
    if date:
        day = parse_date(date)
        path = partition(paths.profile_embeddings, day) / "_manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"no profile publication for {day} ({path} is missing); run `fmpipe embed date={day}`")
        man = json.loads(path.read_text())
        if man.get("model_version") != version:
            raise ValueError(f"the {day} publication was made with model {man.get('model_version')}, not {version}; "
                             f"pass model={man.get('model_version')} or another date=")
        return day, man
    for p in sorted(paths.profile_embeddings.glob("dt=*"), reverse=True):
        m = p / "_manifest.json"
        if m.exists() and json.loads(m.read_text()).get("model_version") == version:
            return dt.date.fromisoformat(p.name[3:]), json.loads(m.read_text())
    return None


def _specs(layers: list[str]) -> tuple[LayerSpec, ...]:
    """Column names ('emb_layer2_last') back to specs."""
    out = []
    for name in layers:
        layer, pool = name.removeprefix("emb_layer").split("_", 1)
        out.append(LayerSpec(int(layer), pool))
    return tuple(out)


def _rotations(paths: Paths, day: dt.date, specs: tuple[LayerSpec, ...]) -> dict[str, np.ndarray]:
    """The publication's alignment, per output column (all columns of a layer share one rotation)."""
    path = partition(paths.profile_embeddings, day) / alignment.ALIGNMENT_FILE
    if not path.exists():
        return {}
    with np.load(path) as z:
        groups = {g: z[g] for g in z.files}
    return {c: groups[g] for g, cols in alignment.layer_groups(specs).items() if g in groups for c in cols}


def run(cfg: ExportConfig, paths: Paths) -> dict:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: expected one of {', '.join(sorted(FORMATS))}")
    version = current_model_dir(paths).name if cfg.model == "current" else cfg.model
    ids = title_ids_by_idx(read_vocab(paths))
    model, meta, n_trained = embed.load_model(paths, embed.EmbedConfig(model_version=version), ids, torch.device("cpu"))
    pub = _publication(paths, version, cfg.date)
    specs = _specs(pub[1]["layers"]) if pub else default_layers(model.cfg.n_layers)
    rotations = _rotations(paths, pub[0], specs) if pub else {}
    tag = pub[0].isoformat() if pub else "unaligned"
    out = export_encoder(model, specs, paths.models / version / "export" / f"{tag}-{cfg.format}", fmt=cfg.format,
                         rotations=rotations,
                         meta={"model_version": version, "publication_date": pub[0] if pub else None,
                               "vocab_titles": len(ids) - 2, "titles_trained": n_trained - 2})
    return {"model_version": version, "publication_date": tag, "format": cfg.format, "path": str(out),
            "columns": [s.name for s in specs], "rotated": bool(rotations)}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(ExportConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2))
