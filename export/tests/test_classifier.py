"""Classifier import: VirNucPro's `.pth` without running pickled code, state dicts, safetensors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from virnuc_export import classifier
from virnuc_export.__main__ import main as export_main

# MLPClassifier and its save exactly as VirNucPro's train.py has them, run as a script so that the
# pickle names `__main__.MLPClassifier` as the released 300_model.pth / 500_model.pth do.
TRAIN_PY = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from torch import nn
    import torch.nn.functional as F

    class MLPClassifier(nn.Module):
        def __init__(self, input_dim, hidden_dim, num_class):
            super(MLPClassifier, self).__init__()
            self.hidden_layer = nn.Linear(input_dim, hidden_dim)
            self.bn1 = nn.BatchNorm1d(hidden_dim)
            self.output_layer = nn.Linear(hidden_dim, num_class)
            self.dropout = nn.Dropout(0.5)
            self.init_weights()

        def init_weights(self):
            nn.init.xavier_uniform_(self.hidden_layer.weight)
            nn.init.xavier_uniform_(self.output_layer.weight)

        def forward(self, x):
            x = self.hidden_layer(x)
            x = self.bn1(x)
            x = F.relu(x)
            x = self.dropout(x)
            x = self.output_layer(x)
            return x

    out, input_dim = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    mlp_model = MLPClassifier(input_dim, 512, 2)
    # A few training steps so the BatchNorm running statistics are not the identity.
    opt = torch.optim.SGD(mlp_model.parameters(), lr=0.01)
    for _ in range(5):
        x = torch.randn(64, input_dim) * 2 + 0.5
        loss = F.cross_entropy(mlp_model(x), torch.randint(0, 2, (64,)))
        opt.zero_grad(); loss.backward(); opt.step()
    mlp_model.eval()
    torch.save(mlp_model, out + "/model.pth")
    torch.save(mlp_model.state_dict(), out + "/state_dict.pth")
    x = torch.randn(16, input_dim)
    with torch.no_grad():
        p = F.softmax(mlp_model(x), dim=1)
    np.save(out + "/x.npy", x.numpy())
    np.save(out + "/p.npy", p.numpy())
    """
)


@pytest.fixture(scope="module")
def virnucpro_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("virnucpro")
    script = d / "train_like.py"
    script.write_text(TRAIN_PY)
    r = subprocess.run([sys.executable, str(script), str(d), "1088"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d


def test_whole_module_pickle_loads_and_matches_torch(virnucpro_files: Path):
    c = classifier.load(virnucpro_files / "model.pth")
    assert c.source["kind"] == "whole-module-pickle"
    assert (c.input_dim, c.esm_dim, c.hidden_dim, c.eps) == (1088, 320, 512, 1e-5)
    x, p = np.load(virnucpro_files / "x.npy"), np.load(virnucpro_files / "p.npy")
    np.testing.assert_allclose(c.forward(x), p, atol=1e-6)
    # The running statistics were trained away from the identity, so eval-mode BatchNorm matters.
    assert np.abs(c.tensors["bn1.running_mean"]).max() > 1e-3


def test_state_dict_and_safetensors_load_the_same(virnucpro_files: Path, tmp_path: Path):
    whole = classifier.load(virnucpro_files / "model.pth")
    sd = classifier.load(virnucpro_files / "state_dict.pth")
    assert sd.source["kind"] == "state-dict"
    st_path = tmp_path / "mlp.safetensors"
    save_file({k: v for k, v in whole.tensors.items()}, str(st_path))
    st = classifier.load(st_path)
    assert st.source["kind"] == "safetensors"
    for k in classifier.TENSORS:
        np.testing.assert_array_equal(sd.tensors[k], whole.tensors[k])
        np.testing.assert_array_equal(st.tensors[k], whole.tensors[k])


def test_cli_writes_safetensors_and_json(virnucpro_files: Path, tmp_path: Path):
    out = tmp_path / "clf"
    assert export_main(["--classifier", str(virnucpro_files / "model.pth"), "--out", str(out)]) == 0
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["format"] == "virnuc-trt-classifier/1"
    assert (meta["input_dim"], meta["dnabert_dim"], meta["esm_dim"], meta["hidden_dim"]) == (
        1088,
        768,
        320,
        512,
    )
    assert meta["labels"] == ["others", "virus"] and meta["batch_norm_eps"] == 1e-5
    assert meta["source"]["sha256"] == classifier.sha256_file(virnucpro_files / "model.pth")
    assert meta["safetensors_sha256"] == classifier.sha256_file(out / "classifier.safetensors")
    tensors = load_file(str(out / "classifier.safetensors"))
    assert sorted(tensors) == sorted(classifier.TENSORS)
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert meta["tensors"] == {k: list(tensors[k].shape) for k in classifier.TENSORS}


def test_random_classifier_is_seeded(tmp_path: Path):
    a = classifier.random_classifier(320, 5)
    b = classifier.random_classifier(320, 5)
    c = classifier.random_classifier(320, 6)
    for k in classifier.TENSORS:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k])
    assert not np.array_equal(a.tensors["hidden_layer.weight"], c.tensors["hidden_layer.weight"])
    assert (
        export_main(["--random-classifier", "--esm-dim", "320", "--seed", "5", "--out", str(tmp_path)]) == 0
    )
    meta = json.loads((tmp_path / "classifier.json").read_text())
    assert meta["random_weights"] is True and meta["source"] == {
        "kind": "random",
        "path": None,
        "sha256": None,
        "seed": 5,
    }
    assert export_main(["--random-classifier", "--seed", "5", "--out", str(tmp_path)]) == 2


class _Evil:
    """Unpickling it runs a shell command that writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch-zip", "plain-pickle", "inside-state-dict"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path, container: str):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if container == "torch-zip":
        torch.save(_Evil(marker), path)
    elif container == "plain-pickle":
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    else:
        torch.save({"hidden_layer.weight": torch.zeros(2, 2), "x": _Evil(marker)}, path)
    with pytest.raises(classifier.ClassifierError, match=r"refused.*could run code.*system"):
        classifier.load(path)
    assert not marker.exists()
    assert export_main(["--classifier", str(path), "--out", str(tmp_path / "o")]) == 1
    assert not marker.exists() and not (tmp_path / "o" / "classifier.json").exists()


def test_other_files_and_bad_dims_are_refused(virnucpro_files: Path, tmp_path: Path):
    good = classifier.load(virnucpro_files / "state_dict.pth").tensors

    def refused(tensors: dict[str, np.ndarray], match: str) -> None:
        p = tmp_path / "bad.safetensors"
        save_file(tensors, str(p))
        with pytest.raises(classifier.ClassifierError, match=match):
            classifier.load(p)

    refused({**good, "output_layer.weight": np.zeros((3, 512), np.float32)}, "output_layer.weight has shape")
    refused(
        {**good, "hidden_layer.weight": np.zeros((512, 700), np.float32)}, "700 is not 768 .DNABERT-S. plus"
    )
    refused({k: v for k, v in good.items() if k != "bn1.running_var"}, "missing tensors")
    refused({**good, "bn1.running_var": -np.ones(512, np.float32)}, "negative")
    # Another module than MLPClassifier: a pickled nn.Sequential names torch classes outside the list.
    seq = tmp_path / "seq.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(1088, 2)), seq)
    with pytest.raises(classifier.ClassifierError, match="refused"):
        classifier.load(seq)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(classifier.ClassifierError, match="neither a PyTorch"):
        classifier.load(text)
    with pytest.raises(classifier.ClassifierError, match="no such file"):
        classifier.load(tmp_path / "missing.pth")
