"""Resumable training state: everything a run needs to continue as if it had never stopped.

A state directory holds ``state-<step>.safetensors`` (the trained weights, the best-on-validation
weights so far, the flattened AdamW state, the torch RNG state as a uint8 tensor) and ``state.json``
(step, epoch, position in the epoch, the numpy ``Generator`` state at the epoch's start -- the
epoch's batches are drawn again from it --, the clocks, the validation history, the AdamW
hyper-parameters, the loss curve so far). ``state.json`` is written last, by rename, and names its
tensor file, so a crash while saving leaves the previous state intact. Nothing is ever unpickled:
tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fm.durable import commit_file

META = "state.json"
FORMAT = 2
# the counters of fm.fit._Run that a state carries (JSON)
RUN_FIELDS = ("step", "epoch", "next_batch", "best_step", "train_s", "train_cpu_s", "eval_s", "epoch_f",
              "best", "best_weights", "since_best", "history", "curve", "epoch_rng")


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


def save(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, run, config: dict) -> Path:
    """Write the state of ``run`` (an ``fm.fit._Run``); older tensor files go once the pointer moved."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, groups = _flatten_optimizer(opt)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if run.best_state is not None:
        tensors.update({f"best.{k}": v.detach().contiguous().cpu() for k, v in run.best_state.items()})
    tensors.update(opt_tensors)
    if run.avg is not None:
        tensors.update(run.avg.tensors())
    tensors["torch_rng"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_rng.{i}"] = s
    name = f"state-{run.step:09d}.safetensors"
    save_file(tensors, str(directory / f".{name}.tmp"))
    commit_file(directory / f".{name}.tmp", directory / name)
    meta = {"format": FORMAT, "tensors": name, "param_groups": groups, "config": config,
            **{k: getattr(run, k) for k in RUN_FIELDS}}
    tmp = directory / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, default=_json_default))
    commit_file(tmp, directory / META)
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()
    return directory


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def exists(directory: Path) -> bool:
    return (directory / META).exists()


def load(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, run, config: dict) -> None:
    """Restore model, optimizer, RNGs and ``run``'s counters in place; refuse a state written under
    another config."""
    meta = json.loads((directory / META).read_text())
    config = json.loads(json.dumps(config))          # compare as JSON sees it (tuples -> lists)
    if meta.get("format") != FORMAT:
        raise ValueError(f"training state {directory}: format {meta.get('format')} != {FORMAT}; "
                         "start without resume")
    if meta["config"] != config:
        diff = sorted(k for k in set(meta["config"]) | set(config) if meta["config"].get(k) != config.get(k))
        raise ValueError(f"training state {directory} was written under another config (differs in {diff}); "
                         "resume with the same settings or start without resume")
    tensors = load_file(str(directory / meta["tensors"]))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    run.best_state = best or None
    opt.load_state_dict(_unflatten_optimizer(tensors, meta["param_groups"]))
    if run.avg is not None:
        run.avg.load(tensors)
    torch.set_rng_state(tensors["torch_rng"])
    cuda = [tensors[f"cuda_rng.{i}"] for i in range(sum(k.startswith("cuda_rng.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for k in RUN_FIELDS:
        setattr(run, k, meta[k])
    run.history = [tuple(h) for h in run.history]
    run.curve = [tuple(c) for c in run.curve]
