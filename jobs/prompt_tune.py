"""Prompt-tune the current foundation model for a downstream task, the model frozen:
``fmpipe prompt-tune task=<name> labels=<table> [date=D] [model=current] [n_tokens=4]``.

The same label table and split as ``fmpipe finetune-task`` (``jobs.finetune_task``); trains only
``n_tokens`` soft prompt vectors and a linear readout (``fm.prompts.PromptTask``) through the
product's fit loop, the checkpoint kept by validation AUC. The FM's weights checksum is compared
before and after (a change is an error: nothing may write them). The prompt is a tiny artefact in
``models/<version>/prompts/<task>/`` (``prompt.safetensors`` + ``prompt.json``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from fm.finetune import fit_task, labels_of, n_trainable
from fm.prompts import PromptTask, save_prompt, weights_checksum
from fm.recipe import Recipe
from jobs.finetune_task import check_task, task_data
from jobs.core.settings import Paths, run_cli


@dataclass(frozen=True)
class PromptTuneConfig:
    task: str = ""                     # the task's name (its prompt's name)
    labels: str = ""                   # Parquet or CSV: profile_id, label (0/1)
    date: str = ""
    model: str = "current"
    n_tokens: int = 4                  # soft prompt vectors
    valid_frac: float = 0.2
    time_budget_s: float = 60.0
    clock: str = "wall"
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_task(self.task, self.labels, self.valid_frac)
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {self.n_tokens}")

    def recipe(self) -> Recipe:
        return Recipe(time_budget_s=self.time_budget_s, clock=self.clock, lr=self.lr, batch_size=self.batch_size,
                      seed=self.seed)


def run(cfg: PromptTuneConfig, paths: Paths) -> dict:
    fm, mdir, train, valid, day = task_data(paths, cfg.model, cfg.date, cfg.labels, cfg.valid_frac, cfg.seed)
    before = weights_checksum(fm)
    torch.manual_seed(cfg.seed)
    task = PromptTask(fm, cfg.n_tokens, cfg.seed)
    result = fit_task(task, train, valid, cfg.recipe(), desc=f"prompt {cfg.task}")
    if weights_checksum(fm) != before:
        raise RuntimeError("prompt tuning changed the FM's weights (a bug: only the prompt may train)")
    meta = {"task": cfg.task, "model_version": mdir.name, "config": asdict(cfg), "history_state": day.isoformat(),
            "profiles": {"train": len(train), "valid": len(valid)},
            "positive_rate": {"train": float(labels_of(train).mean()), "valid": float(labels_of(valid).mean())},
            "trainable_params": n_trainable(task), "valid": result.best, "metrics": result.summary()}
    out = save_prompt(task, mdir / "prompts" / cfg.task, meta)
    return {"task": cfg.task, "model_version": mdir.name, "path": str(out), "valid": result.best,
            "trainable_params": n_trainable(task), "fm_weights_checksum": before, "profiles": meta["profiles"],
            "steps": result.steps, "train_s": result.train_s}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(PromptTuneConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2, default=str))
