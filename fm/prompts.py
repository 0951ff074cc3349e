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

At inference :class:`PromptViews` swaps them in (``fmpipe embed prompts=<name>,...``): per prompt
the profile's last-layer state under that prompt (``emb_prompt_<name>``, a query vector in the
title space) and the task's probability (``head_prompt_<name>``: [p(no), p(yes)]), next to the
plain columns, from one checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from fm.extract import LayerSpec, ProfileEncoder
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


def prompt_column(name: str) -> str:
    """The profile table column of a prompt's view ('buy' -> 'emb_prompt_buy')."""
    return f"emb_prompt_{name}"


def prompt_score_column(name: str) -> str:
    """The profile table column of a prompt task's probabilities [p(no), p(yes)]."""
    return f"head_prompt_{name}"


class PromptViews(nn.Module):
    """An inference encoder (``names``/``dims``/``forward`` like :class:`fm.extract.ProfileEncoder`)
    that returns ``base``'s outputs, then per prompt its view and its task probabilities.

    Why one module: embed streams every profile once through whatever encoder it is given, so the
    prompted views ride the same batches (one extra forward pass per prompt; the FM's weights are
    shared, never copied or written)."""

    def __init__(self, base: ProfileEncoder, model: FoundationModel, prompts: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.base = base
        last = (LayerSpec(model.cfg.n_layers, "last"),)
        self.views = nn.ModuleList(ProfileEncoder(model, last, prompt=st["prompt"]) for st in prompts.values())
        self.readouts = nn.ModuleList()
        for st in prompts.values():
            ro = nn.Linear(model.cfg.d_model, 1)
            with torch.no_grad():
                ro.weight.copy_(st["readout.weight"])
                ro.bias.copy_(st["readout.bias"])
            self.readouts.append(ro)
        self.names = list(base.names) + [c for n in prompts for c in (prompt_column(n), prompt_score_column(n))]
        self.dims = list(base.dims) + [d for _ in prompts for d in (model.cfg.d_model, 2)]
        self.d_model, self.max_len = base.d_model, base.max_len
        self.eval()

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = list(self.base(tokens, lengths))
        for view, ro in zip(self.views, self.readouts):
            h = view(tokens, lengths)[0]
            p = torch.sigmoid(ro(h).float())
            out += [h, torch.cat([1 - p, p], dim=-1).to(h.dtype)]
        return tuple(out)


def prompt_states(fm: FoundationModel, model_dir: Path, names: tuple[str, ...],
                  model_version: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: trained_state}`` of the prompts ``names`` under ``model_dir/prompts`` (plain tensors:
    what a Spark task is shipped), each checked by :func:`load_prompt`."""
    out = {}
    for name in names:
        where = model_dir / "prompts" / name
        if not (where / META).exists():
            have = sorted(p.name for p in (model_dir / "prompts").glob("*") if (p / META).exists())
            raise FileNotFoundError(f"prompt {name!r}: none under {where}; this model has {have or 'no prompts'} "
                                    f"(train one with `fmpipe prompt-tune task={name} labels=...`)")
        task, _ = load_prompt(fm, where, model_version)
        out[name] = task.trained_state()
    return out


def inference_encoder(model: FoundationModel, specs: tuple[LayerSpec, ...], surfaces: tuple[str, ...] = (),
                      heads: tuple[str, ...] = (),
                      prompts: dict[str, dict[str, torch.Tensor]] | None = None) -> ProfileEncoder | PromptViews:
    """The encoder embed runs (both engines): the plain :class:`ProfileEncoder`, wrapped in
    :class:`PromptViews` when prompts are asked for."""
    base = ProfileEncoder(model, specs, surfaces, heads=heads)
    return PromptViews(base, model, prompts) if prompts else base
