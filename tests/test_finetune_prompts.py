"""Fine-tuning a head and prompt tuning (issue 15, items 3-4): soft prompts train with the FM's
weights untouched (checksum), swap at inference, round-trip as tiny safetensors artefacts; a
fine-tuned head trains only itself and the top block of a copy; both jobs run end to end and
refuse bad input in one line."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fm import checkpoint
from fm.data import Sequences
from fm.finetune import TaskHead, fit_task, n_trainable, predict, task_sequences
from fm.prompts import PromptTask, load_prompt, save_prompt, weights_checksum
from fm.recipe import Recipe
from fm.schema import ACTIONS, N_SPECIAL, TOKEN_FIELDS, vocab_index
from jobs import finetune_task, prompt_tune
from jobs.cli import main as cli
from jobs.core.io import partition
from jobs.train import current_model_dir
from test_embed import clone_world
from test_specialists import tiny

COMPLETE = vocab_index(ACTIONS)["complete"]


def random_task(n: int = 48, seed: int = 0) -> Sequences:
    """Rows of 4-10 random events; label 1 when the row's last action is ``complete`` (learnable)."""
    rng = np.random.default_rng(seed)
    m = tiny()
    lens = rng.integers(4, 11, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    values = {f: rng.integers(N_SPECIAL, m.cfg.field_sizes.get(f, 30), offsets[-1]).astype(np.int32) for f in TOKEN_FIELDS}
    values["title"] = rng.integers(N_SPECIAL, 30, offsets[-1]).astype(np.int32)
    seqs = Sequences(np.arange(n, dtype=np.int64) + 100, offsets, values)
    y = (values["action"][offsets[1:] - 1] == COMPLETE).astype(np.int32)
    y[:2] = (0, 1)                                                # both classes present
    return task_sequences(seqs, seqs.profile_id, y)


def test_a_prefix_is_attended_to_and_cut_from_the_states():
    m = tiny()
    b = random_task().batch(np.arange(4), 16)
    plain = m.encode(b.tokens)
    assert all(torch.equal(a, c) for a, c in zip(plain, m.encode(b.tokens, prefix=None)))
    prompted = m.encode(b.tokens, prefix=torch.randn(3, m.cfg.d_model))
    assert [s.shape for s in prompted] == [s.shape for s in plain]
    assert not torch.allclose(prompted[-1], plain[-1])


def test_prompt_tuning_leaves_the_fm_weights_alone_and_round_trips(tmp_path):
    fm = tiny()
    data = random_task()
    train, valid = data.take(np.arange(32)), data.take(np.arange(32, 48))
    before = weights_checksum(fm)
    task = PromptTask(fm, n_tokens=2)
    assert n_trainable(task) == 2 * fm.cfg.d_model + fm.cfg.d_model + 1
    p0 = task.prompt.detach().clone()
    fit_task(task, train, valid, Recipe(time_budget_s=2, lr=1e-2, batch_size=8, n_evals=2))
    assert weights_checksum(fm) == before and not torch.equal(task.prompt.detach(), p0)
    want = predict(task, valid, fm.cfg.max_len)
    save_prompt(task, tmp_path / "p", {"task": "t", "model_version": "m1"})
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["prompt.json", "prompt.safetensors"]
    loaded, meta = load_prompt(fm, tmp_path / "p", "m1")
    np.testing.assert_allclose(predict(loaded, valid, fm.cfg.max_len), want, rtol=1e-5, atol=1e-6)
    assert meta["fm_weights_checksum"] == before
    with pytest.raises(ValueError, match="trained for model m1"):
        load_prompt(fm, tmp_path / "p", "m2")
    # a second prompt over the same model answers differently, the model still untouched
    other = PromptTask(fm, n_tokens=2, seed=5)
    assert not np.allclose(predict(other, valid, fm.cfg.max_len), want) and weights_checksum(fm) == before


def test_a_finetuned_head_trains_itself_and_the_top_block_of_a_copy():
    fm = tiny()
    before = weights_checksum(fm)
    data = random_task()
    head = TaskHead(fm, hidden=8, top_layers=1)
    fit_task(head, data.take(np.arange(32)), data.take(np.arange(32, 48)), Recipe(time_budget_s=2, batch_size=8, n_evals=2))
    assert weights_checksum(fm) == before                         # the served FM is never the one trained
    keys = set(head.trained_state())
    assert keys and all(k.startswith(("head.", "fm.blocks.1.", "fm.ln_f.")) for k in keys)
    assert any(k.startswith("fm.blocks.1.") for k in keys) and not any(k.startswith("fm.blocks.0.") for k in keys)
    assert n_trainable(TaskHead(fm, hidden=0, top_layers=0)) == fm.cfg.d_model + 1
    with pytest.raises(ValueError, match="top_layers"):
        TaskHead(fm, top_layers=3)


def file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_labels(paths, day, path) -> None:
    """Label per profile: its last event is a complete (input: its whole history state)."""
    t = pq.read_table(partition(paths.history, day), columns=["profile_id", "action"])
    y = [int(a[-1] == COMPLETE) for a in t["action"].to_pylist()]
    pq.write_table(pa.table({"profile_id": t["profile_id"], "label": y}), path)


def test_finetune_task_and_prompt_tune_jobs(world, home, tmp_path, one_thread):
    paths, day = clone_world(world, home)
    labels = tmp_path / "labels.parquet"
    write_labels(paths, day, labels)
    mdir = current_model_dir(paths)
    weights = file_hash(mdir / checkpoint.WEIGHTS)
    out = finetune_task.main(["task=completion", f"labels={labels}", "time_budget_s=2"])
    assert (mdir / "tasks" / "completion" / "task.safetensors").exists() and out["trainable_params"] > 0
    got = prompt_tune.main(["task=completion", f"labels={labels}", "time_budget_s=2", "n_tokens=2"])
    pdir = mdir / "prompts" / "completion"
    assert sorted(p.name for p in pdir.iterdir()) == ["prompt.json", "prompt.safetensors"]
    assert (pdir / "prompt.safetensors").stat().st_size < 4096
    d = checkpoint.read_meta(mdir)["model_config"]["d_model"]
    assert got["trainable_params"] == 2 * d + d + 1 < out["trainable_params"]
    assert file_hash(mdir / checkpoint.WEIGHTS) == weights


def test_task_jobs_refuse_bad_input_in_one_line(home, tmp_path, capsys):
    assert cli(["finetune-task", "labels=x.parquet"]) == 1
    assert "task=''" in capsys.readouterr().err
    assert cli(["prompt-tune", "task=Bad Name", "labels=x"]) == 1
    assert cli(["finetune-task", "task=t"]) == 1
    assert "labels=<table> is required" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"profile_id": [1, 2], "label": [0, 2]}), bad)
    home.history.mkdir(parents=True)
    assert cli(["finetune-task", "task=t", f"labels={bad}"]) == 1
    err = capsys.readouterr().err
    assert ("no history state" in err or "label must be 0 or 1" in err) and "Traceback" not in err
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        finetune_task.read_labels(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune_task.read_labels(str(tmp_path / "missing.parquet"))


def test_the_inference_encoder_with_a_prompt_equals_encode_with_the_prefix():
    from fm.extract import LayerSpec, ProfileEncoder, reference_embeddings
    from fm.stream import encode_sequences
    fm = tiny(rel_bias="pos")
    seqs = random_task(n=12)
    specs = (LayerSpec(1, "last"), LayerSpec(2, "last"), LayerSpec(2, "mean"))
    prompt = torch.randn(3, fm.cfg.d_model)
    want = reference_embeddings(fm, seqs, specs, prompt=prompt)
    got = encode_sequences(ProfileEncoder(fm, specs, prompt=prompt), seqs)
    plain = encode_sequences(ProfileEncoder(fm, specs), seqs)
    for s in specs:
        torch.testing.assert_close(torch.from_numpy(got[s.name]), torch.from_numpy(want[s.name]), rtol=1e-4, atol=1e-5)
        assert not np.allclose(got[s.name], plain[s.name])
    torch.testing.assert_close(torch.from_numpy(plain["emb_layer2_last"]),
                               torch.from_numpy(reference_embeddings(fm, seqs, specs)["emb_layer2_last"]), rtol=1e-4, atol=1e-5)
