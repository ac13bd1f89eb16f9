"""eval_ijbc.py end to end on the generated IJB-C fixture, on CPU, with a tiny real ViT from backbones."""
import csv
import importlib
import os
import sys

import numpy as np
import pytest
import torch

import eval_ijbc
from backbones import get_model
from eval import ijb
from tests.ijb_fixture import make_ijb_fixture
from tools.torch2onnx import export_onnx

TINY = '{"embed_dim": 32, "depth": 1, "num_features": 24}'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = str(root / "IJBC")
    make_ijb_fixture(data)
    torch.manual_seed(0)
    weights = str(root / "model.pt")
    torch.save(get_model("vit_t", embed_dim=32, depth=1, num_features=24).state_dict(), weights)
    return root, data, weights


def run(data, weights, result_dir, *extra):
    eval_ijbc.main(["--model-prefix", weights, "--image-path", data, "--result-dir", result_dir,
                    "--network", "vit_t", "--network-kwargs", TINY, "--device", "cpu", "--num-workers", "0",
                    "--batch-size", "16", *extra])


def read_csv_row(path):
    with open(path) as f:
        header, row = list(csv.reader(f))
    return header, row


def test_import_has_no_side_effects():
    argv = sys.argv[:]
    importlib.reload(eval_ijbc)
    assert sys.argv == argv and not hasattr(eval_ijbc, "args")


def test_cli_end_to_end(setup, capsys):
    root, data, weights = setup
    result_dir = str(root / "res")
    features = str(root / "feats.npy")
    run(data, weights, result_dir, "--save-features", features)
    out = capsys.readouterr().out
    job = os.path.join(result_dir, "insightface")
    for name in ("ijbc.npy", "ijbc.pdf", "ijbc_tar_far.md", "ijbc_tar_far.csv", "ijbc_roc.png", "ijbc_roc.npz",
                 "ijbc_1n.md", "ijbc_1n.csv"):
        assert os.path.getsize(os.path.join(job, name)) > 0, name
    assert open(os.path.join(job, "ijbc.pdf"), "rb").read(5) == b"%PDF-"
    assert "| ijbc-IJBC |" in out and "1:N identification" in out

    # the saved table equals the stages recomputed from the saved features (24-d model -> [N, 48])
    feats = np.load(features)
    meta = ijb.read_meta(data)
    assert feats.shape == (len(meta["names"]), 48)
    ids, tfeats = ijb.image_to_template_features(feats, meta["faceness"], meta["templates"], meta["medias"])
    scores = ijb.pair_scores(ids, tfeats, meta["t1"], meta["t2"])
    np.testing.assert_allclose(np.load(os.path.join(job, "ijbc.npy")), scores, atol=1e-12)
    header, row = read_csv_row(os.path.join(job, "ijbc_tar_far.csv"))
    assert header == ["Methods", "1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    assert row[0] == "ijbc-IJBC"
    np.testing.assert_allclose([float(v) for v in row[1:]], ijb.tar_at_far(meta["label"], scores)[0] * 100,
                               atol=1e-6)
    md = open(os.path.join(job, "ijbc_tar_far.md")).read().splitlines()
    assert md[2].split("|")[2].strip() == f"{float(row[1]):.2f}"
    header, row = read_csv_row(os.path.join(job, "ijbc_1n.csv"))
    assert header[1:] == ["rank-1", "rank-5", "rank-10", "TPIR@FPIR=0.01", "TPIR@FPIR=0.1"]
    assert all(0 <= float(v) <= 100 for v in row[1:])

    # reusing the features with other switches and no 1:N files: no model needed, 1:N skipped in one line
    for name in os.listdir(os.path.join(data, "meta")):
        if "_1N_" in name:
            os.rename(os.path.join(data, "meta", name), os.path.join(str(root), name))
    try:
        eval_ijbc.main(["--features", features, "--image-path", data, "--result-dir", result_dir,
                        "--job", "reuse", "--no-norm-score", "--no-detector-score", "--flip-mode", "concat"])
    finally:
        for name in os.listdir(str(root)):
            if "_1N_" in name:
                os.rename(os.path.join(str(root), name), os.path.join(data, "meta", name))
    out = capsys.readouterr().out
    assert sum("1:N identification skipped" in line for line in out.splitlines()) == 1
    ids, tfeats = ijb.image_to_template_features(feats, meta["faceness"], meta["templates"], meta["medias"],
                                                 flip_mode="concat", use_norm_score=False, use_detector_score=False)
    np.testing.assert_allclose(np.load(os.path.join(result_dir, "reuse", "ijbc.npy")),
                               ijb.pair_scores(ids, tfeats, meta["t1"], meta["t2"]), atol=1e-12)
    assert not os.path.exists(os.path.join(result_dir, "reuse", "ijbc_1n.csv"))

    # several result folders in one ROC figure
    from tools import plot_roc
    plot_roc.main([job, os.path.join(result_dir, "reuse"), "-o", str(root / "both.png")])
    assert os.path.getsize(str(root / "both.png")) > 0


def test_checkpoint_that_does_not_fit_network(setup, tmp_path):
    _, data, _ = setup
    wrong = str(tmp_path / "two_blocks.pt")
    torch.save(get_model("vit_t", embed_dim=32, depth=2, num_features=24).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"two_blocks.pt does not fit --network vit_t.*unexpected keys: blocks\.1\."):
        run(data, wrong, str(tmp_path / "res"))


def test_checkpoint_is_loaded_weights_only(setup, tmp_path):
    _, data, _ = setup
    unsafe = str(tmp_path / "unsafe.pt")
    torch.save({"weight": torch.zeros(1), "extra": np.zeros(2)}, unsafe)  # numpy objects need full unpickling
    with pytest.raises(ValueError, match=r"unsafe\.pt: .*weights_only"):
        run(data, unsafe, str(tmp_path / "res"))


def test_features_with_wrong_row_count(setup, tmp_path):
    _, data, _ = setup
    bad = str(tmp_path / "bad.npy")
    np.save(bad, np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"bad.npy: expected features \[40, 2F\]"):
        eval_ijbc.main(["--features", bad, "--image-path", data, "--result-dir", str(tmp_path / "res")])


def test_ijbb_target_switches_file_names(tmp_path, capsys):
    data = str(tmp_path / "IJBB")
    make_ijb_fixture(data, target="IJBB", num_ids=2, templates_per_id=2)
    weights = str(tmp_path / "model.pt")
    torch.save(get_model("vit_t", embed_dim=32, depth=1, num_features=24).state_dict(), weights)
    run(data, weights, str(tmp_path / "res"), "--target", "IJBB", "--job", "b")
    assert "galleries S1/S2" in capsys.readouterr().out
    files = sorted(os.listdir(str(tmp_path / "res" / "b")))
    assert files == ["ijbb.npy", "ijbb.pdf", "ijbb_1n.csv", "ijbb_1n.md", "ijbb_roc.npz", "ijbb_roc.png",
                     "ijbb_tar_far.csv", "ijbb_tar_far.md"]
    assert read_csv_row(str(tmp_path / "res" / "b" / "ijbb_tar_far.csv"))[1][0] == "ijbb-IJBB"


def test_onnx_model_gives_the_same_table(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    root, data, weights = setup
    model = get_model("vit_t", embed_dim=32, depth=1, num_features=24)
    model.load_state_dict(torch.load(weights, weights_only=True))
    path = str(tmp_path / "model.onnx")
    export_onnx(model, path)
    run(data, path, str(tmp_path / "onnx"), "--onnx", "--save-features", str(tmp_path / "onnx_feats.npy"))
    run(data, weights, str(tmp_path / "torch"), "--save-features", str(tmp_path / "torch_feats.npy"))
    np.testing.assert_allclose(np.load(str(tmp_path / "onnx_feats.npy")), np.load(str(tmp_path / "torch_feats.npy")),
                               atol=1e-4)
