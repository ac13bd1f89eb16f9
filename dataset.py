"""Training data: insightface RecordIO, ImageFolder or synthetic source, distributed sampling, device prefetch.

get_dataloader() chooses like arcface_torch (docs/data.md): "synthetic" -> one fixed image; a folder with
train.rec + train.idx -> RecordIO; anything else -> ImageFolder (one sub-folder per identity).
"""
import hashlib
import os
import random
import zipfile
from array import array
from functools import partial

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.distributed import barrier, rank_and_world_size
from utils.recordio import (RecordIOError, IndexedRecordReader, decode_image, identity_starts, image_label,
                            insightface_layout)

IMAGE_SIZE = 112
SYNTHETIC_LENGTH = 1_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LISTING_FORMAT = 1  # bump when the cached listing's layout changes


def to_tensor(img_rgb, flip):
    """RGB uint8 HWC -> float32 CHW in [-1, 1], like ToTensor + Normalize(0.5, 0.5), as arcface_torch."""
    if flip:
        img_rgb = img_rgb[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img_rgb.transpose(2, 0, 1))).float().div_(255)
    return x.sub_(0.5).div_(0.5)


def check_size(img, resize, where):
    if img.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return img
    if not resize:
        raise RecordIOError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE} "
                            f"(pass resize=True to resize)")
    return cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)


def check_label(label, num_classes, where):
    if label < 0 or num_classes is not None and label >= num_classes:
        raise RecordIOError(f"{where}: label {label} is outside [0, num_classes={num_classes})")
    return label


class FlipMixin:
    """Random horizontal flip (p=0.5) decided per sample from (seed, epoch, dataset index) alone: the same image gets
    the same flip in the same epoch whatever the worker count, and a mid-epoch resume that skips the batches already
    seen (set_start_batch) flips the remaining ones exactly like the uninterrupted run (a per-worker random stream
    would be shifted by the skipped samples)."""

    def seed_flips(self, seed):
        self._flip_seed = seed

    def draw_flip(self, index):
        return bool(np.random.default_rng([self._flip_seed, self.epoch, index]).random() < 0.5)


class MXFaceDataset(FlipMixin, Dataset):
    """insightface train.rec/train.idx; items (float32 [3,112,112] in [-1,1], int64 label)."""

    def __init__(self, root_dir, num_classes=None, resize=False, flip=True):
        self.rec_path = os.path.join(root_dir, "train.rec")
        self.reader = IndexedRecordReader(self.rec_path, os.path.join(root_dir, "train.idx"))
        self.image_keys, num_ids = insightface_layout(self.reader)
        if num_ids is not None and num_classes is not None and num_ids > num_classes:
            # identity records are written in label order: record A + c holds class c
            key = int(self.image_keys[-1]) + 1 + num_classes
            raise RecordIOError(f"{self.rec_path}: record key {key}: the header lists {num_ids} identities (labels up "
                                f"to {num_ids - 1}) but num_classes is {num_classes}")
        # class c owns image keys starts[c]..starts[c+1]-1 (None without identity records, e.g. an im2rec file)
        self.starts = identity_starts(self.reader, self.image_keys, num_ids) if num_ids is not None else None
        self.num_classes, self.resize, self.flip = num_classes, resize, flip
        self.epoch = 0
        self.seed_flips(0)

    def __len__(self):
        return len(self.image_keys)

    def check_identity(self, label, key, where):
        starts = self.starts
        if starts is not None and not (label < starts.size - 1 and starts[label] <= key < starts[label + 1]):
            owner = int(np.searchsorted(starts, key, side="right")) - 1
            raise RecordIOError(f"{where}: label {label}, but the identity records put this key in class {owner} "
                                f"(keys {starts[owner]}..{starts[owner + 1] - 1}); the label field or the offset in "
                                f"{self.reader.idx_path} is corrupt")
        return label

    def __getitem__(self, index):
        key = int(self.image_keys[index])
        where = f"{self.rec_path}: record key {key}"
        header, payload = self.reader.read_header(key)
        try:
            label = image_label(header)
        except RecordIOError as e:
            raise RecordIOError(f"{where}: {e}") from None
        label = self.check_identity(check_label(label, self.num_classes, where), key, where)
        img = check_size(decode_image(payload, where), self.resize, where)
        return to_tensor(img, self.flip and self.draw_flip(index)), torch.tensor(label, dtype=torch.int64)


class Strings:
    """Many strings as one UTF-8 byte array and an int64 offset array: ~(length + 8) bytes each instead of a Python
    object each, and forked DataLoader workers share the pages (no reference counts are written)."""

    def __init__(self, blob, offsets):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def build(cls, strings):
        blob, offsets = bytearray(), array("q", [0])
        for text in strings:
            blob += text.encode("utf-8", "surrogateescape")
            offsets.append(len(blob))
        return cls(np.frombuffer(bytes(blob), dtype=np.uint8), np.frombuffer(offsets, dtype=np.int64))

    def __len__(self):
        return self.offsets.size - 1

    def __getitem__(self, i):
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


def scan_image_folder(root):
    """The sorted identity folders of `root`, the sorted image files of each, and starts[c] = index of class c's first
    image (like torchvision's ImageFolder order)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    starts = array("q", [0])

    def files():
        for name in classes:
            names = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
            starts.append(starts[-1] + len(names))
            yield from names

    images = Strings.build(files())
    return {"classes": Strings.build(classes), "images": images, "starts": np.frombuffer(starts, dtype=np.int64)}


def folder_key(root):
    """Changes when identity folders are added, removed or renamed (the folder's mtime and link count), or when the
    path names another folder. Files changed inside an existing identity folder do not change it."""
    st = os.stat(root)
    return f"{LISTING_FORMAT} {os.path.abspath(root)} {st.st_dev} {st.st_ino} {st.st_mtime_ns} {st.st_nlink}"


def listing_cache_path(root):
    """<root>.listing.npz next to the folder, or under ~/.cache/transface when its parent is read-only."""
    root = os.path.abspath(root)
    if os.access(os.path.dirname(root), os.W_OK):
        return root + ".listing.npz"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "transface", hashlib.sha1(root.encode("utf-8", "surrogateescape")).hexdigest() +
                        ".listing.npz")


def load_listing(path, key):
    try:
        with np.load(path) as f:
            if str(f["key"]) != key:
                return None
            return {"classes": Strings(f["class_blob"], f["class_offsets"]),
                    "images": Strings(f["image_blob"], f["image_offsets"]), "starts": f["starts"]}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def save_listing(path, key, listing):
    """Atomically (a temporary file renamed), so a reader never sees half a file; an unwritable place is skipped."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), class_blob=listing["classes"].blob,
                     class_offsets=listing["classes"].offsets, image_blob=listing["images"].blob,
                     image_offsets=listing["images"].offsets, starts=listing["starts"])
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def folder_listing(root):
    """scan_image_folder(root) listed once: read from the cache file when the folder has not changed since it was
    written. Under torch.distributed rank 0 lists and writes the cache while the other ranks wait, then read it."""
    key, path = folder_key(root), listing_cache_path(root)
    rank, _ = rank_and_world_size()
    listing = load_listing(path, key)
    if listing is None and rank == 0:
        listing = scan_image_folder(root)
        save_listing(path, key, listing)
    barrier()
    if listing is None:  # another rank's cache; or no shared file system: list here
        listing = load_listing(path, key) or scan_image_folder(root)
    return listing


class ImageFolderDataset(FlipMixin, Dataset):
    """root/<identity>/<image>: classes are the sorted sub-folder names (like torchvision ImageFolder). The listing
    is cached next to the folder (folder_listing), so a 42 M-image tree is listed once, not by every rank."""

    def __init__(self, root_dir, num_classes=None, resize=False, flip=True):
        if not os.path.isdir(root_dir):
            raise RecordIOError(f"{root_dir}: neither 'synthetic', a folder with train.rec/train.idx, nor a folder")
        listing = folder_listing(root_dir)
        self.class_names, self.images, self.starts = listing["classes"], listing["images"], listing["starts"]
        if len(self.images) == 0:
            raise RecordIOError(f"{root_dir}: no images found (expected root/<identity>/<image>{IMAGE_EXTENSIONS[0]}, "
                                f"no train.rec/train.idx either)")
        if num_classes is not None and len(self.class_names) > num_classes:
            raise RecordIOError(f"{os.path.join(root_dir, self.class_names[num_classes])}: class folder gets label "
                                f"{num_classes} but num_classes is {num_classes}")
        self.root, self.num_classes, self.resize, self.flip = root_dir, num_classes, resize, flip
        self.epoch = 0
        self.seed_flips(0)

    @property
    def classes(self):
        return [self.class_names[c] for c in range(len(self.class_names))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        label = int(np.searchsorted(self.starts, index, side="right")) - 1
        path = os.path.join(self.root, self.class_names[label], self.images[index])
        with open(path, "rb") as f:
            img = check_size(decode_image(f.read(), path), self.resize, path)
        return to_tensor(img, self.flip and self.draw_flip(index)), torch.tensor(label, dtype=torch.int64)


class DistributedSampler(Sampler):
    """Per-epoch shuffle seeded with epoch + seed (identical on all ranks), padded by repetition to a multiple of the
    world size; rank r takes every W-th index from r. set_start_batch(k) skips the first k batches of the
    current epoch (mid-epoch resume); set_epoch() clears it."""

    def __init__(self, num_samples, num_replicas, rank, seed, batch_size, shuffle=True):
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.batch_size, self.shuffle = seed, batch_size, shuffle
        self.per_rank = -(-num_samples // num_replicas)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch):
        self.epoch, self.start_batch = epoch, 0

    def set_start_batch(self, k):
        self.start_batch = k

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            indices = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        while len(indices) < total:
            indices += indices[:total - len(indices)]
        return iter(indices[self.rank:total:self.num_replicas][self.start_batch * self.batch_size:])

    def __len__(self):
        return max(self.per_rank - self.start_batch * self.batch_size, 0)


def seed_worker(worker_id, rank, num_workers, seed):
    """Worker seed num_workers*rank + worker_id + seed for python/numpy/torch; the flips use `seed` itself
    (they depend on the sample, not on the worker that loads it)."""
    worker_seed = num_workers * rank + worker_id + seed
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)
    torch.utils.data.get_worker_info().dataset.seed_flips(seed)


class DeviceLoader:
    """Wraps a DataLoader: sets the epoch for the flip seeds and, on CUDA, copies the next batch to the device on a
    side stream while the current one is used (one-batch lookahead). On CPU it yields the loader's tensors."""

    def __init__(self, loader, device, rank, seed):
        self.loader, self.device, self.rank, self.seed = loader, device, rank, seed
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.dataset.epoch = self.sampler.epoch  # read by draw_flip, also in the workers forked below
        self.dataset.seed_flips(self.seed)
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)

        def upload(batch):
            with torch.cuda.stream(stream):
                return [t.to(self.device, non_blocking=True) for t in batch]

        it = iter(self.loader)
        nxt = next(it, None)
        nxt = upload(nxt) if nxt is not None else None
        while nxt is not None:
            main.wait_stream(stream)
            cur = nxt
            for t in cur:
                t.record_stream(main)  # memory allocated on the side stream is in use on the main stream
            batch = next(it, None)
            nxt = upload(batch) if batch is not None else None
            yield tuple(cur)


class SyntheticLoader:
    """One fixed random image in [-1,1] with label 1, SYNTHETIC_LENGTH samples per epoch, as arcface_torch."""

    def __init__(self, batch_size, device, sampler, seed):
        g = torch.Generator().manual_seed(seed)
        img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
        self.images = img.expand(batch_size, -1, -1, -1).contiguous().to(device)
        self.labels = torch.ones(batch_size, dtype=torch.int64, device=device)
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        for _ in range(len(self)):
            yield self.images, self.labels


def dali_loader(rec_dir, rank, world_size, batch_size, seed, num_threads=2):
    """arcface_torch's DALI pipeline (docs/data.md); raises a RuntimeError naming what is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError("dali=True needs CUDA, but torch.cuda.is_available() is False; set dali=False")
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.pipeline import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy
    except ImportError as e:
        raise RuntimeError(f"dali=True needs NVIDIA DALI (pip package nvidia-dali-cuda120 or similar): {e}") from e

    @pipeline_def
    def pipeline():
        jpegs, labels = fn.readers.mxnet(path=[os.path.join(rec_dir, "train.rec")],
                                         index_path=[os.path.join(rec_dir, "train.idx")], initial_fill=32768,
                                         num_shards=world_size, shard_id=rank, random_shuffle=True,
                                         pad_last_batch=False, name="reader")
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, mean=[127.5] * 3, std=[127.5] * 3,
                                          mirror=fn.random.coin_flip(probability=0.5))
        return images, labels

    pipe = pipeline(batch_size=batch_size, num_threads=num_threads, device_id=torch.cuda.current_device(),
                    seed=seed + rank, prefetch_queue_depth=2)
    pipe.build()
    return DALILoader(DALIClassificationIterator([pipe], reader_name="reader",
                                                 last_batch_policy=LastBatchPolicy.DROP, auto_reset=True))


class DALILoader:
    """Yields (images, int64 labels); DALI shards and shuffles itself, so the sampler only records the epoch and
    mid-epoch resume is not supported."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.sampler, self.epoch = self, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_start_batch(self, k):
        if k:
            raise RuntimeError("mid-epoch resume (set_start_batch) is not supported with dali=True")

    def __len__(self):
        return len(self.iterator)

    def __iter__(self):
        for data in self.iterator:
            yield data[0]["data"], data[0]["label"].squeeze(-1).long()


def get_dataloader(root, local_rank, batch_size, dali=False, seed=2048, num_workers=2, num_classes=None,
                   resize=False):
    """-> loader yielding (images float32 [B,3,112,112] in [-1,1], labels int64 [B]) on the device of local_rank
    (CUDA if available, else CPU); drop_last. loader.sampler.set_epoch(e) reshuffles, set_start_batch(k) skips
    the first k batches of the current epoch."""
    rank, world_size = rank_and_world_size()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if root == "synthetic":
        check_label(1, num_classes, "synthetic data")
        sampler = DistributedSampler(SYNTHETIC_LENGTH, world_size, rank, seed, batch_size, shuffle=False)
        return SyntheticLoader(batch_size, device, sampler, seed)
    is_rec = os.path.isfile(os.path.join(root, "train.rec")) and os.path.isfile(os.path.join(root, "train.idx"))
    if dali:
        if not is_rec:
            raise RuntimeError(f"dali=True needs {root}/train.rec and train.idx")
        return dali_loader(root, rank, world_size, batch_size, seed)
    dataset = (MXFaceDataset if is_rec else ImageFolderDataset)(root, num_classes=num_classes, resize=resize)
    sampler = DistributedSampler(len(dataset), world_size, rank, seed, batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        worker_init_fn=partial(seed_worker, rank=rank, num_workers=num_workers, seed=seed))
    return DeviceLoader(loader, device, rank, seed)
