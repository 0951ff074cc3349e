"""Checkpoints that describe themselves: safetensors weights + a JSON sidecar.

The sidecar holds the model config, the title-vocabulary fingerprint the ids refer to, the schema
version, the training data range and metrics, so inference rebuilds the model from the checkpoint
alone and refuses a checkpoint whose vocabulary does not match the token table it is given.
Weights are never unpickled (safetensors only).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fm.content import Encoder, EncoderUnavailable, load_encoder
from fm.durable import commit_dir
from fm.model import FoundationModel, ModelConfig
from fm.schema import SCHEMA_VERSION

WEIGHTS, META = "model.safetensors", "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing file, corrupt tensor, or mismatched vocabulary."""


def vocab_fingerprint(title_ids: list[str]) -> str:
    """Hash of the ordered title ids (id order *is* the vocabulary)."""
    return hashlib.sha256("\n".join(title_ids).encode()).hexdigest()[:16]


def save(model: FoundationModel, encoder: Encoder, directory: Path, meta: dict) -> Path:
    """Write the checkpoint aside, then rename it into place."""
    full = {"model_config": model.cfg.to_dict(), "schema_version": SCHEMA_VERSION, **meta}

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        encoder.save(tmp)
        (tmp / META).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    return commit_dir(directory, fill)


def read_meta(directory: Path) -> dict:
    path = directory / META
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory}: missing {META}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: invalid JSON ({e})") from e


def load(directory: Path, expected_vocab: list[str] | None = None,
         device: str | torch.device = "cpu") -> tuple[FoundationModel, Encoder, dict]:
    """Rebuild model + content encoder; ``expected_vocab`` must start with the checkpoint's titles."""
    meta = read_meta(directory)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"checkpoint {directory}: schema_version {meta.get('schema_version')} != {SCHEMA_VERSION}")
    cfg = ModelConfig.from_dict(meta["model_config"])
    if expected_vocab is not None:
        n = meta["vocab_size"]
        got = vocab_fingerprint(expected_vocab[:n])
        if len(expected_vocab) < n or got != meta["vocab_fingerprint"]:
            raise CheckpointError(
                f"checkpoint {directory}: vocabulary mismatch: checkpoint has {n} titles with fingerprint "
                f"{meta['vocab_fingerprint']}, the vocabulary table's first {min(n, len(expected_vocab))} "
                f"titles hash to {got}")
    weights = directory / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"checkpoint {directory}: missing {WEIGHTS}")
    try:
        state = load_file(str(weights), device=str(device))
        encoder = load_encoder(directory)
    except (SafetensorError, OSError, ValueError, KeyError, EncoderUnavailable) as e:
        raise CheckpointError(f"checkpoint {directory}: cannot read tensors ({e})") from e
    model = FoundationModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {weights}: tensors do not match the config ({e})") from e
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {weights}: tensor {name!r} holds NaN/Inf")
    return model.to(device).eval(), encoder, meta
