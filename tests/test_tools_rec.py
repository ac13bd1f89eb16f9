import os
import subprocess
import sys

import cv2
import numpy as np

from utils.recordio import IRHeader, IndexedRecordReader, IndexedRecordWriter, decode_image, pack_header, unpack_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def make_folder(root, shapes):
    """root/<id>/<i>.<ext>; shapes[c] lists the (h, w) of identity c's images. -> {path: BGR image}"""
    rng = np.random.default_rng(0)
    out = {}
    for c, sizes in enumerate(shapes):
        os.makedirs(os.path.join(root, f"id{c:02d}"))
        for i, (h, w) in enumerate(sizes):
            path = os.path.join(root, f"id{c:02d}", f"{i}.png")
            out[path] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            cv2.imwrite(path, out[path])
    return out


def test_make_rec_image_folder_with_resize_and_rec_info(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    images = make_folder(src, [[(112, 112)], [(112, 112), (80, 96)], [(112, 112)] * 3])
    jpg = os.path.join(src, "id00", "1.jpg")  # a 112x112 JPEG is stored byte for byte
    ok, buf = cv2.imencode(".jpg", np.full((112, 112, 3), 77, np.uint8))
    buf.tofile(jpg)
    r = run("tools/make_rec.py", src, out, "--resize")
    assert r.returncode == 0, r.stderr
    assert "wrote 7 images of 3 identities" in r.stdout
    with open(os.path.join(out, "property")) as f:
        assert f.read() == "3,112,112\n"
    reader = IndexedRecordReader(os.path.join(out, "train.rec"), os.path.join(out, "train.idx"))
    assert list(reader.keys) == list(range(11))
    header, payload = unpack_header(reader.read_idx(0))
    assert header.flag == 2 and header.label.tolist() == [8, 11] and (header.id, header.id2) == (0, 1) and not payload
    paths = [os.path.join(src, "id00", "0.png"), jpg, os.path.join(src, "id01", "0.png"),
             os.path.join(src, "id01", "1.png")] + [os.path.join(src, "id02", f"{i}.png") for i in range(3)]
    for key, (path, label) in enumerate(zip(paths, [0, 0, 1, 1, 2, 2, 2]), 1):
        header, payload = unpack_header(reader.read_idx(key))
        assert (header.flag, header.label, header.id) == (0, label, key)
        if path == jpg:
            assert payload == buf.tobytes()
            continue
        img = images[path]
        if img.shape[:2] != (112, 112):
            img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA)
        # re-encoded like insightface: OpenCV JPEG quality 95 of the BGR image
        ref = cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(decode_image(payload, path), ref[:, :, ::-1])
    assert [unpack_header(reader.read_idx(k))[0].label.tolist() for k in (8, 9, 10)] == [[1, 3], [3, 5], [5, 8]]

    r = run("tools/rec_info.py", out)
    assert r.returncode == 0, r.stderr
    assert "records: 11" in r.stdout and "header (key 0): flag=2 label=[8.0, 11.0] id=0 id2=1" in r.stdout
    assert "images: 7 (keys 1..7)" in r.stdout and "identities: 3" in r.stdout and "label range: 0..2" in r.stdout
    r = run("tools/rec_info.py", out, "--check")
    assert r.returncode == 0 and "check: all images decode" in r.stdout, r.stderr


def test_make_rec_without_resize_rejects_other_sizes(tmp_path):
    src = str(tmp_path / "src")
    make_folder(src, [[(112, 112), (64, 64)]])
    r = run("tools/make_rec.py", src, str(tmp_path / "out"))
    assert r.returncode != 0
    assert f"{os.path.join(src, 'id00', '1.png')}: image is 64x64, expected 112x112 (use --resize)" in r.stderr


def test_make_rec_from_list_file_groups_by_label(tmp_path):
    src = str(tmp_path / "src")
    images = make_folder(src, [[(112, 112)] * 4])
    paths = sorted(images)
    lst = tmp_path / "train.lst"
    # unsorted labels; relative paths are relative to the list file
    lst.write_text("".join(f"{os.path.relpath(p, tmp_path)} {lab}\n" for p, lab in zip(paths, [1, 0, 1, 0])))
    r = run("tools/make_rec.py", str(lst), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    reader = IndexedRecordReader(str(tmp_path / "out" / "train.rec"), str(tmp_path / "out" / "train.idx"))
    labels = [unpack_header(reader.read_idx(k))[0].label for k in range(1, 5)]
    assert labels == [0, 0, 1, 1]
    assert [unpack_header(reader.read_idx(k))[0].label.tolist() for k in (5, 6)] == [[1, 3], [3, 5]]
    r = run("tools/rec_info.py", str(tmp_path / "out"), "--check")
    assert r.returncode == 0 and "label range: 0..1" in r.stdout, r.stderr


def test_rec_info_check_reports_first_bad_record(tmp_path):
    ok, good = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))
    with IndexedRecordWriter(str(tmp_path / "train.rec"), str(tmp_path / "train.idx")) as w:
        for key, payload in enumerate([good.tobytes(), b"\xff\xd8broken", b"also broken"]):
            w.write_idx(key, pack_header(IRHeader(0, float(key), key, 0), payload))
    r = run("tools/rec_info.py", str(tmp_path))
    assert r.returncode == 0 and "header: none" in r.stdout and "label range: 0..2" in r.stdout, r.stderr
    r = run("tools/rec_info.py", str(tmp_path), "--check")
    assert r.returncode == 2
    assert f"{tmp_path / 'train.rec'}: record key 1: cannot decode image" in r.stderr
