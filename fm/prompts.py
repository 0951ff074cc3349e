"""Prompt tuning: per-task soft tokens in front of the sequence, the foundation model frozen
(issue 15, item 4).

A prompt is ``n_tokens`` learned vectors (``n_tokens x d_model`` floats) placed before a profile's
events (``FoundationModel.encode(tokens, prefix=...)``): every event attends to them, so the same
frozen model computes a task-specific state. A task's score is a linear readout of that state at
the last event (``d_model + 1`` floats). Only these are trained (``fm.finetune.fit_task``: the
product's fit loop); the FM's weights are never written -- :func:`weights_checksum` before and
after proves it -- so any number of prompts share one model and swap at inference with no retrain.

Artefacts are tiny: ``prompt.safetensors`` (``prompt``, ``readout.weight``, ``readout.bias``) and
``prompt.json`` (task, base model version and its weights checksum, metrics) in
``models/<version>/prompts/<name>/``; :func:`load_prompt` refuses one made for another model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from fm.finetune import last_state, write_artefact
from fm.model import FoundationModel

WEIGHTS, META = "prompt.safetensors", "prompt.json"


def weights_checksum(model: nn.Module) -> str:
    """sha256 over every tensor of ``model``'s state (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class PromptTask(nn.Module):
    """Soft prompt + linear readout over a frozen FM (shared, not copied: it is never written)."""

    def __init__(self, fm: FoundationModel, n_tokens: int = 4, seed: int = 0):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        self.fm = fm.eval()
        for p in self.fm.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        d = fm.cfg.d_model
        # drawn like the model's own token embeddings (GPT-2 init scale)
        self.prompt = nn.Parameter(torch.randn(n_tokens, d, generator=g) * 0.02)
        self.readout = nn.Linear(d, 1)

    def states(self, tokens: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.fm.encode(tokens, prefix=self.prompt)

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        return self.readout(last_state(self.states(tokens)[-1], valid)).squeeze(-1)

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt.detach().cpu().contiguous(),
                "readout.weight": self.readout.weight.detach().cpu().contiguous(),
                "readout.bias": self.readout.bias.detach().cpu().contiguous()}


def save_prompt(task: PromptTask, directory: Path, meta: dict) -> Path:
    full = {"n_tokens": task.prompt.shape[0], "d_model": task.prompt.shape[1],
            "fm_weights_checksum": weights_checksum(task.fm), **meta}
    return write_artefact(directory, task.trained_state(), full, WEIGHTS, META)


def load_prompt(fm: FoundationModel, directory: Path, model_version: str | None = None) -> tuple[PromptTask, dict]:
    """The prompt of ``directory`` over ``fm``; refused when it was trained for another model
    version (``model_version``, as recorded at training) or another width."""
    if not (directory / META).exists():
        raise FileNotFoundError(f"no prompt at {directory} ({META} is missing)")
    meta = json.loads((directory / META).read_text())
    if model_version is not None and meta.get("model_version") != model_version:
        raise ValueError(f"prompt {directory.name!r} was trained for model {meta.get('model_version')}, not {model_version}")
    if meta["d_model"] != fm.cfg.d_model:
        raise ValueError(f"prompt {directory.name!r} has width {meta['d_model']}, the model {fm.cfg.d_model}")
    task = PromptTask(fm, meta["n_tokens"])
    state = load_file(str(directory / WEIGHTS))
    with torch.no_grad():
        task.prompt.copy_(state["prompt"])
        task.readout.weight.copy_(state["readout.weight"])
        task.readout.bias.copy_(state["readout.bias"])
    return task.eval(), meta
