"""Distillation (issue 15, item 3): the student is the same model class with a smaller config, its
loss is the recipe's objective plus the KL to a frozen teacher, and ``fmpipe distill`` saves it as a
checkpoint like any model's (safetensors + sidecar) without touching the teacher or the current
pointer."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from fm import checkpoint
from fm.distill import DistillObjective, StudentShape, build_student, student_config
from fm.losses import Objective
from fm.model import ModelConfig
from fm.schema import N_SPECIAL
from jobs import distill as distill_job
from jobs import embed
from jobs.cli import main as cli
from jobs.train import current_model_dir
from test_embed import clone_world
from test_specialists import tiny, tokens


def test_student_is_the_teachers_config_with_the_smaller_shape():
    teacher = tiny(surfaces=("kids",), mtp_k=2)
    cfg = student_config(teacher.cfg, StudentShape(d_model=8, n_layers=1, n_heads=1, max_len=0))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_len) == (8, 1, 1, teacher.cfg.max_len)
    assert cfg.surfaces == () and cfg.mtp_k == 2 and cfg.n_titles == teacher.cfg.n_titles
    student = build_student(teacher, StudentShape(d_model=8, max_len=12))
    assert torch.equal(student.title.content, teacher.title.content) and student.n_params() < teacher.n_params() / 3
    with pytest.raises(ValueError, match="divisible"):
        StudentShape(d_model=30, n_heads=4)


def test_distill_loss_is_the_kl_to_the_frozen_teacher_plus_the_students_objective():
    teacher = tiny()
    student = build_student(teacher, StudentShape(d_model=8, max_len=16), zero_fields=False).train()
    student.cfg.dropout = 0.0
    toks, valid = tokens()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    obj = DistillObjective(Objective(student), teacher, temperature=2.0, w_kl=1.0, w_hard=0.0).train()
    assert not teacher.training                           # the teacher stays in eval mode
    loss, parts = obj(toks, valid)
    # by hand: positions whose next token is a target action
    m = valid[:, :-1] & valid[:, 1:] & student.target_action[toks["action"][:, 1:]]
    student.eval()
    t = teacher.title_logits(teacher.encode(toks)[-1][:, :-1][m].unsqueeze(0), 0)[0, :, N_SPECIAL:] / 2
    s = student.title_logits(student.encode(toks)[-1][:, :-1][m].unsqueeze(0), 0)[0, :, N_SPECIAL:] / 2
    want = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean() * 4
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4) and parts["kl"] == pytest.approx(float(want.detach()), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    torch.manual_seed(0)
    both = DistillObjective(Objective(student), teacher, w_kl=1.0, w_hard=0.5)
    loss2, parts2 = both(toks, valid)
    assert {"kl", "title_1", "action"} <= set(parts2)


def file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fmpipe_distill_saves_a_student_checkpoint_and_leaves_the_teacher_alone(world, home, one_thread):
    paths, day = clone_world(world, home)
    teacher_dir = current_model_dir(paths)
    pointer = (paths.models / "CURRENT.json").read_text()
    weights = file_hash(teacher_dir / checkpoint.WEIGHTS)
    out = distill_job.main([f"date={day}", "time_budget_s=3", "d_model=16", "max_len=32"])
    sdir = paths.models / out["model_version"]
    assert out["teacher"] == teacher_dir.name and out["model_version"].startswith(teacher_dir.name + "-student-")
    assert (paths.models / "CURRENT.json").read_text() == pointer
    assert file_hash(teacher_dir / checkpoint.WEIGHTS) == weights
    assert not [p for p in sdir.rglob("*") if p.suffix in (".pt", ".pkl", ".pickle", ".bin")]
    ids = embed.title_ids_by_idx(embed.read_vocab(paths))
    model, _, meta = checkpoint.load(sdir, expected_vocab=ids[2:])
    assert isinstance(model.cfg, ModelConfig) and (model.cfg.d_model, model.cfg.n_layers, model.cfg.max_len) == (16, 1, 32)
    assert meta["distilled_from"] == teacher_dir.name and meta["distill_config"]["d_model"] == 16
    assert out["valid"]["users"] == out["teacher_valid"]["users"] > 0
    # embeddable like any model
    grown, _, _ = embed.load_model(paths, embed.EmbedConfig(model_version=out["model_version"]), ids, torch.device("cpu"))
    assert grown.cfg.n_titles == len(ids)
    json.dumps(out, default=str)


def test_fmpipe_distill_bad_input_is_one_line(home, capsys):
    assert cli(["distill", "d_model=30", "n_heads=4"]) == 1
    err = capsys.readouterr().err
    assert "divisible by n_heads" in err and "Traceback" not in err
    assert cli(["distill"]) == 1
    assert "no history state" in capsys.readouterr().err
    assert cli(["distill", "temperature=0"]) == 1
