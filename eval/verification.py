"""Pair verification on insightface `.bin` files (lfw, cfp_fp, agedb_30; format in docs/data.md).

A `.bin` is a pickle of (list of encoded images, list of P booleans); images 2k and 2k+1 form pair k. Files are
unpickled with a restricted unpickler: a plain file needs no globals at all, and the only globals ever accepted are
the three numpy names needed to rebuild an ndarray. Anything else (a crafted file that would run code) is refused.

test(): embeddings of each image and its horizontal flip are summed and L2-normalised; squared L2 distance per pair;
thresholds 0..3.99 step 0.01; 10 contiguous folds, the threshold is chosen on 9 folds (best accuracy, first one on
ties) and the accuracy measured on the held-out one.
"""
import io
import pickle

import cv2
import numpy as np
import torch

from utils.cli import UserError

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class BinLoadError(UserError):
    """A .bin verification file that is unreadable, malformed or unsafe."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a verification .bin file")


def _unpickle(raw, **kwargs):
    return RestrictedUnpickler(io.BytesIO(raw), **kwargs).load()


def read_bin(path):
    """-> (bins: list of encoded image bytes, issame: list of bools), validated."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BinLoadError(f"{path}: cannot read verification file: {e}") from e
    try:
        try:
            obj = _unpickle(raw)
        except UnicodeDecodeError:  # python-2 pickle of str/bytes
            obj = _unpickle(raw, encoding="bytes")
    except Exception as e:
        raise BinLoadError(f"{path}: not a valid verification .bin (pickle of (images, issame)): {e}") from e
    # Check the structure exactly: a flipped opcode byte can turn an element into another object (e.g. a pickled
    # True into an empty set), which a lenient bool(x) would silently read as a label.
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BinLoadError(f"{path}: expected a pickled 2-tuple (images, issame), got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BinLoadError(f"{path}: images must be a list of encoded images, got {type(bins).__name__}")
    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_ and issame.ndim == 1:
        issame = list(issame)  # np.bool_ items
    if not isinstance(issame, (list, tuple)):
        raise BinLoadError(f"{path}: issame must be a list of booleans, got {type(issame).__name__}")
    for i, x in enumerate(issame):
        if not isinstance(x, (bool, np.bool_)):
            raise BinLoadError(f"{path}: issame[{i}] is a {type(x).__name__}, not a boolean")
    if len(bins) != 2 * len(issame):
        raise BinLoadError(f"{path}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
    out = []
    for i, b in enumerate(bins):
        if isinstance(b, np.ndarray):
            b = b.tobytes()  # some converted files store each encoded image as a uint8 array
        if not isinstance(b, (bytes, bytearray)):
            raise BinLoadError(f"{path}: image {i} is a {type(b).__name__}, not encoded image bytes")
        out.append(bytes(b))
    return out, [bool(x) for x in issame]


def load_bin(path, image_size=(112, 112)):
    """-> ([images, flipped images] float32 tensors [2P,3,H,W] in [0,255] RGB, issame list of P bools)."""
    bins, issame = read_bin(path)
    h, w = image_size
    data = torch.empty(len(bins), 3, h, w)
    for i, buf in enumerate(bins):
        img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise BinLoadError(f"{path}: image {i} cannot be decoded")
        if img.shape[1] != w or img.shape[0] != h:
            img = cv2.resize(img, (w, h))
        data[i] = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)).astype(np.float32))
    return [data, torch.flip(data, dims=[3])], issame


def save_bin(path, bins, issame):
    """Write a .bin from encoded image bytes (2 per pair) and P booleans: plain bytes/list/bool, no globals."""
    with open(path, "wb") as f:
        pickle.dump((list(bins), [bool(x) for x in issame]), f, protocol=4)


def write_bin(path, images, issame):
    """Write a .bin from uint8 RGB images [2P,H,W,3] (PNG-encoded, lossless) and P booleans (tests)."""
    bins = []
    for img in images:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:, :, ::-1]))
        assert ok
        bins.append(buf.tobytes())
    save_bin(path, bins, issame)


def fold_accuracies(embeddings, issame, nfolds=10, thresholds=None):
    """10-fold accuracy of thresholding squared L2 distance of normalised pair embeddings."""
    if thresholds is None:
        thresholds = np.arange(0, 4, 0.01)
    issame = np.asarray(issame, dtype=bool)
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    predict = dist[None, :] < thresholds[:, None]  # [T, P]
    correct = predict == issame[None, :]
    folds = np.array_split(np.arange(len(issame)), nfolds)
    accs = []
    for k, test_idx in enumerate(folds):
        train_idx = np.concatenate([f for j, f in enumerate(folds) if j != k])
        best = np.argmax(correct[:, train_idx].mean(axis=1))
        accs.append(correct[best, test_idx].mean())
    return np.array(accs)


@torch.no_grad()
def embed(backbone, images, batch_size):
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = (images[start:start + batch_size].to(device) / 255 - 0.5) / 0.5
        out.append(backbone(batch).float().cpu())
    return torch.cat(out).numpy()


def _normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def test(data_set, backbone, batch_size, nfolds=10):
    """-> (acc without flip, std, Accuracy-Flip, std, XNorm, [embeddings, flipped embeddings]).
    (arcface_torch returns 0 as the first pair; here it is the accuracy of the un-flipped embedding alone.)"""
    data_list, issame = data_set
    was_training = backbone.training
    backbone.eval()
    embeddings_list = [embed(backbone, data, batch_size) for data in data_list]
    backbone.train(was_training)
    xnorm = float(np.mean([np.linalg.norm(e, axis=1).mean() for e in embeddings_list]))
    acc1 = fold_accuracies(_normalize(embeddings_list[0]), issame, nfolds)
    acc2 = fold_accuracies(_normalize(embeddings_list[0] + embeddings_list[1]), issame, nfolds)
    return float(acc1.mean()), float(acc1.std()), float(acc2.mean()), float(acc2.std()), xnorm, embeddings_list
