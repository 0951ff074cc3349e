"""The CUDA paths: training under bf16 autocast, resumable state on the GPU, and batch inference in
bf16 against the float32 CPU reference. Skipped where no GPU is visible (CI); run on a lent GPU by
``bench/gpu_check.sh``. The tolerances are bf16's: operands carry 8 bits of mantissa, so a forward
pass lands 1e-3..1e-2 from float32 (relative norm), never NaN."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fm.extract import ProfileEncoder, default_layers
from fm.fit import FitConfig, fit
from fm.losses import Objective
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.schema import N_SPECIAL, TOKEN_FIELDS
from fm.stream import embed_batches
from tests.test_model import _validate_on_last, learnable_sequences, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_first_training_loss_on_cuda_matches_cpu():
    """Same weights, same batch: the bf16-autocast loss on the GPU is the float32 CPU loss to bf16 precision."""
    seqs = learnable_sequences()
    b = seqs.batch(np.arange(len(seqs)), 16)
    m = tiny_model(12, title_bias=True)
    obj = Objective(m)                        # full softmax: no negatives drawn from two different RNGs
    with torch.no_grad():
        cpu_loss = float(obj(b.tokens, b.valid)[0])
    obj.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_loss = float(obj({k: v.cuda() for k, v in b.tokens.items()}, b.valid.cuda())[0])
    assert np.isfinite(gpu_loss) and abs(gpu_loss - cpu_loss) < 2e-2 * abs(cpu_loss), (cpu_loss, gpu_loss)


def test_fit_learns_on_cuda_and_resumes_from_a_gpu_state(tmp_path):
    """The fit loop on the GPU: validation on GPU-resident weights, the weight average, a state saved
    mid-run and resumed (CUDA RNG included), and the kept model handed back on the CPU."""
    seqs = learnable_sequences()
    cfg = FitConfig(batch_size=16, lr=1e-2, max_epochs=20, budget_s=float("inf"), device="cuda",
                    checkpoint_every_s=1e-9, ema=0.9)
    make = lambda: (lambda m: (m, Objective(m, n_negatives=4)))(tiny_model(12, dropout=0.1))   # noqa: E731
    m, obj = make()
    untrained = _validate_on_last(m, seqs)()["ndcg@10"]
    first = fit(obj, seqs, 16, cfg, validate=_validate_on_last(m, seqs), state_dir=tmp_path / "s", interrupt_after=30)
    assert first.stopped_by == "interrupted"
    m, obj = make()
    out = fit(obj, seqs, 16, cfg, validate=_validate_on_last(m, seqs), state_dir=tmp_path / "s", resume=True)
    assert out.resumed and out.steps == 80 and np.isfinite([c[1] for c in out.curve]).all()
    assert min(c[1] for c in out.curve[-3:]) < 0.7 * out.curve[0][1], out.curve
    assert out.best["ndcg@10"] > untrained + 0.03, (untrained, out.best)
    assert all(p.device.type == "cpu" for p in m.parameters())


def _history(cfg: ModelConfig, n: int, rng: np.random.Generator) -> pa.Table:
    lens = rng.integers(1, cfg.max_len + 40, n)                 # some longer than the window
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    cols = {"profile_id": pa.array(rng.permutation(n).astype(np.int64))}
    for f in TOKEN_FIELDS:
        hi = cfg.n_titles if f == "title" else cfg.field_sizes[f]
        cols[f] = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(N_SPECIAL, hi, int(lens.sum()), dtype=np.int32)))
    return pa.table(cols)


def test_bf16_embeddings_on_cuda_match_the_float32_cpu_reference():
    """The embed job's streaming path on the GPU (bf16 autocast, length buckets) against the same
    path on the CPU in float32: every profile, every layer column, within bf16 precision."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_titles=500, content_dim=16, d_model=64, n_layers=2, n_heads=2, max_len=64, dropout=0.0)
    model = FoundationModel(cfg)
    init_weights(model)
    model.title.content.copy_(torch.randn(500, 16) / 4)
    model.eval()
    table = _history(cfg, 700, np.random.default_rng(1))
    specs = default_layers(cfg.n_layers)
    out = {}
    for dev in ("cpu", "cuda"):
        enc = ProfileEncoder(model, specs).to(dev)
        out[dev] = pa.Table.from_batches(list(embed_batches(enc, table.to_batches(max_chunksize=256), device=dev,
                                                            chunk_profiles=300)))
        model.cpu()
    assert out["cpu"]["profile_id"].equals(out["cuda"]["profile_id"])
    for name in (s.name for s in specs):
        ref = torch.tensor(np.stack(out["cpu"][name].to_numpy(zero_copy_only=False)))
        got = torch.tensor(np.stack(out["cuda"][name].to_numpy(zero_copy_only=False)))
        assert torch.isfinite(got).all() and _rel(got, ref) < 2e-2, (name, _rel(got, ref))
        assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.995, name

