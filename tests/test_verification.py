"""eval/verification.py: .bin round trip, the restricted unpickler, python-2 pickles, and the 10-fold accuracy
against a direct re-implementation of the protocol."""
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from eval import verification


def random_pairs(num_pairs, seed=0, size=112):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (2 * num_pairs, size, size, 3), dtype=np.uint8)
    issame = rng.random(num_pairs) < 0.5
    return images, issame


def test_write_load_round_trip(tmp_path):
    images, issame = random_pairs(3)
    path = tmp_path / "lfw.bin"
    verification.write_bin(path, images, issame)
    (data, flipped), loaded_issame = verification.load_bin(path)
    assert loaded_issame == [bool(x) for x in issame]
    expected = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))  # PNG is lossless, RGB kept
    assert torch.equal(data, expected)
    assert torch.equal(flipped, expected.flip(3))


def test_resized_when_not_112(tmp_path):
    images, issame = random_pairs(1, size=100)
    verification.write_bin(tmp_path / "x.bin", images, issame)
    (data, _), _ = verification.load_bin(tmp_path / "x.bin")
    assert data.shape == (2, 3, 112, 112)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_bin_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([RunsCode(str(marker)), b"x"], [True])))
    with pytest.raises(verification.BinLoadError, match="evil.bin.*not allowed"):
        verification.load_bin(path)
    assert not marker.exists()


def test_numpy_array_images_allowed_and_truncated_file_named(tmp_path):
    images, issame = random_pairs(1)
    verification.write_bin(tmp_path / "ok.bin", images, issame)
    with open(tmp_path / "ok.bin", "rb") as f:
        bins, same = pickle.load(f)
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([np.frombuffer(b, dtype=np.uint8) for b in bins], same)))
    (data, _), _ = verification.load_bin(path)
    assert torch.equal(data, torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)))
    (tmp_path / "cut.bin").write_bytes((tmp_path / "ok.bin").read_bytes()[:100])
    with pytest.raises(verification.BinLoadError, match="cut.bin"):
        verification.load_bin(tmp_path / "cut.bin")


def test_python2_pickle_with_byte_strings(tmp_path):
    images, issame = random_pairs(1)
    encoded = [bytes(verification.cv2.imencode(".png", img[:, :, ::-1])[1]) for img in images]
    # protocol 2 as written by python 2: images as BINSTRING (py2 str), non-ASCII bytes -> needs encoding='bytes'
    body = b"\x80\x02(" + b"".join(b"T" + struct.pack("<I", len(e)) + e for e in encoded) + b"l"
    body += b"(" + (b"\x88" if issame[0] else b"\x89") + b"l\x86."
    path = tmp_path / "py2.bin"
    path.write_bytes(body)
    (data, _), same = verification.load_bin(path)
    assert same == [bool(issame[0])]
    assert torch.equal(data, torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)))


def reference_accuracies(emb, issame, nfolds=10):
    """Direct loops: contiguous folds (sizes as KFold without shuffle), first best threshold on the other folds."""
    n = len(issame)
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    bounds = np.cumsum([0] + sizes)
    dist = [float(((emb[2 * i] - emb[2 * i + 1]) ** 2).sum()) for i in range(n)]
    thresholds = [t / 100 for t in range(400)]
    accs = []
    for k in range(nfolds):
        test = set(range(bounds[k], bounds[k + 1]))
        train = [i for i in range(n) if i not in test]
        best_t, best_acc = None, -1
        for t in thresholds:
            acc = sum((dist[i] < t) == issame[i] for i in train) / len(train)
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(sum((dist[i] < best_t) == issame[i] for i in test) / len(test))
    return accs


def test_fold_accuracies_match_reference():
    rng = np.random.default_rng(3)
    issame = rng.random(53) < 0.5
    emb = rng.normal(size=(106, 8))
    emb[1::2][issame] = emb[0::2][issame] + 0.6 * rng.normal(size=(int(issame.sum()), 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = verification.fold_accuracies(emb, issame)
    assert np.allclose(got, reference_accuracies(emb, list(issame)))
    assert 0.6 < got.mean() < 1.0


class MeanColour(nn.Module):
    """Embedding = per-channel means of the left and right image halves (flip-sensitive), plus a dummy param."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        w = x.shape[3] // 2
        return self.scale * torch.cat([x[..., :w].mean((2, 3)), x[..., w:].mean((2, 3))], dim=1)


def test_test_uses_flip_sum_and_xnorm(tmp_path):
    images, issame = random_pairs(20, seed=5, size=112)
    images[1::2][issame] = images[0::2][issame]  # genuine pairs are identical images
    verification.write_bin(tmp_path / "v.bin", images, issame)
    data_set = verification.load_bin(tmp_path / "v.bin")
    model = MeanColour()
    acc1, std1, acc2, std2, xnorm, (e, ef) = verification.test(data_set, model, batch_size=7)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)) / 127.5 - 1
    e_ref, ef_ref = model(x).detach().numpy(), model(x.flip(3)).detach().numpy()
    assert np.allclose(e, e_ref, atol=1e-5) and np.allclose(ef, ef_ref, atol=1e-5)
    norms = [np.linalg.norm(e_ref, axis=1).mean(), np.linalg.norm(ef_ref, axis=1).mean()]
    assert xnorm == pytest.approx(np.mean(norms), rel=1e-5)
    flip_sum = e_ref + ef_ref
    flip_sum /= np.linalg.norm(flip_sum, axis=1, keepdims=True)
    ref = reference_accuracies(flip_sum, list(issame))
    assert acc2 == pytest.approx(np.mean(ref)) and std2 == pytest.approx(np.std(ref))
    assert acc2 == 1.0  # identical genuine pairs have distance 0, random impostors do not
    assert model.training  # restored


def test_callback_evaluates_present_targets_only(tmp_path):
    import logging

    from utils.utils_callbacks import CallBackVerification

    images, issame = random_pairs(10, seed=2)
    images[1::2][issame] = images[0::2][issame]
    verification.write_bin(tmp_path / "lfw.bin", images, issame)
    callback = CallBackVerification(["lfw", "agedb_30"], str(tmp_path), logger=logging.getLogger("test"))
    assert callback.names == ["lfw"]  # agedb_30.bin is absent: skipped with a warning
    results = callback(100, MeanColour())
    assert [(name, acc) for name, acc, _, _ in results] == [("lfw", 1.0)]
    assert callback.best == [1.0]


@pytest.mark.parametrize("payload,message", [
    (([b"a", b"b"], [set()]), r"issame\[0\] is a set, not a boolean"),  # a flipped NEWTRUE opcode -> EMPTY_SET
    (([b"a", b"b"], [1]), r"issame\[0\] is a int, not a boolean"),
    (([b"a", b"b"], (True,), 3), r"expected a pickled 2-tuple"),
    (([b"a", b"b"], "1"), r"issame must be a list of booleans, got str"),
    ((b"ab", [True]), r"images must be a list of encoded images, got bytes"),
    (([b"a", 7], [True]), r"image 1 is a int, not encoded image bytes"),
    (([b"a", b"b", b"c"], [True]), r"3 images for 1 pairs"),
])
def test_malformed_structure_refused(tmp_path, payload, message):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(verification.BinLoadError, match=r"odd\.bin: " + message):
        verification.read_bin(path)


def test_numpy_bool_array_accepted(tmp_path):
    path = tmp_path / "npbool.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], np.array([True, False])), protocol=4))
    bins, issame = verification.read_bin(path)
    assert bins == [b"a", b"b", b"c", b"d"] and issame == [True, False] and all(type(x) is bool for x in issame)
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([1])), protocol=4))
    with pytest.raises(verification.BinLoadError, match=r"npbool\.bin: issame must be a list of booleans, got "
                                                        r"ndarray"):
        verification.read_bin(path)
