import os

import cv2
import numpy as np
import pytest
import torch

from dataset import DistributedSampler, ImageFolderDataset, MXFaceDataset, get_dataloader
from utils.recordio import IRHeader, IndexedRecordWriter, RecordIOError, encode_image, pack_header

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "mxnet")


def reference(img_rgb):
    """ToTensor + Normalize(0.5, 0.5) by hand: HWC uint8 RGB -> CHW float in [-1, 1]."""
    return (torch.tensor(img_rgb.transpose(2, 0, 1).copy(), dtype=torch.float32) / 255 - 0.5) / 0.5


def write_rec(root, images, labels, header=True, extra=None):
    """insightface layout (header record 0 + identity records) or, with header=False, images at keys 0..N-1."""
    os.makedirs(root, exist_ok=True)
    first = 1 if header else 0
    with IndexedRecordWriter(os.path.join(root, "train.rec"), os.path.join(root, "train.idx")) as w:
        n_ids = max(labels) + 1
        a, b = 1 + len(images), 1 + len(images) + n_ids
        if header:
            w.write_idx(0, pack_header(IRHeader(0, [a, b], 0, 1)))
        for i, (img, label) in enumerate(zip(images, labels)):
            payload = (extra or {}).get(i + first, encode_image(img, 95))
            w.write_idx(i + first, pack_header(IRHeader(0, float(label), i + first, 0), payload))
        if header:
            for c in range(n_ids):
                keys = [i + 1 for i, l in enumerate(labels) if l == c]
                w.write_idx(a + c, pack_header(IRHeader(0, [keys[0], keys[-1] + 1], 0, 0)))
    return root


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(12)]
    labels = [i // 4 for i in range(12)]
    root = write_rec(str(tmp_path_factory.mktemp("rec")), images, labels)
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_image(im, 95), np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB) for im in images]
    return root, [reference(d) for d in decoded], labels


def test_items_match_reference_without_flip(rec_dir):
    root, refs, labels = rec_dir
    ds = MXFaceDataset(root, num_classes=3, flip=False)
    assert len(ds) == 12
    for i in range(12):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 112, 112) and y.dtype == torch.int64
        torch.testing.assert_close(x, refs[i], rtol=0, atol=0)
        assert y.item() == labels[i]


def test_mxnet_fixture_through_dataset():
    decoded = np.load(os.path.join(FIXTURE, "decoded_rgb.npz"))["images"]
    ds = MXFaceDataset(FIXTURE, num_classes=2, flip=False)
    assert [ds[i][1].item() for i in range(len(ds))] == [0, 0, 1, 1]
    for i in range(len(ds)):
        torch.testing.assert_close(ds[i][0], reference(decoded[i]), rtol=0, atol=0)


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_two_workers_read_correctly_and_same_seed_same_batches(rec_dir):
    root, refs, labels = rec_dir
    loader = get_dataloader(root, 0, batch_size=4, seed=7, num_workers=2, num_classes=3)
    assert len(loader) == 3
    loader.dataset.reader.read_idx(3)  # the parent holds an open handle before the workers fork
    order = list(iter(loader.sampler))
    run1, run2 = collect(loader), collect(get_dataloader(root, 0, batch_size=4, seed=7, num_workers=2))
    flips = []
    for b, (x, y) in enumerate(run1):
        assert x.device.type == "cpu" and x.dtype == torch.float32 and y.dtype == torch.int64
        for j, idx in enumerate(order[4 * b:4 * b + 4]):
            assert y[j].item() == labels[idx]
            flipped = torch.equal(x[j], refs[idx].flip(-1))
            assert flipped or torch.equal(x[j], refs[idx])
            flips.append(flipped)
    assert 0 < sum(flips) < len(flips)  # the flip happens, but not always
    for (x1, y1), (x2, y2) in zip(run1, run2):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    loader.sampler.set_epoch(1)
    run3 = collect(loader)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(run1, run3))


def test_same_seed_same_batches_in_process(rec_dir):
    root = rec_dir[0]
    run1 = collect(get_dataloader(root, 0, batch_size=3, seed=3, num_workers=0))
    run2 = collect(get_dataloader(root, 0, batch_size=3, seed=3, num_workers=0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run1, run2))


def test_set_start_batch_resumes_mid_epoch(rec_dir):
    root = rec_dir[0]
    loader = get_dataloader(root, 0, batch_size=3, seed=5, num_workers=0)
    loader.sampler.set_epoch(2)
    full = [y for _, y in loader]
    loader.sampler.set_epoch(2)
    loader.sampler.set_start_batch(2)
    assert len(loader) == 2
    assert [y.tolist() for _, y in loader] == [y.tolist() for y in full[2:]]
    loader.sampler.set_epoch(3)
    assert len(loader) == 4


def test_sampler_shards_padding_and_determinism():
    n, world, seed = 10, 4, 11
    for epoch in (0, 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        padded = perm + perm[:2]  # 12 = next multiple of 4, padded by repetition
        shards = []
        for rank in range(world):
            s = DistributedSampler(n, world, rank, seed, batch_size=1)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(s) == 3 and shards[-1] == padded[rank::world]
            assert list(s) == shards[-1]  # same epoch, same order
        assert sorted(sum(shards, [])) == sorted(padded)
    s = DistributedSampler(3, 8, 7, seed, batch_size=1)  # more ranks than samples: repeat the list
    assert list(s) == [torch.randperm(3, generator=torch.Generator().manual_seed(seed)).tolist()[7 % 3]]
    s = DistributedSampler(10, 2, 1, seed, batch_size=2)
    s.set_start_batch(1)
    full = DistributedSampler(10, 2, 1, seed, batch_size=2)
    assert list(s) == list(full)[2:] and len(s) == 3


def test_label_beyond_num_classes_checked_at_start_from_header(rec_dir):
    root = rec_dir[0]
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 15: the header lists 3 identities .* "
                                            r"num_classes is 2"):
        MXFaceDataset(root, num_classes=2)


def test_label_beyond_num_classes_on_first_sight_without_header(tmp_path):
    img = np.full((112, 112, 3), 100, np.uint8)
    root = write_rec(str(tmp_path), [img, img, img], [0, 1, 5], header=False)
    ds = MXFaceDataset(root, num_classes=3)
    assert len(ds) == 3 and ds[1][1].item() == 1
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 2: label 5 is outside \[0, num_classes=3\)"):
        ds[2]


def test_undecodable_jpeg_names_key(tmp_path):
    img = np.zeros((112, 112, 3), np.uint8)
    root = write_rec(str(tmp_path), [img, img], [0, 0], extra={2: b"\xff\xd8garbage"})
    ds = MXFaceDataset(root)
    ds[0]
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 2: cannot decode image"):
        ds[1]


def test_wrong_size_error_and_resize(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    root = write_rec(str(tmp_path), [img], [0])
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 1: image is 90x100, expected 112x112"):
        MXFaceDataset(root)[0]
    x, _ = MXFaceDataset(root, resize=True, flip=False)[0]
    dec = cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_image(img, 95), np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB)
    torch.testing.assert_close(x, reference(cv2.resize(dec, (112, 112), interpolation=cv2.INTER_AREA)),
                               rtol=0, atol=0)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    imgs = {}
    for name in ("bob", "alice"):
        os.makedirs(tmp_path / name)
        for i in range(2):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), img)
            imgs[(name, i)] = img
    ds = ImageFolderDataset(str(tmp_path), flip=False)
    assert ds.classes == ["alice", "bob"] and len(ds) == 4
    x, y = ds[2]  # bob/0.png
    assert y.item() == 1
    torch.testing.assert_close(x, reference(imgs[("bob", 0)][:, :, ::-1]), rtol=0, atol=0)
    batches = collect(get_dataloader(str(tmp_path), 0, batch_size=2, num_workers=0))
    assert len(batches) == 2 and sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 1, 1]
    with pytest.raises(RecordIOError, match=r"bob: class folder gets label 1 but num_classes is 1"):
        ImageFolderDataset(str(tmp_path), num_classes=1)


def test_image_folder_without_images(tmp_path):
    os.makedirs(tmp_path / "id0")
    (tmp_path / "id0" / "notes.txt").write_text("x")
    with pytest.raises(RecordIOError, match=f"{tmp_path}: no images found"):
        get_dataloader(str(tmp_path), 0, batch_size=2)


def test_synthetic():
    loader = get_dataloader("synthetic", 0, batch_size=4, seed=3)
    assert len(loader) == 1_000_000 // 4
    it = iter(loader)
    (x1, y1), (x2, y2) = next(it), next(it)
    assert x1.shape == (4, 3, 112, 112) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(x1[0], x1[3]) and y1.tolist() == [1] * 4
    assert x1.min() >= -1 and x1.max() <= 1 and x1.std() > 0.5
    torch.testing.assert_close(x1[0], torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(3)) * 2 - 1)


def test_dali_error_names_what_is_missing(rec_dir):
    if torch.cuda.is_available():
        try:
            import nvidia.dali  # noqa: F401
            pytest.skip("DALI and CUDA are both present")
        except ImportError:
            missing = "NVIDIA DALI"
    else:
        missing = "needs CUDA"
    with pytest.raises(RuntimeError, match=missing):
        get_dataloader(rec_dir[0], 0, batch_size=2, dali=True)
