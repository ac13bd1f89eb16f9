"""tools/reproduce_zoo.py on the tiny IJB-C fixture with two tiny networks saved under zoo file names."""
import csv
import dataclasses
import os

import numpy as np
import pytest
import torch

import eval_ijbc
from backbones import get_model
from eval.zoo import ZOO, markdown_table
from tests.ijb_fixture import make_ijb_fixture
from tools import reproduce_zoo

TINY = {"embed_dim": 32, "depth": 1, "num_features": 24}
# test-only zoo: the real entries, with the networks of the two present files shrunk to the tiny ViT
PRESENT = (0, 4)
TEST_ZOO = tuple(dataclasses.replace(e, network="vit_t", network_kwargs=TINY) if i in PRESENT else e
                 for i, e in enumerate(ZOO))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    data, zoo_dir = str(root / "IJBC"), root / "downloads"
    make_ijb_fixture(data)
    zoo_dir.mkdir()
    for seed, i in enumerate(PRESENT):
        torch.manual_seed(seed)
        state = get_model("vit_t", **TINY).state_dict()
        # one plain state_dict (released layout), one training checkpoint
        torch.save(state if seed == 0 else {"state_dict_backbone": state, "epoch": 1},
                   str(zoo_dir / TEST_ZOO[i].file))
    return root, data, str(zoo_dir)


def reference_tar(data, source, result_dir):
    """TAR (%) that eval_ijbc.py itself writes (full-precision CSV) for a checkpoint, or for saved features."""
    given = ["--features", source] if source.endswith(".npy") else ["--model-prefix", source]
    eval_ijbc.main([*given, "--image-path", data, "--result-dir", result_dir, "--network", "vit_t",
                    "--network-kwargs", '{"embed_dim": 32, "depth": 1, "num_features": 24}', "--device", "cpu",
                    "--num-workers", "0"])
    with open(os.path.join(result_dir, "insightface", "ijbc_tar_far.csv")) as f:
        _, row = list(csv.reader(f))
    return np.array([float(v) for v in row[1:]])


def run(zoo_dir, data, out):
    return reproduce_zoo.main(["--zoo-dir", zoo_dir, "--image-path", data, "-o", out, "--device", "cpu",
                               "--num-workers", "0", "--batch-size", "16"], zoo=TEST_ZOO)


def test_table_lists_measured_and_missing(setup, capsys, monkeypatch):
    root, data, zoo_dir = setup
    out = str(root / "out")
    results = run(zoo_dir, data, out)
    printed = capsys.readouterr().out

    assert [e for e, _ in results] == list(TEST_ZOO)
    measured = {i: tar for i, (_, tar) in enumerate(results) if tar is not None}
    assert sorted(measured) == list(PRESENT)
    for i in PRESENT:
        cached = os.path.join(out, os.path.splitext(TEST_ZOO[i].file)[0], "features.npy")
        # the first from the checkpoint (extraction and scoring), the second from our cached features (scoring)
        ref = reference_tar(data, os.path.join(zoo_dir, TEST_ZOO[i].file) if i == PRESENT[0] else cached,
                            str(root / f"ref{i}"))
        np.testing.assert_array_equal(measured[i], ref)

    with open(os.path.join(out, "zoo_ijbc.md")) as f:
        md = f.read()
    assert md in printed
    lines = md.splitlines()
    for i, entry in enumerate(TEST_ZOO):
        row = next(line for line in lines if f"| {entry.file} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")][4:]
        if i in PRESENT:
            assert cells == [f"{m:.2f} / {p:.2f} ({m - p:+.2f})" for m, p in zip(measured[i], entry.ijbc_tar)]
        else:
            assert cells == [f"— / {p:.2f}" for p in entry.ijbc_tar]
    missing = [e.file for i, e in enumerate(TEST_ZOO) if i not in PRESENT]
    assert f"Missing: {', '.join(missing)}" in lines

    with open(os.path.join(out, "zoo_ijbc.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["measured" if i in PRESENT else "missing" for i in range(len(TEST_ZOO))]
    for i in PRESENT:
        assert float(rows[i]["measured_1e-4"]) == measured[i][2]
        assert float(rows[i]["published_1e-4"]) == TEST_ZOO[i].ijbc_tar[2]
        assert float(rows[i]["difference_1e-4"]) == measured[i][2] - TEST_ZOO[i].ijbc_tar[2]
    assert rows[1]["measured_1e-4"] == "" and float(rows[1]["published_1e-4"]) == TEST_ZOO[1].ijbc_tar[2]

    # a re-run reads the cached features and only re-scores: extraction must not be called
    def no_extraction(*args):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(eval_ijbc, "extract_features", no_extraction)
    again = run(zoo_dir, data, out)
    assert "features cached" in capsys.readouterr().out
    for (_, a), (_, b) in zip(results, again):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_cache_is_refreshed_when_the_checkpoint_changes(setup, tmp_path, monkeypatch):
    _, data, zoo_dir = setup
    entry = TEST_ZOO[PRESENT[0]]
    args = reproduce_zoo.eval_args(entry, os.path.join(zoo_dir, entry.file), data, 16, 0, "none")
    meta = {"names": np.arange(5)}
    calls = []

    def fake_extract(a, m, device):  # stands for the real extraction, which the test above checks
        calls.append(1)
        return np.full((5, 4), len(calls), dtype=np.float32)

    monkeypatch.setattr(eval_ijbc, "extract_features", fake_extract)

    def get():
        return reproduce_zoo.cached_features(args, meta, str(tmp_path), torch.device("cpu"))

    feats, how = get()
    assert how == "extracted" and (feats == 1).all()
    feats, how = get()
    assert how == "cached" and (feats == 1).all() and len(calls) == 1
    args.network_kwargs = dict(TINY)  # equal values: still cached
    assert get()[1] == "cached"
    args.amp = "bf16"  # another protocol: extracted again
    assert get()[1] == "extracted" and len(calls) == 2
    os.utime(args.model_prefix, ns=(0, 0))  # another file under the same name
    feats, how = get()
    assert how == "extracted" and (feats == 3).all()
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_zoo_markdown_matches_published_values():
    table = markdown_table().splitlines()
    assert table[0] == "| Training data | Model | `--network` | IJB-C 1e-6 | 1e-5 | 1e-4 | 1e-3 | 1e-2 | 1e-1 |"
    assert table[2].startswith("| MS1MV2 | [TransFace-S](https://drive.google.com/file/d/"
                               "1UZWCg7jNESDv8EWs7mxQSswCMGbAZNF4/view?usp=share_link) |")
    assert table[2].endswith("| `vit_s_dp005_mask_0` | 86.75 | 93.87 | 96.45 | 97.51 | 98.34 | 98.99 |")
    assert table[-1].endswith("| `vit_l_dp005_mask_005` | 89.71 | 96.29 | 97.61 | 98.26 | 98.64 | 99.19 |")
    assert [e.file for e in ZOO if e.data == "Glint360K" and e.model == "TransFace-L"] == \
        ["glint360k_model_TransFace_L.pt"]  # the name the official README uses
