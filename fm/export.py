"""Export the profile encoder as a standalone graph a downstream ranker can load without this code.

What is exported is :class:`fm.extract.ProfileEncoder` — the exact module the embed job runs, so
the artefact and the published embeddings cannot disagree: ``(tokens (B, L, F) int64 ids in
``TOKEN_FIELDS`` order, right-padded with PAD; lengths (B,) int64)`` -> one (B, D) float32 tensor
per layer column, in the order of ``columns`` in the sidecar. Batch size and sequence length are
dynamic (1..max_len). An optional rotation (the stabilising alignment of the publication) can be
folded in so the exported model emits vectors in the published space.

Formats, checked on torch 2.13 CPU offline:
* ``export`` (default): ``torch.export.export`` + ``torch.export.save`` -> ``encoder.pt2``;
  load with ``torch.export.load(path).module()``. The supported path going forward.
* ``torchscript``: ``torch.jit.trace`` -> ``encoder.ts`` (``torch.jit.load``); works but
  ``torch.jit`` is deprecated in this torch version.
* ONNX is not offered: ``torch.onnx`` needs the ``onnx``/``onnxscript`` packages, not installed here.

Next to the graph, ``encoder.json`` records the model version, vocabulary fingerprint, field order,
columns, width, max length and the format, and the graph file's SHA-256.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fm.extract import LayerSpec, ProfileEncoder
from fm.durable import commit_dir
from fm.model import FoundationModel
from fm.schema import N_SPECIAL, PAD, TOKEN_FIELDS

FORMATS = {"export": "encoder.pt2", "torchscript": "encoder.ts"}
SIDECAR = "encoder.json"


class _Rotated(nn.Module):
    """ProfileEncoder followed by a fixed per-column rotation (published space)."""

    def __init__(self, encoder: ProfileEncoder, rotations: list[torch.Tensor | None]):
        super().__init__()
        self.encoder = encoder
        for i, r in enumerate(rotations):
            self.register_buffer(f"rot{i}", r if r is not None else torch.eye(encoder.d_model))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(tokens, lengths)
        return tuple(v @ getattr(self, f"rot{i}") for i, v in enumerate(out))


def example_inputs(model: FoundationModel, batch: int = 2, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid dummy inputs (non-special ids, lengths 1..L) used to trace and to smoke-test."""
    g = torch.Generator().manual_seed(0)
    L = length or min(8, model.cfg.max_len)
    sizes = [model.cfg.n_titles] + [model.cfg.field_sizes[f] for f in TOKEN_FIELDS[1:]]
    tokens = torch.stack([torch.randint(N_SPECIAL, n, (batch, L), generator=g) for n in sizes], dim=-1)
    lengths = torch.linspace(1, L, batch).round().long().clamp(1, L)
    tokens[torch.arange(L).view(1, L) >= lengths.view(batch, 1)] = PAD
    return tokens, lengths


def export_encoder(model: FoundationModel, specs: tuple[LayerSpec, ...], directory: Path, *, fmt: str = "export",
                   meta: dict | None = None, rotations: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``directory/encoder.{pt2,ts}`` + ``encoder.json`` (aside, then renamed into place)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    model = model.cpu().eval()
    encoder = ProfileEncoder(model, specs).eval()
    rot = [torch.from_numpy(np.asarray(rotations[s.name], np.float32)) if rotations and s.name in rotations else None
           for s in specs]
    module: nn.Module = _Rotated(encoder, rot).eval() if any(r is not None for r in rot) else encoder
    for p in module.parameters():
        p.requires_grad_(False)
    tokens, lengths = example_inputs(model, batch=3, length=min(8, model.cfg.max_len))
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        graph = tmp / FORMATS[fmt]
        with torch.no_grad():
            if fmt == "export":
                batch = torch.export.Dim("batch", min=1, max=1 << 20)
                seq = torch.export.Dim("seq", min=1, max=model.cfg.max_len)
                ep = torch.export.export(module, (tokens, lengths),
                                         dynamic_shapes={"tokens": {0: batch, 1: seq}, "lengths": {0: batch}})
                torch.export.save(ep, str(graph))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")          # torch.jit is deprecated, still works
                    torch.jit.trace(module, (tokens, lengths), check_trace=False).save(str(graph))
        side = {"format": fmt, "file": graph.name, "sha256": hashlib.sha256(graph.read_bytes()).hexdigest(),
                "inputs": {"tokens": "int64 (batch, seq, fields), right-padded with 0 (PAD)", "lengths": "int64 (batch,)"},
                "fields": list(TOKEN_FIELDS), "columns": [s.name for s in specs], "dim": model.cfg.d_model,
                "max_len": model.cfg.max_len, "n_titles": model.cfg.n_titles, "rotated": any(r is not None for r in rot),
                "torch": torch.__version__, **(meta or {})}
        (tmp / SIDECAR).write_text(json.dumps(side, indent=2, sort_keys=True, default=str))
    return commit_dir(directory, fill)


class LoadedEncoder:
    """A loaded export: ``enc(tokens, lengths) -> {column: (B, D) float32 tensor}``."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.meta = json.loads((directory / SIDECAR).read_text())
        graph = directory / self.meta["file"]
        if hashlib.sha256(graph.read_bytes()).hexdigest() != self.meta["sha256"]:
            raise ValueError(f"{graph}: checksum does not match {SIDECAR}")
        if self.meta["format"] == "export":
            self.module = torch.export.load(str(graph)).module()
        else:
            self.module = torch.jit.load(str(graph))
        self.columns = self.meta["columns"]

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.module(tokens.long(), lengths.long())
        return dict(zip(self.columns, out))


def load_encoder(directory: Path) -> LoadedEncoder:
    return LoadedEncoder(directory)
