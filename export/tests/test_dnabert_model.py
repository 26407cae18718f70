"""The packed DNABERT-S graph (masked flavor, fp32/fp16, fused) against the float64 numpy reference
written from the original MosaicBERT code, packs against single runs, and every check shown able to fail
through the builder's debug switches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dnabert_helpers import MAX_REL, MIN_COS, Dnabert, compare, random_tokens
from export_helpers import cosine, pack, run, session
from virnuc_export.dnabert_reference import alibi_head_slopes, alibi_slopes_f32
from virnuc_export.graph_dnabert import DEBUG_SWITCHES, alibi_slopes


def test_alibi_slopes_two_implementations_agree_and_match_the_paper_rule():
    # The builder's closed form and the reference's transcription of the original recursion.
    for n in range(1, 65):
        np.testing.assert_array_equal(alibi_slopes(n), alibi_slopes_f32(n), err_msg=str(n))
    expected = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    assert alibi_head_slopes(12) == pytest.approx(expected, rel=1e-15)
    assert alibi_slopes(12).dtype == np.float32


@pytest.mark.parametrize("lengths", [[1, 2, 3, 17], [200, 777], [2600]], ids=["short", "mid", "2600"])
def test_masked_matches_float64_reference_up_to_2600_tokens(dnabert_tiny: Dnabert, lengths: list[int]):
    rng = np.random.default_rng(sum(lengths))
    path = dnabert_tiny.export()
    for n in lengths:  # each sequence alone
        err, cos = compare(dnabert_tiny, path, [random_tokens(rng, n)])
        assert err <= MAX_REL and cos >= MIN_COS, (n, err, cos)


def test_masked_real_width_matches_reference_and_pack_of_20_equals_single_runs(dnabert: Dnabert):
    rng = np.random.default_rng(5)
    path = dnabert.export()
    seqs = [random_tokens(rng, int(n)) for n in rng.integers(1, 64, 20)]
    seqs[3], seqs[10] = random_tokens(rng, 1), random_tokens(rng, 2)
    err, cos = compare(dnabert, path, seqs)  # the pack vs each sequence's float64 reference
    assert err <= MAX_REL and cos >= MIN_COS, (err, cos)
    sess = session(path)
    packed = run(sess, pack(seqs))
    cu = np.cumsum([0] + [len(t) for t in seqs])
    for i, t in enumerate(seqs):
        single = run(sess, pack([t]))
        np.testing.assert_allclose(packed["mean"][i], single["mean"][0], rtol=1e-5, atol=1e-6)
        got = packed["hidden"][cu[i] : cu[i + 1]]
        np.testing.assert_allclose(got, single["hidden"], rtol=1e-5, atol=1e-5)


def test_positions_that_run_on_give_the_same_output(dnabert_tiny: Dnabert):
    """ALiBi's |i - j| is a difference of offsets inside a sequence; the graph takes them from cu_seqlens
    (as VarlenAttention's contract does), so position_ids that do not restart change nothing."""
    rng = np.random.default_rng(8)
    seqs = [random_tokens(rng, n) for n in (30, 5, 61)]
    sess = session(dnabert_tiny.export())
    a = run(sess, pack(seqs))
    b = run(sess, pack(seqs, restart_positions=False))
    np.testing.assert_array_equal(a["hidden"], b["hidden"])


@pytest.mark.parametrize("switch", sorted(DEBUG_SWITCHES))
def test_each_mutation_fails_the_comparison(dnabert_tiny: Dnabert, switch: str):
    """The same comparison as above, on a pack (so that sequences start after the first token), with one
    deliberate defect in the graph: it must fail."""
    rng = np.random.default_rng(13)
    seqs = [random_tokens(rng, n) for n in (40, 3, 90, 7)]
    err, cos = compare(dnabert_tiny, dnabert_tiny.export(debug=(switch,)), seqs)
    assert err > 10 * MAX_REL or cos < MIN_COS, (switch, err, cos)
    if switch != "pool_without_specials":  # that one changes only the pooling, not the states
        assert err > 10 * MAX_REL, (switch, err)


def test_fused_form_matches_reference(dnabert: Dnabert):
    rng = np.random.default_rng(21)
    seqs = [random_tokens(rng, n) for n in (1, 9, 150)]
    err, cos = compare(dnabert, dnabert.export(fused=True), seqs)
    assert err <= MAX_REL and cos >= MIN_COS, (err, cos)


def test_fp16_against_fp32_cosine(dnabert: Dnabert):
    rng = np.random.default_rng(34)
    seqs = [random_tokens(rng, n) for n in (2, 31, 257, 600)]
    feeds = pack(seqs)
    f32 = run(session(dnabert.export()), feeds)
    f16 = run(session(dnabert.export(precision="fp16")), feeds)
    cos = min(cosine(f16["mean"][i], f32["mean"][i]) for i in range(len(seqs)))
    assert cos >= 0.999, cos
    assert f16["mean"].dtype == np.float32 and not np.array_equal(f16["mean"], f32["mean"])


def test_repr_layer_zero_is_the_embedding_layer_norm(dnabert: Dnabert):
    from virnuc_export import dnabert_reference

    rng = np.random.default_rng(2)
    t = random_tokens(rng, 20)
    out = run(session(dnabert.export(repr_layer=0)), pack([t]))
    w = {k: v.astype(np.float64) for k, v in dnabert.source.items()}
    ref = dnabert_reference.forward(w, dnabert.source.config, t, layers=0)
    assert np.abs(out["hidden"] - ref).max() / np.abs(ref).max() <= MAX_REL
    assert math.isclose(cosine(out["mean"][0], ref.mean(axis=0)), 1.0, abs_tol=1e-6)
