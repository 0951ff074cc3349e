"""Resumable training state: everything a run needs to continue as if it had never stopped.

A state directory holds ``state-<step>.safetensors`` (model weights, the flattened AdamW state, the
epoch's row order, the torch RNG state as a uint8 tensor) and ``state.json`` (step, epoch, position
in the epoch, elapsed seconds, progress fraction, the numpy ``Generator`` state, the AdamW
hyper-parameters, the loss curve so far). ``state.json`` is written last, by rename, and names its
tensor file, so a crash while saving leaves the previous state intact. Nothing is ever unpickled:
tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

META = "state.json"
FORMAT = 1


@dataclass
class TrainState:
    step: int                        # optimizer steps done
    epoch: int                       # epoch in progress
    next_batch: int                  # index of the next batch inside that epoch
    elapsed_s: float                 # training wall time spent before the save
    progress: float                  # fraction of the schedule done (what set_lr last used)
    rows: np.ndarray                 # the epoch's shuffled training rows
    np_rng: dict                     # numpy Generator.bit_generator.state
    curve: list = field(default_factory=list)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state -> ``opt.<param index>.<key>`` tensors + JSON-safe param groups."""
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": torch.as_tensor(v).detach().contiguous().cpu()
               for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, st: TrainState, config: dict) -> Path:
    """Write the state for ``st.step``; older tensor files are removed once the pointer moved."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, groups = _flatten_optimizer(opt)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors["rows"] = torch.from_numpy(np.ascontiguousarray(st.rows, np.int64))
    tensors["torch_rng"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_rng.{i}"] = s
    name = f"state-{st.step:09d}.safetensors"
    save_file(tensors, str(directory / f".{name}.tmp"))
    os.replace(directory / f".{name}.tmp", directory / name)
    meta = {"format": FORMAT, "tensors": name, "step": st.step, "epoch": st.epoch, "next_batch": st.next_batch,
            "elapsed_s": st.elapsed_s, "progress": st.progress, "np_rng": st.np_rng,
            "param_groups": groups, "config": config, "curve": st.curve}
    tmp = directory / f".{META}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, directory / META)
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()
    return directory


def exists(directory: Path) -> bool:
    return (directory / META).exists()


def load(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, config: dict) -> TrainState:
    """Restore model, optimizer and RNGs in place; refuse a state written under another config."""
    meta = json.loads((directory / META).read_text())
    config = json.loads(json.dumps(config))          # compare as JSON sees it (tuples -> lists)
    if meta.get("format") != FORMAT:
        raise ValueError(f"training state {directory}: format {meta.get('format')} != {FORMAT}")
    if meta["config"] != config:
        diff = sorted(k for k in set(meta["config"]) | set(config) if meta["config"].get(k) != config.get(k))
        raise ValueError(f"training state {directory} was written under another config (differs in {diff}); "
                         "resume with the same settings or start without resume")
    tensors = load_file(str(directory / meta["tensors"]))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    opt.load_state_dict(_unflatten_optimizer(tensors, meta["param_groups"]))
    torch.set_rng_state(tensors["torch_rng"])
    cuda = [tensors[f"cuda_rng.{i}"] for i in range(sum(k.startswith("cuda_rng.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return TrainState(meta["step"], meta["epoch"], meta["next_batch"], meta["elapsed_s"], meta["progress"],
                      tensors["rows"].numpy().copy(), meta["np_rng"], [tuple(c) for c in meta["curve"]])
