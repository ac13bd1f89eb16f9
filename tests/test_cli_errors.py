"""Every command-line script answers a bad user file with one line and a non-zero exit, and never runs its code.

Five kinds of bad file go through every entry point that reads a user file (train.py --config and its resume
checkpoint, eval_ijbc.py --model-prefix and --features, tools/torch2onnx.py, tools/inference.py, tools/plot_roc.py,
tools/rec_info.py, tools/make_rec.py):

  torch_pickle  a torch.save checkpoint whose unpickling would create a marker file (open(marker, "w"))
  raw_pickle    a plain pickle with the same payload (what np.load(allow_pickle=True) would run)
  object_npy    an object .npy holding the payload
  random        random bytes
  truncated     a valid file of the kind the entry point expects, cut in half

Each case must exit with status 2, print exactly one line `error: ...` on stderr that names the file and says why
it was refused, show no traceback and no advice to load the file unsafely, and the marker must never appear.

Speed: a python start importing torch costs 3-9 s on a busy 2-core machine, too much for ~45 cases. The cases run
in one runner process (python tests/test_cli_errors.py CASES.json) that imports the heavy modules once and then
forks one child per case; the child runs the script as __main__ with its own argv, stdout and stderr, exactly as
`python script.py ...` would after its imports. A few cases also run as plain `python script.py` processes, which
checks that nothing printed at import time breaks the one-line rule.
"""
import ast
import json
import os
import pickle
import re
import subprocess
import sys
import traceback

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("torch_pickle", "raw_pickle", "object_npy", "random", "truncated")
TINY_VIT = '{"embed_dim": 32, "depth": 1, "num_features": 24}'
UNSAFE_ADVICE = ("weights_only=False", "will likely succeed", "allow_pickle", "Traceback")
CLI_SCRIPTS = ["train.py", "eval_ijbc.py"] + sorted(f"tools/{n}" for n in os.listdir(os.path.join(REPO, "tools"))
                                                       if n.endswith(".py") and n != "__init__.py")


class WritesMarker:
    """Unpickling this object calls open(marker, "w"): the file appearing proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- files

def good_files(root, num_images):
    """One valid file per format an entry point reads, to truncate."""
    import torch

    from backbones import get_model
    from utils.recordio import IRHeader, IndexedRecordWriter, encode_image, pack_header

    torch.manual_seed(0)
    files = {"checkpoint": os.path.join(root, "good.pt"), "features": os.path.join(root, "good.npy"),
             "roc": os.path.join(root, "good.npz"), "config": os.path.join(root, "good_config.py"),
             "rec": os.path.join(root, "good_rec")}
    torch.save(get_model("vit_t", **json.loads(TINY_VIT)).state_dict(), files["checkpoint"])
    np.save(files["features"], np.ones((num_images, 48), np.float32))
    np.savez(files["roc"], fpr=np.linspace(0, 1, 50), tpr=np.linspace(0, 1, 50), label="job-IJBC")
    with open(os.path.join(REPO, "configs", "tiny_cpu.py")) as f:
        text = f.read()
    with open(files["config"], "w") as f:
        f.write(text)
    os.makedirs(files["rec"])
    with IndexedRecordWriter(os.path.join(files["rec"], "train.rec"), os.path.join(files["rec"], "train.idx")) as w:
        for key in range(4):
            image = np.full((112, 112, 3), 40 * key, np.uint8)
            w.write_idx(key, pack_header(IRHeader(0, float(key % 2), key, 0), encode_image(image, 90)))
    return files


def bad_bytes(kind, good_path, marker, root):
    """The bytes of a bad file of `kind`; `good_path` is the valid file that `truncated` cuts."""
    import torch

    payload = {"weight": WritesMarker(marker)}
    if kind == "torch_pickle":
        path = os.path.join(root, "payload.pt")
        torch.save(payload, path)
        return open(path, "rb").read()
    if kind == "raw_pickle":
        return pickle.dumps(payload, protocol=2)
    if kind == "object_npy":
        path = os.path.join(root, "payload.npy")
        array = np.empty(2, dtype=object)
        array[0] = WritesMarker(marker)
        np.save(path, array, allow_pickle=True)
        return open(path, "rb").read()
    if kind == "random":
        return np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    data = open(good_path, "rb").read()
    if good_path.endswith(".py"):  # cut inside a dict literal: a syntax error wherever the config is cut
        return data[:data.index(b'"depth"')]
    return data[:len(data) // 2]


def make_cases(root):
    """-> (cases, marker). A case: id, script, argv, the path its error line must name, and a pattern the rest of
    the line must match."""
    from tests.ijb_fixture import make_ijb_fixture

    marker = os.path.join(root, "marker")
    ijb = os.path.join(root, "IJBC")
    num_images = make_ijb_fixture(ijb, num_ids=2, templates_per_id=2)["num_images"]
    good = good_files(root, num_images)
    image = os.path.join(root, "face.png")
    import cv2
    cv2.imwrite(image, np.zeros((112, 112, 3), np.uint8))
    good["rec_file"] = os.path.join(good["rec"], "train.rec")
    refused_ckpt = r"cannot load checkpoint .*: refused or unreadable: (refused|not a PyTorch checkpoint)"
    cases = []

    def add(case_id, script, args, named, pattern):
        cases.append(dict(id=case_id, script=script, args=args, named=named, pattern=pattern))

    for kind in KINDS:
        def place(name, good_key, folder=None):
            folder = folder or os.path.join(root, f"{kind}_{name}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(bad_bytes(kind, good.get(good_key, ""), marker, root))
            return path

        ckpt = place("checkpoint_gpu_0.pt", "checkpoint")
        add(f"train_resume[{kind}]", "train.py",
            ["--config", "configs/tiny_cpu.py", "--opts", f"output={os.path.dirname(ckpt)}", "resume=True"],
            ckpt, refused_ckpt)
        model = place("model.pt", "checkpoint")
        add(f"eval_model[{kind}]", "eval_ijbc.py",
            ["--model-prefix", model, "--image-path", ijb, "--result-dir", os.path.join(root, f"res_{kind}"),
             "--network", "vit_t", "--network-kwargs", TINY_VIT, "--device", "cpu", "--num-workers", "0"],
            model, refused_ckpt)
        add(f"torch2onnx[{kind}]", "tools/torch2onnx.py", [model, "--network", "vit_t", "--network-kwargs", TINY_VIT],
            model, refused_ckpt)
        add(f"inference[{kind}]", "tools/inference.py",
            [image, "--model", model, "--network", "vit_t", "--network-kwargs", TINY_VIT, "--device", "cpu"],
            model, refused_ckpt)
        features = place("features.npy", "features")
        add(f"eval_features[{kind}]", "eval_ijbc.py",
            ["--features", features, "--image-path", ijb, "--result-dir", os.path.join(root, f"res_{kind}")],
            features, rf"expected (a NumPy \.npy file holding )?features \[{num_images}, 2F\]")
        roc = place("ijbc_roc.npz", "roc")
        add(f"plot_roc[{kind}]", "tools/plot_roc.py", [os.path.dirname(roc), "-o", os.path.join(root, "roc.png")],
            roc, r"expected .*'fpr' \(false positive rates|array 'fpr': expected false positive rates")
        if kind != "object_npy":  # a config is Python source: the other kinds cover what a wrong file can be
            config = place("config.py", "config")
            add(f"train_config[{kind}]", "train.py", ["--config", config], config, r"not a valid config file")
        if kind in ("raw_pickle", "random", "truncated"):
            rec_dir = os.path.join(root, f"{kind}_rec")
            os.makedirs(rec_dir)
            with open(os.path.join(good["rec"], "train.idx"), "rb") as f:
                idx = f.read()
            with open(os.path.join(rec_dir, "train.idx"), "wb") as f:
                f.write(idx)
            place("train.rec", "rec_file", rec_dir)
            add(f"rec_info[{kind}]", "tools/rec_info.py", [rec_dir], rec_dir, r"train\.(rec|idx)")
        if kind in ("raw_pickle", "random"):
            listing = place("list.txt", "")
            add(f"make_rec[{kind}]", "tools/make_rec.py", [listing, os.path.join(root, f"out_{kind}")], listing,
                r"expected a list file|expected '<path> <label>'")
    return cases, marker


# ---------------------------------------------------------------- the runner (a separate process)

def exit_status(error):
    """What the interpreter makes of SystemExit(code)."""
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_in_child(case, out_dir):
    """In a forked child: run case["script"] as __main__ with the case's argv and environment, stdout and stderr
    going to files; exit like the interpreter would."""
    import runpy

    os.chdir(REPO)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        handle = os.open(os.path.join(out_dir, f"{case['id']}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    os.environ.pop("TRANSFACE_DEBUG", None)
    os.environ.update(case.get("env", {}))
    sys.argv = [case["script"]] + case["args"]
    try:
        runpy.run_path(os.path.join(REPO, case["script"]), run_name="__main__")
        code = 0
    except SystemExit as error:
        code = exit_status(error)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def runner(cases_file, parallel=2):
    """Import what the scripts import, then fork one child per case (`parallel` at a time); print {id: status}."""
    sys.path.insert(0, REPO)
    import cv2  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    import eval_ijbc  # noqa: F401
    import train  # noqa: F401
    import utils.model_loading  # noqa: F401
    with open(cases_file) as f:
        cases = json.load(f)
    out_dir = os.path.dirname(cases_file)
    status, running = {}, {}
    for case in cases + [None] * parallel:
        if case is not None:
            pid = os.fork()
            if pid == 0:
                run_in_child(case, out_dir)
            running[pid] = case["id"]
        while running and (len(running) >= parallel or case is None):
            pid, raw = os.wait()
            status[running.pop(pid)] = os.waitstatus_to_exitcode(raw)
            if case is None:
                break
    print(json.dumps(status))


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli_errors"))
    cases, marker = make_cases(root)
    cases.append(dict(cases[0], id="debug_switch", env={"TRANSFACE_DEBUG": "1"}))
    with open(os.path.join(root, "cases.json"), "w") as f:
        json.dump(cases, f)
    return root, cases, marker


@pytest.fixture(scope="module")
def results(files):
    root, cases, marker = files
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), os.path.join(root, "cases.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for case in cases:
        with open(os.path.join(root, f"{case['id']}.stderr")) as f:
            out[case["id"]] = (status[case["id"]], f.read())
    return out


def test_payloads_are_live(tmp_path):
    """Guard: loaded without the restrictions, the crafted files do run code."""
    import torch

    marker = tmp_path / "ran"
    for kind in ("torch_pickle", "raw_pickle", "object_npy"):
        path = tmp_path / kind
        path.write_bytes(bad_bytes(kind, "", marker, str(tmp_path)))
        if kind == "torch_pickle":
            torch.load(path, weights_only=False)
        elif kind == "raw_pickle":
            np.load(path, allow_pickle=True)
        else:
            np.load(path, allow_pickle=True)[0]
        assert marker.exists(), kind
        marker.unlink()


def case_ids():
    return [f"{entry}[{kind}]" for kind in KINDS
            for entry in ("train_resume", "eval_model", "torch2onnx", "inference", "eval_features", "plot_roc")] + \
        [f"train_config[{k}]" for k in KINDS if k != "object_npy"] + \
        [f"rec_info[{k}]" for k in ("raw_pickle", "random", "truncated")] + \
        [f"make_rec[{k}]" for k in ("raw_pickle", "random")]


def test_no_code_ran(files, results):
    _, cases, marker = files
    assert sorted(results) == sorted(case_ids() + ["debug_switch"])
    assert not os.path.exists(marker)


@pytest.mark.parametrize("case_id", case_ids())
def test_one_line_error_naming_the_file(files, results, case_id):
    case = next(c for c in files[1] if c["id"] == case_id)
    code, stderr = results[case_id]
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert case["named"] in lines[0]
    assert re.search(case["pattern"], lines[0]), lines[0]
    assert not any(advice in stderr for advice in UNSAFE_ADVICE), lines[0]


def test_debug_switch_shows_the_traceback(results):
    code, stderr = results["debug_switch"]
    assert code == 1 and "Traceback (most recent call last)" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("utils.checkpoint.CheckpointError: cannot load checkpoint")


def test_plain_processes_give_the_same_line(files, results):
    """A few cases as `python script.py ...` (in parallel): nothing printed at import time adds to stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFACE_DEBUG"}
    chosen = ["train_resume[torch_pickle]", "eval_features[object_npy]", "plot_roc[random]"]
    procs = {}
    for case in files[1]:
        if case["id"] in chosen:
            procs[case["id"]] = subprocess.Popen([sys.executable, case["script"], *case["args"]], cwd=REPO, env=env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for case_id, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert (proc.returncode, stderr) == results[case_id]
    assert sorted(procs) == sorted(chosen)


def test_every_cli_uses_run_main():
    """Every script's `if __name__ == "__main__":` block hands main to utils.cli.run_main."""
    for script in CLI_SCRIPTS:
        with open(os.path.join(REPO, script)) as f:
            tree = ast.parse(f.read())
        blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert len(blocks) == 1, script
        calls = [ast.unparse(n) for n in ast.walk(blocks[0]) if isinstance(n, ast.Call)]
        assert "run_main(main)" in calls, (script, calls)


# ---------------------------------------------------------------- the loaders themselves

def test_old_torch_is_refused(tmp_path, monkeypatch):
    import torch

    from utils import checkpoint as ckpt

    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert ckpt.torch_version("2.10.0a0+git1234") == (2, 10) and ckpt.torch_version("2.9.1+cu128") == (2, 9)
    for old in ("2.9.1", "2.5.1+cu121", "1.13.0"):
        monkeypatch.setattr(torch, "__version__", old)
        with pytest.raises(ckpt.CheckpointError) as error:
            ckpt.load(path)
        assert str(error.value) == (
            f"cannot load checkpoint {path}: refused, torch {old} is older than 2.10, whose weights_only=True loader "
            "has known bypasses (code execution before 2.6, memory corruption up to 2.9.1); install torch>=2.10 "
            "(docs/safety.md)")
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert torch.equal(ckpt.load(path)["w"], torch.ones(2))


def test_requirement_floor_matches_the_loader():
    from utils.checkpoint import MIN_TORCH

    with open(os.path.join(REPO, "requirement.txt")) as f:
        floors = dict(re.findall(r"^(torch|torchvision)>=([0-9.]+)$", f.read(), re.M))
    assert floors["torch"] == "%d.%d" % MIN_TORCH
    assert floors["torchvision"] == "0.%d" % (MIN_TORCH[1] + 15)  # torchvision 0.N+15 is built for torch 2.N


def test_refused_checkpoint_message(tmp_path):
    import torch

    from utils import checkpoint as ckpt

    path = tmp_path / "evil.pt"
    torch.save({"weight": WritesMarker(tmp_path / "ran")}, path)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load(path)
    assert str(error.value) == (
        f"cannot load checkpoint {path}: refused or unreadable: refused, it carries code or Python objects (io.open); "
        "nothing in it was run; only tensors, numbers, strings and containers are accepted (torch.load with "
        "weights_only=True)")
    assert not (tmp_path / "ran").exists()


def test_load_array_messages(tmp_path):
    from utils.npio import ArrayFileError, load_array

    np.save(tmp_path / "f.npy", np.ones((4, 6), np.float32))
    np.save(tmp_path / "i.npy", np.ones((4, 6), np.int64))
    raw = (tmp_path / "f.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-5])
    (tmp_path / "obj.npy").write_bytes(bad_bytes("object_npy", "", tmp_path / "ran", str(tmp_path)))
    (tmp_path / "pickle.npy").write_bytes(bad_bytes("raw_pickle", "", tmp_path / "ran", str(tmp_path)))
    np.savez(tmp_path / "r.npz", fpr=np.zeros(3))
    expected = {
        "cut.npy": "expected a float array of shape [4, *], but the file is truncated: 219 bytes, its header "
                   "announces a float32 array of shape [4, 6] (224 bytes)",
        "i.npy": "expected a float array of shape [4, *], got a int64 array of shape [4, 6]",
        "obj.npy": "expected a float array of shape [4, *], got an array of Python objects (dtype object); refused, "
                   "only unpickling could restore it",
        "pickle.npy": "expected a NumPy .npy file holding a float array of shape [4, *], but it does not start with "
                      "the .npy magic (refused, nothing was unpickled)",
    }
    for name, message in expected.items():
        with pytest.raises(ArrayFileError) as error:
            load_array(tmp_path / name, shape=(4, None))
        assert str(error.value) == f"{tmp_path / name}: {message}"
    assert np.array_equal(load_array(tmp_path / "f.npy", shape=(4, None), mmap=True), np.ones((4, 6)))
    with pytest.raises(ArrayFileError, match=r"r\.npz: expected an array 'tpr' \(a float array of shape \[\*\]\); "
                                             r"the archive holds \['fpr'\]"):
        load_array(tmp_path / "r.npz", key="tpr")
    assert not (tmp_path / "ran").exists()


if __name__ == "__main__":
    runner(sys.argv[1])
