"""The `masked` flavor on ONNX Runtime CPU against HF transformers `EsmModel`, each sequence alone."""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import Model, cosine, pack, random_protein, residue_mean, run, session, token_rel_error
from virnuc_export.config import MASK, tokenize

MAX_REL = 1e-4
MIN_COS = 0.99999
# 1 to 1022 residues: the ends of the range and a spread between; packs kept ≤ ~2100 tokens (O(T²) mask).
LENGTH_PACKS = [[1, 2, 3, 17, 64, 200, 511, 777], [1000], [1022]]


def compare(model: Model, out: dict[str, np.ndarray], tokens: list[list[int]], repr_layer: int | None = None):
    """(worst per-token relative error, worst mean cosine) of a packed run against per-sequence HF runs."""
    worst_rel, worst_cos = 0.0, 1.0
    cu = np.cumsum([0] + [len(t) for t in tokens])
    for i, t in enumerate(tokens):
        ref = model.reference(t, repr_layer)
        worst_rel = max(worst_rel, token_rel_error(out["hidden"][cu[i] : cu[i + 1]], ref))
        worst_cos = min(worst_cos, cosine(out["mean"][i], residue_mean(ref)))
    return worst_rel, worst_cos


@pytest.mark.parametrize("fused", [False, True], ids=["standard-ops", "fused"])
def test_lengths_1_to_1022_match_hf(t6: Model, fused: bool):
    rng = np.random.default_rng(11)
    sess = session(t6.export(attention="masked", fused=fused))
    for lengths in LENGTH_PACKS:
        tokens = [tokenize(random_protein(rng, n)) for n in lengths]
        rel, cos = compare(t6, run(sess, pack(tokens)), tokens)
        assert rel <= MAX_REL, (lengths, rel)
        assert cos >= MIN_COS, (lengths, cos)


def test_pack_of_24_equals_per_sequence_runs(t6: Model):
    rng = np.random.default_rng(12)
    sess = session(t6.export(attention="masked", fused=True))
    tokens = [tokenize(random_protein(rng, int(n))) for n in rng.integers(1, 120, size=24)]
    packed = run(sess, pack(tokens))
    cu = np.cumsum([0] + [len(t) for t in tokens])
    for i, t in enumerate(tokens):
        alone = run(sess, pack([t]))
        np.testing.assert_allclose(packed["hidden"][cu[i] : cu[i + 1]], alone["hidden"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(packed["mean"][i], alone["mean"][0], rtol=1e-5, atol=1e-6)
    rel, cos = compare(t6, packed, tokens)
    assert rel <= MAX_REL and cos >= MIN_COS, (rel, cos)


def wrong_boundaries(tokens: list[list[int]]) -> np.ndarray:
    """Positions restarting at the wrong tokens: boundaries computed from residue counts (no <cls>/<eos>),
    the off-by-two bug a packer can make; every sequence after the first gets a jump mid-sequence."""
    total = sum(len(t) for t in tokens)
    pos = np.empty(total, dtype=np.int64)
    starts = np.cumsum([0] + [len(t) - 2 for t in tokens[:-1]])
    for i in range(total):
        pos[i] = i - starts[np.searchsorted(starts, i, side="right") - 1]
    return pos


def test_comparison_fails_when_positions_restart_wrongly(t6: Model):
    rng = np.random.default_rng(13)
    sess = session(t6.export(attention="masked", fused=True))
    tokens = [tokenize(random_protein(rng, n)) for n in (30, 40, 50)]
    feeds = pack(tokens)
    good = compare(t6, run(sess, feeds), tokens)
    assert good[0] <= MAX_REL and good[1] >= MIN_COS
    for bad_positions in (wrong_boundaries(tokens), np.zeros_like(feeds["position_ids"])):
        bad = compare(t6, run(sess, {**feeds, "position_ids": bad_positions}), tokens)
        assert bad[0] > 100 * MAX_REL, bad


def test_positions_running_on_are_only_a_rounding_matter(t6: Model):
    """Rotary attention depends on position differences only, so positions that do not restart (a
    constant offset per sequence) change ESM-2's output by float32 rounding of the angles alone; the
    error grows with the offset. This is why the runtime restarts them: it keeps angles small."""
    rng = np.random.default_rng(18)
    sess = session(t6.export(attention="masked", fused=True))
    tokens = [tokenize(random_protein(rng, 200))]
    ref = t6.reference(tokens[0])
    errors = []
    for offset in (0, 16000, 1_000_000):
        feeds = pack(tokens)
        out = run(sess, {**feeds, "position_ids": feeds["position_ids"] + offset})
        errors.append(token_rel_error(out["hidden"], ref))
    assert errors[0] <= MAX_REL and errors[1] <= MAX_REL, errors
    assert errors[2] > MAX_REL and errors[2] > 10 * errors[1], errors


def test_comparison_fails_without_token_dropout_rescale(t6: Model):
    rng = np.random.default_rng(14)
    tokens = [tokenize(random_protein(rng, n)) for n in (30, 60)]
    good = compare(t6, run(session(t6.export(attention="masked", fused=True)), pack(tokens)), tokens)
    path = t6.export(attention="masked", fused=True, skip_token_dropout_rescale=True)
    bad = compare(t6, run(session(path), pack(tokens)), tokens)
    assert good[0] <= MAX_REL and good[1] >= MIN_COS
    assert bad[0] > 100 * MAX_REL, bad


def test_mask_tokens_follow_hf_token_dropout(t6: Model):
    """<mask> embeddings are zeroed and the sequence rescaled by 0.88 / (1 - mask ratio), per sequence."""
    rng = np.random.default_rng(15)
    plain = tokenize(random_protein(rng, 40))
    masked = tokenize(random_protein(rng, 30))
    masked[3] = masked[10] = masked[11] = MASK
    tokens = [plain, masked, tokenize(random_protein(rng, 5))]
    rel, cos = compare(t6, run(session(t6.export(attention="masked", fused=False)), pack(tokens)), tokens)
    assert rel <= MAX_REL and cos >= MIN_COS, (rel, cos)


@pytest.mark.parametrize("repr_layer", [0, 3, 6])
def test_repr_layer_matches_hf_intermediate_states(t6: Model, repr_layer: int):
    rng = np.random.default_rng(16)
    tokens = [tokenize(random_protein(rng, n)) for n in (9, 33)]
    for fused in (False, True):
        path = t6.export(attention="masked", fused=fused, repr_layer=repr_layer)
        rel, cos = compare(t6, run(session(path), pack(tokens)), tokens, repr_layer)
        assert rel <= MAX_REL and cos >= MIN_COS, (fused, rel, cos)
    # The last layer carries the final layer norm, an intermediate one does not: they must differ.
    if repr_layer == 3:
        assert token_rel_error(t6.reference(tokens[0], 3), t6.reference(tokens[0], 6)) > 0.1


def test_fp16_export_close_to_fp32(t6: Model):
    rng = np.random.default_rng(17)
    tokens = [tokenize(random_protein(rng, n)) for n in (1, 50, 300, 700)]
    feeds = pack(tokens)
    for fused in (False, True):
        fp32 = run(session(t6.export(attention="masked", fused=fused)), feeds)
        fp16 = run(session(t6.export(attention="masked", fused=fused, precision="fp16")), feeds)
        cos = [cosine(fp16["mean"][i], fp32["mean"][i]) for i in range(len(tokens))]
        assert min(cos) >= 0.999, cos
        assert np.abs(fp16["mean"] - fp32["mean"]).max() > 0  # it really ran in half precision


def test_zero_residue_sequence_has_zero_mean(tiny: Model):
    sess = session(tiny.export(attention="masked"))
    out = run(sess, pack([[0, 2], tokenize("MKV")]))
    assert np.all(out["mean"][0] == 0) and np.all(np.isfinite(out["mean"]))
    assert np.abs(out["mean"][1]).max() > 0
