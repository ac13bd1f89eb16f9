"""ImageFolder listing: made once (rank 0), cached next to the folder, reused by the other ranks and later runs."""
import os

import cv2
import numpy as np
import pytest

import dataset
from dataset import ImageFolderDataset, Strings
from dist_utils import run_distributed


def make_tree(root, counts):
    for name, n in counts.items():
        os.makedirs(os.path.join(root, name))
        for i in range(n):
            cv2.imwrite(os.path.join(root, name, f"{i}.png"), np.full((112, 112, 3), i, np.uint8))


def no_scan(root):
    raise AssertionError(f"{root} was listed again")


def test_strings_round_trip():
    names = ["0_0.jpg", "", "zoë/ü.png", "x" * 300]
    s = Strings.build(names)
    assert len(s) == 4 and [s[i] for i in range(4)] == names
    assert s.blob.nbytes == sum(len(n.encode()) for n in names) and s.offsets.tolist()[-1] == s.blob.nbytes


def test_listing_is_cached_reused_and_invalidated(tmp_path, monkeypatch):
    root = str(tmp_path / "faces")
    make_tree(root, {"bob": 2, "alice": 1, "carl": 0})
    ds = ImageFolderDataset(root, flip=False)
    assert os.path.isfile(root + ".listing.npz")
    assert ds.classes == ["alice", "bob", "carl"] and len(ds) == 3
    assert [ds[i][1].item() for i in range(3)] == [0, 1, 1]
    assert ds[2][0][0, 0, 0].item() == pytest.approx(1 / 255 * 2 - 1)  # bob/1.png
    monkeypatch.setattr(dataset, "scan_image_folder", no_scan)  # a later run reads the cache
    again = ImageFolderDataset(root, flip=False)
    assert again.classes == ds.classes and again.starts.tolist() == [0, 1, 3, 3]
    make_tree(root, {"dave": 1})  # a new identity changes the folder: listed again
    monkeypatch.undo()
    grown = ImageFolderDataset(root, flip=False)
    assert grown.classes == ["alice", "bob", "carl", "dave"] and len(grown) == 4 and grown[3][1].item() == 3


def rank_listing(rank, world_size, root):
    calls = []
    scan = dataset.scan_image_folder
    dataset.scan_image_folder = lambda r: calls.append(r) or scan(r)
    ds = ImageFolderDataset(root, flip=False)
    return {"scans": len(calls), "classes": ds.classes, "labels": [ds[i][1].item() for i in range(len(ds))]}


def test_only_rank_0_lists(tmp_path):
    root = str(tmp_path / "faces")
    make_tree(root, {"a": 1, "b": 2})
    results = run_distributed(rank_listing, 2, root)
    assert [r["scans"] for r in results] == [1, 0]
    assert all(r["classes"] == ["a", "b"] and r["labels"] == [0, 1, 1] for r in results)
