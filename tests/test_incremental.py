"""Incremental inference (``fm.incremental``): a KV cache gives a full re-encode's states while the
window has room, and says so when it does not."""
from __future__ import annotations

import pytest
import torch

from fm import incremental as inc
from fm.extract import LayerSpec, ProfileEncoder
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.schema import N_SPECIAL, PAD, TOKEN_FIELDS


def _model(rel_bias: str, max_len: int = 24) -> FoundationModel:
    torch.manual_seed(0)
    m = FoundationModel(ModelConfig(n_titles=60, d_model=32, n_heads=2, n_layers=2, max_len=max_len,
                                    rel_bias=rel_bias, emb_norm=True, title_bias=True))
    init_weights(m)
    if m.rel_bias is not None:                 # zero-initialised: make the bias matter in the test
        for p in m.rel_bias.parameters():
            p.data.normal_(0, 1.0)
    return m.eval()


def _windows(lengths: list[int], L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.full((len(lengths), L, len(TOKEN_FIELDS)), PAD, dtype=torch.long)
    sizes = {**ModelConfig(n_titles=60).field_sizes, "title": 60}
    for b, n in enumerate(lengths):
        for i, f in enumerate(TOKEN_FIELDS):
            t[b, :n, i] = torch.randint(N_SPECIAL, sizes[f], (n,), generator=g)
    return t


def _full(model: FoundationModel, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's inference encoder on whole windows: (last state, mean of layer 1)."""
    enc = ProfileEncoder(model, (LayerSpec(2, "last"), LayerSpec(1, "mean")))
    with torch.no_grad():
        last, mean1 = enc(tokens, lengths)
    return last, mean1


def _split(tokens: torch.Tensor, lengths: torch.Tensor, old: torch.Tensor):
    """Old part (first ``old[b]`` events) and new part (the rest) of each row, each right-padded."""
    first = [tokens[b, : old[b]] for b in range(len(old))]
    rest = [tokens[b, old[b]: lengths[b]] for b in range(len(old))]
    return inc.pad_tokens(first), inc.pad_tokens(rest)


@pytest.mark.parametrize("rel_bias", ["none", "pos", "pos_time"])
def test_extend_equals_a_full_re_encode_while_the_window_has_room(rel_bias):
    model = _model(rel_bias)
    lengths = torch.tensor([20, 7, 13, 24, 1])
    old = torch.tensor([18, 3, 13, 20, 0])                      # 0 new for row 2; row 4 all new
    tokens = _windows(lengths.tolist(), 24)
    (a, na), (b, nb) = _split(tokens, lengths, old)
    cache = inc.extend(model, inc.prefill(model, a, na), b, nb)
    last, mean1 = _full(model, tokens, lengths)
    assert torch.equal(cache.lengths, lengths)
    torch.testing.assert_close(cache.last[-1], last, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cache.mean(1), mean1, atol=2e-5, rtol=1e-5)
    # the cached keys are a full prefill's (what the next day builds on)
    ref = inc.prefill(model, tokens, lengths)
    for k, kr in zip(cache.keys, ref.keys):
        for r in range(len(lengths)):
            torch.testing.assert_close(k[r, :, : lengths[r]], kr[r, :, : lengths[r]], atol=2e-5, rtol=1e-5)


def test_several_small_days_in_a_row_stay_exact():
    model = _model("pos_time")
    lengths = torch.tensor([22, 16])
    tokens = _windows(lengths.tolist(), 24, seed=3)
    cache = inc.KVCache.empty(model, 2)
    for lo, hi in ((0, 10), (10, 13), (13, 16), (16, 22)):
        end = torch.minimum(lengths, torch.tensor(hi))
        start = torch.minimum(lengths, torch.tensor(lo))
        part, n = inc.pad_tokens([tokens[r, start[r]: end[r]] for r in range(2)])
        cache = inc.extend(model, cache, part, n)
    last, _ = _full(model, tokens, lengths)
    torch.testing.assert_close(cache.last[-1], last, atol=2e-5, rtol=1e-5)


def test_a_full_window_is_refused_and_slide_is_approximate():
    model = _model("pos", max_len=12)
    lengths = torch.tensor([12])
    tokens = _windows([15], 15, seed=5)
    cache = inc.prefill(model, tokens[:, :12], lengths)
    new, n = inc.pad_tokens([tokens[0, 12:15]])
    with pytest.raises(ValueError, match="max_len=12"):
        inc.extend(model, cache, new, n)
    kept = inc.slide(cache, torch.tensor([3]))
    assert kept.lengths.tolist() == [9]
    torch.testing.assert_close(kept.keys[0][:, :, :9], cache.keys[0][:, :, 3:12], atol=0, rtol=0)
    slid = inc.extend(model, kept, new, n)
    exact, _ = _full(model, tokens[:, 3:15], torch.tensor([12]))
    assert slid.lengths.tolist() == [12]
    drift = (slid.last[-1] - exact).abs().max().item()
    assert drift > 1e-4                         # not the re-encode: the kept keys/values are stale


def test_training_mode_is_refused():
    model = _model("pos").train()
    with pytest.raises(RuntimeError, match="eval mode"):
        inc.prefill(model, _windows([3], 3), torch.tensor([3]))


def test_cache_size_is_what_the_docstring_says():
    model = FoundationModel(ModelConfig(n_titles=10, d_model=64, n_layers=2, n_heads=2))
    assert inc.KVCache.empty(model, 1).nbytes_per_event() * 200 == 100 * 1024 * 2 * 1024 // 2048
