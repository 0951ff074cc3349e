"""A downstream ranker that uses the foundation model as a frozen subgraph.

Consumption pattern 1 of 3 (the others: published embeddings from Feast, and fine-tuning /
distilling). The ranker loads the artefact ``fmpipe export`` wrote -- plain ``torch.export``, no
import of this project -- feeds it a profile's recent tokens straight from the history table, and
puts its own small head on top. Because the export folds in the publication's alignment, the
profile vectors it computes are the ones the feature store serves for that date, so the ranker can
train offline on published features and serve with the subgraph (or the other way round).

    fmpipe export model=current                         # -> models/<version>/export/<date>-export/
    python docs/examples/subgraph_ranker.py EXPORT_DIR HISTORY_PARTITION [PROFILE_ID ...]
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn as nn


def load_subgraph(export_dir: Path) -> tuple[nn.Module, dict]:
    """The exported encoder (checksum verified) and its sidecar."""
    meta = json.loads((export_dir / "encoder.json").read_text())
    graph = export_dir / meta["file"]
    if hashlib.sha256(graph.read_bytes()).hexdigest() != meta["sha256"]:
        raise ValueError(f"{graph}: checksum does not match encoder.json")
    module = torch.export.load(str(graph)).module() if meta["format"] == "export" else torch.jit.load(str(graph))
    return module, meta


def history_tokens(history: Path, profile_ids: list[int], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, F) int64 tokens of the profiles' last ``max_len`` events (fields in the sidecar's
    order, right-padded with 0) and (B,) lengths, read from a history partition."""
    table = pq.read_table(history, columns=["profile_id", *meta["fields"]],
                          filters=pc.field("profile_id").isin(profile_ids))
    rows = {pid: i for i, pid in enumerate(table["profile_id"].to_pylist())}
    missing = [p for p in profile_ids if p not in rows]
    if missing:
        raise KeyError(f"profiles {missing[:5]} have no history in {history}")
    cols = {f: table[f].to_pylist() for f in meta["fields"]}
    seqs = [[cols[f][rows[p]][-meta["max_len"]:] for f in meta["fields"]] for p in profile_ids]
    lengths = torch.tensor([len(s[0]) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), len(meta["fields"]), dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : lengths[b]] = torch.tensor(s, dtype=torch.long).T
    return tokens, lengths


class SubgraphRanker(nn.Module):
    """Score (profile, candidate title) pairs: frozen FM profile vector + a trainable head."""

    def __init__(self, export_dir: Path, column: str = ""):
        super().__init__()
        self.encoder, self.meta = load_subgraph(Path(export_dir))
        self.column = self.meta["columns"].index(column or self.meta["columns"][-1])
        d = self.meta["dim"]
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))

    def profile_vectors(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():                                # the subgraph stays frozen
            return self.encoder(tokens, lengths)[self.column]

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, titles: torch.Tensor) -> torch.Tensor:
        p = self.profile_vectors(tokens, lengths)
        return self.head(torch.cat([p, titles, p * titles], dim=-1)).squeeze(-1)


def main(argv: list[str]) -> None:
    export_dir, history, *pids = argv
    ranker = SubgraphRanker(Path(export_dir))
    ids = [int(p) for p in pids] or pq.read_table(history, columns=["profile_id"])["profile_id"].to_pylist()[:3]
    tokens, lengths = history_tokens(Path(history), ids, ranker.meta)
    vecs = ranker.profile_vectors(tokens, lengths)
    for pid, v in zip(ids, vecs):
        print(pid, [round(float(x), 4) for x in v[:4]], "...")


if __name__ == "__main__":
    main(sys.argv[1:])
