"""The benchmark's PyTorch peers compute what HF transformers `EsmModel` computes, so that the GPU race is
between equal results. Reference: HF `EsmModel` (eager, fp32) run on each sequence alone, no padding,
with the exporter's seeded random weights (every parameter random). CPU, fp32, math attention."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from packed_esm import PackedEsm, PackedInputs, ffd_packs, padded_batches
from peers import TorchPeer, canonical_weights_torch, hf_model, read_embeddings_h5

from virnuc_export.config import ALPHABET, tokenize

AMINO = "LAGVSERTIDPKQNFYMHWC"
MODEL = "esm2_t6_8M"


@pytest.fixture(scope="module")
def model() -> tuple[dict, dict]:
    config, weights, _ = canonical_weights_torch(MODEL, seed=7)
    return config, weights


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    rng = random.Random(3)
    lengths = [1, 2, 7, 31, 64, 150, 166, 257, 300, 12, 90, 5]
    return ["".join(rng.choice(AMINO) for _ in range(n)) for n in lengths]


@pytest.fixture(scope="module")
def reference(model: tuple[dict, dict], sequences: list[str]) -> list[torch.Tensor]:
    """HF per-token final states of each sequence run alone: [L+2, H] each."""
    config, weights = model
    hf = hf_model(config, weights, torch.device("cpu"), torch.float32, "eager")
    out = []
    with torch.inference_mode():
        for s in sequences:
            ids = torch.tensor([tokenize(s)], dtype=torch.int64)
            out.append(hf(input_ids=ids).last_hidden_state[0])
    return out


def _means(states: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([s[1:-1].mean(0) for s in states])


def _cosines(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def _packed_states(packed: PackedEsm, tokens: list[list[int]], inputs: PackedInputs) -> list[torch.Tensor]:
    states = packed.hidden_states(inputs)
    bounds = inputs.cu_seqlens.tolist()
    return [states[a:b] for a, b in itertools.pairwise(bounds)]


def test_packed_forward_equals_hf_per_token_and_mean(model, sequences, reference):
    config, weights = model
    packed = PackedEsm(config, weights, "cpu", torch.float32)
    assert packed.attention_name == "math"
    tokens = [tokenize(s) for s in sequences]
    inputs = PackedInputs.from_token_lists(tokens)
    got = _packed_states(packed, tokens, inputs)
    for g, r in zip(got, reference, strict=True):
        rel = ((g - r).abs().max() / r.abs().max()).item()
        assert rel <= 1e-4, rel
    cos = _cosines(packed.mean_embeddings(inputs), _means(reference))
    assert cos.min() >= 0.99999, cos


def test_check_fails_without_rotary_positions(model, sequences, reference):
    """The comparison can fail: every position 0 (no rotary). (Positions that run on across the pack
    instead of restarting give the same result up to rounding: rotary attention depends only on relative
    positions, so that mistake cannot show here; the graph's own tests cover it.)"""
    config, weights = model
    packed = PackedEsm(config, weights, "cpu", torch.float32)
    inputs = PackedInputs.from_token_lists([tokenize(s) for s in sequences])
    inputs.position_ids = torch.zeros_like(inputs.position_ids)
    cos = _cosines(packed.mean_embeddings(inputs), _means(reference))
    assert cos.min() < 0.99999, cos


def test_check_fails_when_pooling_keeps_cls_and_eos(model, sequences, reference):
    config, weights = model
    packed = PackedEsm(config, weights, "cpu", torch.float32)
    tokens = [tokenize(s) for s in sequences]
    inputs = PackedInputs.from_token_lists(tokens)
    inputs.residue_index = torch.arange(inputs.input_ids.shape[0])
    inputs.residue_seq = torch.repeat_interleave(
        torch.arange(len(tokens)), torch.tensor([len(t) for t in tokens])
    )
    inputs.residue_count = torch.tensor([float(len(t)) for t in tokens])
    cos = _cosines(packed.mean_embeddings(inputs), _means(reference))
    assert cos.min() < 0.99999, cos


def test_check_fails_without_token_dropout_rescale(model, sequences, reference):
    config, weights = model
    packed = PackedEsm({**config, "token_dropout_scale": 1.0}, weights, "cpu", torch.float32)
    inputs = PackedInputs.from_token_lists([tokenize(s) for s in sequences])
    cos = _cosines(packed.mean_embeddings(inputs), _means(reference))
    assert cos.min() < 0.99999, cos


def test_check_fails_when_attention_crosses_sequences(model, sequences, reference):
    """One pack attended as one sequence (cu_seqlens ignored) contaminates every sequence."""
    config, weights = model
    packed = PackedEsm(config, weights, "cpu", torch.float32)
    inputs = PackedInputs.from_token_lists([tokenize(s) for s in sequences])
    whole = torch.tensor([0, inputs.input_ids.shape[0]], dtype=torch.int32)
    inner = packed.attention
    packed.attention = lambda q, k, v, cu, m, s: inner(q, k, v, whole, m, s)
    cos = _cosines(packed.mean_embeddings(inputs), _means(reference))
    assert cos.min() < 0.99999, cos


@pytest.mark.parametrize("kind,budget", [("torch-packed", 700), ("hf-eager", 600), ("hf-sdpa", 1024)])
def test_peer_end_to_end_fasta_to_h5_equals_hf(tmp_path: Path, model, sequences, reference, kind, budget):
    """FASTA → batches (FFD packs or padded batches) → HDF5, ids in input order, means equal HF's."""
    config, weights = model
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">s{i} desc\n{s[:60]}\n{s[60:]}\n" for i, s in enumerate(sequences)))
    peer = TorchPeer(kind, config, weights, torch.device("cpu"), "fp32", budget)
    stats, ids, emb = peer.run(fasta, tmp_path / "out.h5")
    assert stats.batches > 1  # several packs/batches, so that ordering across batches is exercised
    assert ids == [f"s{i}" for i in range(len(sequences))]
    assert stats.tokens == sum(len(s) + 2 for s in sequences)
    if kind == "torch-packed":
        assert stats.processed_tokens == stats.tokens
    else:
        assert stats.processed_tokens > stats.tokens  # padding was computed on
    h5_ids, h5_emb = read_embeddings_h5(tmp_path / "out.h5")
    assert h5_ids == ids
    np.testing.assert_array_equal(h5_emb, emb)
    cos = _cosines(emb, _means(reference))
    assert cos.min() >= 0.99999, cos


def test_ffd_packs_hold_every_sequence_once_within_budget():
    rng = random.Random(11)
    for _ in range(50):
        budget = rng.randint(50, 2000)
        lengths = [rng.randint(3, 1024) for _ in range(rng.randint(1, 200))]
        packs = ffd_packs(lengths, budget)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        for p in packs:
            assert len(p) == 1 or sum(lengths[i] for i in p) <= budget


def test_padded_batches_follow_fair_esm_budget_rule():
    rng = random.Random(5)
    for _ in range(50):
        budget = rng.randint(100, 5000)
        lengths = [rng.randint(3, 1024) for _ in range(rng.randint(1, 200))]
        batches = padded_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= budget
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat)  # length-sorted, as fair-esm


def test_alphabet_is_the_one_the_peers_use():
    # The peers pad with <pad> = 1 and pool without <cls> = 0 / <eos> = 2.
    assert ALPHABET[:3] == ["<cls>", "<pad>", "<eos>"]


@pytest.mark.parametrize("export_seed,equal", [(7, True), (8, False)])
def test_exported_graph_holds_the_peers_weights(tmp_path: Path, model, sequences, export_seed, equal):
    """virnuc-trt's graph (exporter, `masked` flavor, run by ONNX Runtime) and the peers use identical
    weights for the same seed — and a different seed is seen (the check can fail)."""
    import onnxruntime as ort
    import run
    from virnuc import export_model

    config, weights = model
    export_model(run.REPO, MODEL, export_seed, "masked", "fp32", tmp_path)
    inputs = PackedInputs.from_token_lists([tokenize(s) for s in sequences])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": inputs.input_ids.numpy(),
        "position_ids": inputs.position_ids.numpy(),
        "cu_seqlens": inputs.cu_seqlens.numpy(),
    }
    onnx_mean = session.run(["mean"], feeds)[0]
    peer_mean = PackedEsm(config, weights, "cpu", torch.float32).mean_embeddings(inputs)
    cos = _cosines(onnx_mean, peer_mean)
    assert (cos.min() >= 0.99999) == equal, cos
