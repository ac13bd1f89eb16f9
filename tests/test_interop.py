"""Interop: ONNX export (tools/torch2onnx.py), single-image inference (tools/inference.py), strict loading
(utils/model_loading.py). Tiny models only; CPU."""
import argparse
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform

from backbones import get_model
from utils.cli import UserError
from utils.model_loading import load_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=32, depth=1, num_features=32)
TINY_JSON = '{"embed_dim": 32, "depth": 1, "num_features": 32}'
# ArcFace 5-point template, written out here so the test does not depend on utils/face_align.py for its reference.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]])


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = get_model("vit_t", **TINY)
    with torch.no_grad():  # non-trivial BN statistics so eval mode is really exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ---------------------------------------------------------------- ONNX export

@pytest.mark.parametrize("network", ["vit", "mbf"])
def test_onnx_export_matches_torch_with_dynamic_batch(network, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from tools.torch2onnx import export_onnx

    if network == "vit":
        model = tiny_vit()
    else:
        torch.manual_seed(0)
        model = get_model("mbf", num_features=32).eval()
    model.train()  # export must switch to eval and restore the caller's mode
    path = export_onnx(model, str(tmp_path / "model.onnx"))
    assert model.training

    graph = onnx.load(path).graph
    assert [o.name for o in graph.output] == ["embedding"]
    assert [i.name for i in graph.input] == ["data"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    model.eval()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        data = torch.rand(batch, 3, 112, 112, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(data).numpy()
        got = session.run(None, {"data": data.numpy()})[0]
        assert got.shape == (batch, 32)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_export_without_onnx_raises_clear_import_error(tmp_path, monkeypatch):
    from tools.torch2onnx import export_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match="pip install onnx"):
        export_onnx(tiny_vit(), str(tmp_path / "model.onnx"))
    assert not (tmp_path / "model.onnx").exists()


def test_train_export_hook_only_warns_without_onnx(tmp_path, monkeypatch, caplog):
    import train

    monkeypatch.setitem(sys.modules, "onnx", None)
    cfg = argparse.Namespace(output=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="interop_test"):
        train.export_onnx(cfg, tiny_vit(), logging.getLogger("interop_test"))
    assert "ONNX export skipped" in caplog.text
    assert not (tmp_path / "model.onnx").exists()


def test_torch2onnx_cli_with_check(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from tools import torch2onnx

    checkpoint = tmp_path / "model.pt"
    torch.save(tiny_vit().state_dict(), checkpoint)
    monkeypatch.setattr(sys, "argv", ["torch2onnx.py", str(checkpoint), "--network", "vit_t",
                                      "--network-kwargs", TINY_JSON, "--check"])
    torch2onnx.main()
    out = capsys.readouterr().out
    assert (tmp_path / "model.onnx").exists()
    assert float(out.split("max |onnxruntime - torch| = ")[1].split()[0]) < 1e-4


# ---------------------------------------------------------------- inference

def synthetic_face():
    """A smooth 112x112 BGR image with dark blobs at the template points (so alignment errors would show)."""
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    image = np.stack([120 + 60 * np.sin(xs / 9), 100 + 50 * np.cos(ys / 11), 90 + 40 * np.sin((xs + ys) / 13)], -1)
    for x, y in TEMPLATE:
        image -= 80 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 30)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def reference_embedding(model, bgr_images_with_landmarks):
    """By hand: least-squares similarity to the template, warp (border 0), BGR->RGB, (v/255-0.5)/0.5."""
    batch = []
    for image, points in bgr_images_with_landmarks:
        if points is not None:
            matrix = SimilarityTransform.from_estimate(points, TEMPLATE).params[:2]
            image = cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0)
        rgb = image[..., ::-1].astype(np.float32)
        batch.append(((rgb / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    with torch.no_grad():
        return model(torch.from_numpy(np.stack(batch))).numpy()


def test_inference_end_to_end_pt_and_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from tools.torch2onnx import export_onnx

    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    export_onnx(model, str(tmp_path / "model.onnx"))

    aligned = synthetic_face()
    # Known similarity (scale 1.6, 20 degrees, shift) from the aligned crop into a larger photo.
    angle, scale, shift = np.deg2rad(20), 1.6, np.array([70.0, 40.0])
    forward = np.array([[scale * np.cos(angle), -scale * np.sin(angle), shift[0]],
                        [scale * np.sin(angle), scale * np.cos(angle), shift[1]]])
    photo = cv2.warpAffine(aligned, forward, (300, 260), flags=cv2.INTER_CUBIC)
    landmarks = TEMPLATE @ forward[:, :2].T + forward[:, 2]
    cv2.imwrite(str(tmp_path / "photo.png"), photo)
    cv2.imwrite(str(tmp_path / "aligned.png"), aligned)

    # Alignment undoes the known transform: the recovered crop matches the original away from the border.
    matrix = SimilarityTransform.from_estimate(landmarks, TEMPLATE).params[:2]
    recovered = cv2.warpAffine(photo, matrix, (112, 112))
    assert np.abs(recovered[8:-8, 8:-8].astype(int) - aligned[8:-8, 8:-8]).mean() < 2.0

    expected = reference_embedding(model, [(photo, landmarks), (aligned, None)])
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    cosine = float(unit[0] @ unit[1])
    landmark_arg = ",".join(f"{v:.6f}" for v in landmarks.ravel())
    for model_path, extra in [("model.pt", ["--network", "vit_t", "--network-kwargs", TINY_JSON]),
                              ("model.onnx", [])]:
        saved = tmp_path / f"{model_path}.npy"
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "inference.py"), str(tmp_path / "photo.png"),
             str(tmp_path / "aligned.png"), "--model", str(tmp_path / model_path), *extra, "--device", "cpu",
             "--landmarks", landmark_arg, "-", "--save", str(saved)],
            capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
        assert result.returncode == 0, result.stderr
        printed = float(result.stdout.split("cosine similarity: ")[1].split()[0])
        assert printed == pytest.approx(cosine, abs=1e-5)
        embeddings = np.load(saved)
        assert embeddings.shape == (2, 32)
        np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_inference_without_landmarks_uses_image_as_is(tmp_path, monkeypatch, capsys):
    from tools import inference

    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    aligned = synthetic_face()
    cv2.imwrite(str(tmp_path / "a.png"), aligned)
    cv2.imwrite(str(tmp_path / "b.png"), aligned[:, ::-1].copy())
    monkeypatch.setattr(sys, "argv", ["inference.py", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                                      "--model", str(tmp_path / "model.pt"), "--network", "vit_t",
                                      "--network-kwargs", TINY_JSON, "--device", "cpu"])
    inference.main()
    expected = reference_embedding(model, [(aligned, None), (aligned[:, ::-1].copy(), None)])
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    printed = float(capsys.readouterr().out.split("cosine similarity: ")[1].split()[0])
    assert printed == pytest.approx(float(unit[0] @ unit[1]), abs=1e-5)


def test_inference_non_112_image_without_landmarks_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from tools import inference

    torch.save(tiny_vit().state_dict(), tmp_path / "model.pt")
    cv2.imwrite(str(tmp_path / "photo.png"), np.zeros((120, 100, 3), np.uint8))
    monkeypatch.setattr(sys, "argv", ["inference.py", str(tmp_path / "photo.png"), "--model",
                                      str(tmp_path / "model.pt"), "--network", "vit_t",
                                      "--network-kwargs", TINY_JSON])
    with pytest.raises(UserError) as error:
        inference.main()
    message = str(error.value)
    assert "100x120" in message and "--landmarks" in message and "112x112" in message


# ---------------------------------------------------------------- load_backbone

def assert_same_weights(model, state):
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_released_layout_loads_strictly(tmp_path):
    state = tiny_vit(seed=3).state_dict()
    assert "senet.0.weight" in state and "mask_token" in state  # released layout, tiny sizes
    torch.save(state, tmp_path / "released.pt")
    model = load_backbone(str(tmp_path / "released.pt"), "vit_t", TINY)
    assert not model.training
    assert_same_weights(model, state)


def test_module_prefix_and_training_checkpoint_load(tmp_path):
    state = tiny_vit(seed=4).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    torch.save({"epoch": 2, "global_step": 10, "state_dict_backbone": state,
                "state_optimizer": {"param_groups": [{"lr": 0.1}]}}, tmp_path / "checkpoint_gpu_0.pt")
    for name in ("ddp.pt", "checkpoint_gpu_0.pt"):
        assert_same_weights(load_backbone(str(tmp_path / name), "vit_t", TINY), state)


def test_wrong_network_names_missing_and_unexpected_keys(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.") as error:
        load_backbone(str(tmp_path / "model.pt"), "vit_t", dict(TINY, depth=2))
    assert "unexpected keys: none" in str(error.value)
    with pytest.raises(ValueError, match=r"unexpected keys: pos_embed, mask_token") as error:
        load_backbone(str(tmp_path / "model.pt"), "mbf", {"num_features": 32})
    assert "--network mbf" in str(error.value)
    with pytest.raises(ValueError, match=r"shape mismatches .*pos_embed \(1, 144, 32\) vs \(1, 144, 48\)"):
        load_backbone(str(tmp_path / "model.pt"), "vit_t", dict(TINY, embed_dim=48))


def test_checkpoint_with_arbitrary_object_is_refused(tmp_path):
    state = tiny_vit().state_dict()
    torch.save({**state, "config": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_backbone(str(tmp_path / "pickled.pt"), "vit_t", TINY)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(str(tmp_path / "absent.pt"), "vit_t", TINY)
