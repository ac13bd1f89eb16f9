"""tools/visualize_method.py: the picture shows exactly what training computes (dpap_plan, dpap(), ehsm_weights)."""
import os

import cv2
import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from skimage import data

from backbones import get_model
from dataset import to_tensor
from dpap import dpap, dpap_plan
from eval.verification import save_bin
from losses import ehsm_weights
from tools import visualize_method as vm
from utils.face_align import norm_crop

# Eye centres, nose tip and mouth corners of skimage.data.astronaut() (512x512), read off the picture;
# docs/visualization.md uses the same points.
ASTRONAUT_LANDMARKS = np.array([[203, 102], [246, 103], [223, 127], [204, 141], [243, 141]], dtype=np.float64)
ASTRONAUT_ARG = "203,102,246,103,223,127,204,141,243,141"
MXNET_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "mxnet")
TINY = dict(embed_dim=32, depth=1, num_heads=4, num_features=16)
TOP_K, PROB, SEED = 5, 0.5, 1  # seed 1 gates rows 1 and 2 only
EHSM = dict(gamma=2.0, top_k=20)


def astronaut_face():
    return norm_crop(data.astronaut(), ASTRONAUT_LANDMARKS)  # RGB in, RGB out


def batch_of_faces():
    face = astronaut_face()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, face.shape, dtype=np.uint8)
    return np.stack([face, face[:, ::-1], (face * 0.5).astype(np.uint8), noise])


def tiny_model():
    torch.manual_seed(0)
    return get_model("vit_t", **TINY).eval()


def test_alignment_puts_the_astronaut_landmarks_on_the_template():
    from utils.face_align import ARCFACE_REFERENCE, estimate_norm

    matrix = estimate_norm(ASTRONAUT_LANDMARKS)
    mapped = ASTRONAUT_LANDMARKS @ matrix[:, :2].T + matrix[:, 2]
    # a face: the five points fit the template up to 4.3 px (her smile is wider than the template mouth)
    assert np.abs(mapped - ARCFACE_REFERENCE).max() < 5.0


def test_rows_are_the_training_computations():
    model, faces = tiny_model(), batch_of_faces()
    rows = vm.analyse(model, faces, TOP_K, PROB, 1.0, SEED, EHSM)

    images = torch.stack([to_tensor(f, False) for f in faces])
    with torch.no_grad():
        _, weights, entropy = model(images, return_aux=True)
    plan = dpap_plan(weights, TOP_K, PROB, 1.0, torch.Generator().manual_seed(SEED))
    expected = dpap(images, weights, TOP_K, PROB, 9, 1.0, torch.Generator().manual_seed(SEED))

    assert rows["grid"] == (12, 12) and rows["patch_size"] == 9
    np.testing.assert_array_equal(rows["top_k"], plan.patches.numpy())
    np.testing.assert_array_equal(rows["gate"], plan.gate.numpy())
    assert 0 < rows["gate"].sum() < len(faces)  # this seed shows gated and ungated rows
    np.testing.assert_array_equal(rows["perturbed"], expected.numpy())
    # the shown pixels are exactly dpap()'s: it quantises to whole pixel values
    shown = torch.stack([to_tensor(f, False) for f in rows["perturbed_u8"]])
    assert torch.equal(shown, expected)
    assert not np.array_equal(rows["perturbed_u8"], faces)
    np.testing.assert_array_equal(rows["patch_weights"], weights.reshape(-1, 12, 12).numpy())
    np.testing.assert_array_equal(rows["entropy"], entropy.reshape(-1, 12, 12).numpy())
    np.testing.assert_array_equal(rows["ehsm"], ehsm_weights(entropy, **EHSM).numpy())


def outlined_cells(ax, patch_size=9, gw=12):
    cells = []
    for patch in ax.patches:
        if isinstance(patch, Rectangle):
            x, y = patch.get_xy()
            cells.append(int(round(y + 0.5)) // patch_size * gw + int(round(x + 0.5)) // patch_size)
    return cells


@pytest.mark.parametrize("sort", ["none", "ehsm"])
def test_figure_outlines_plan_and_prints_ehsm(sort):
    model, faces = tiny_model(), batch_of_faces()
    names = ["a", "a flipped", "a dark", "noise"]
    rows = vm.analyse(model, faces, TOP_K, PROB, 1.0, SEED, EHSM)
    images = torch.stack([to_tensor(f, False) for f in faces])
    with torch.no_grad():
        _, weights, entropy = model(images, return_aux=True)
    plan = dpap_plan(weights, TOP_K, PROB, 1.0, torch.Generator().manual_seed(SEED))
    ehsm = ehsm_weights(entropy, **EHSM).numpy()

    rows, shown_names = vm.sort_rows(rows, names, sort)
    order = np.argsort(-ehsm, kind="stable") if sort == "ehsm" else np.arange(len(faces))
    assert shown_names == [names[i] for i in order]
    fig = vm.draw(rows, shown_names)
    axes = np.array([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]).reshape(len(faces), 5)
    for row, i in enumerate(order):
        assert outlined_cells(axes[row, 2]) == plan.patches[i].tolist()
        assert axes[row, 0].get_ylabel() == f"{names[i]}\nEHSM w = {ehsm[i]:.4f}"
        np.testing.assert_array_equal(axes[row, 0].get_images()[0].get_array(), faces[i])
        np.testing.assert_array_equal(rows["perturbed"][row], dpap(
            images, weights, TOP_K, PROB, 9, 1.0, torch.Generator().manual_seed(SEED))[i].numpy())
    if sort == "ehsm":
        assert list(rows["ehsm"]) == sorted(ehsm, reverse=True)


def test_inputs(tmp_path):
    """RecordIO, .bin, an image folder and a landmarked photo all give aligned RGB faces."""
    expected = np.load(os.path.join(MXNET_FIXTURE, "decoded_rgb.npz"))["images"]
    rec = vm.load_faces([MXNET_FIXTURE], limit=3)
    assert [n for n, _ in rec] == ["rec key 1", "rec key 2", "rec key 3"]
    np.testing.assert_array_equal(np.stack([f for _, f in rec]), expected[:3])
    rec = vm.load_faces([os.path.join(MXNET_FIXTURE, "train.rec")], limit=10)
    np.testing.assert_array_equal(np.stack([f for _, f in rec]), expected)

    face = astronaut_face()
    png = cv2.imencode(".png", face[:, :, ::-1])[1].tobytes()
    save_bin(str(tmp_path / "pairs.bin"), [png, png], [True])
    folder = tmp_path / "faces" / "id0"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "x.png"), face[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "astronaut.png"), data.astronaut()[:, :, ::-1])
    faces = vm.load_faces([str(tmp_path / "pairs.bin"), str(tmp_path / "faces"), str(tmp_path / "astronaut.png")],
                          [ASTRONAUT_LANDMARKS], limit=10)
    assert [n for n, _ in faces] == ["pairs.bin #0", "pairs.bin #1", os.path.join("id0", "x.png"), "astronaut.png"]
    for _, f in faces:
        np.testing.assert_array_equal(f, face)
    with pytest.raises(ValueError, match="astronaut.png is 512x512: pass --landmarks"):
        vm.load_faces([str(tmp_path / "astronaut.png")])


def test_cli(tmp_path, capsys):
    model = tiny_model()
    ckpt = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": model.state_dict(), "epoch": 1}, str(ckpt))
    cv2.imwrite(str(tmp_path / "astronaut.png"), data.astronaut()[:, :, ::-1])
    out = tmp_path / "vis"
    kwargs = '{"embed_dim": 32, "depth": 1, "num_heads": 4}'
    vm.main([MXNET_FIXTURE, str(tmp_path / "astronaut.png"), "--landmarks", ASTRONAUT_ARG, "--model", str(ckpt),
             "--config", "configs/tiny_cpu.py", "--opts", "embedding_size=16", "ehsm_gamma=2.0",
             "--network-kwargs", kwargs, "--batch-size", "3", "--seed", str(SEED), "--sort", "ehsm", "-o", str(out),
             "--device", "cpu"])
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["grid_000.png", "grid_001.png"]
    # second grid: rec key 4 and the astronaut, in one DPAP batch; EHSM with the config's gamma
    faces = np.stack([np.load(os.path.join(MXNET_FIXTURE, "decoded_rgb.npz"))["images"][3], astronaut_face()])
    rows = vm.analyse(model, faces, 7, 1.0, 1.0, SEED, dict(gamma=2.0, top_k=None))
    w = rows["ehsm"]
    pair = [f"rec key 4 (EHSM {w[0]:.4f})", f"astronaut.png (EHSM {w[1]:.4f})"]
    assert ", ".join(pair if w[0] >= w[1] else pair[::-1]) in printed


def test_random_init_warns_and_cnn_is_refused():
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = vm.build_model("vit_t", TINY)
    assert not model.training
    with pytest.raises(ValueError, match="not a ViT"), pytest.warns(UserWarning):
        vm.build_model("r18", {})
