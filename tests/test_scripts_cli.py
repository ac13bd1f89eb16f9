"""Every script runs the way the docs show it: from the repository root, as its own process, without PYTHONPATH.

Three checks, each in a clean environment (PATH, HOME and the locale only) with the repository root as the working
directory, which is what a user who copies a command from the docs has:

1. --help: every file with a command line (`if __name__ == "__main__":`) in the repository root, tools/, bench/ and
   eval/ is found here by itself, so new scripts are covered without editing this file. `python tools/x.py --help`
   (`python -m eval.x --help` inside a package) must exit 0 without a traceback. A script that forgets to put the
   repository root on sys.path fails here with ModuleNotFoundError, which importing it from a test never shows.
2. The docs' commands: every `python <script>.py ...`, `torchrun ... <script>.py ...` and `python -m <module> ...`
   in README.md, docs/*.md and bench/README.md names a script that exists, and the script's own argument parser
   accepts the command's flags. The script runs as `python <script>.py` would, up to its parse_args(), and stops
   there (nothing is trained or read).
3. Small real runs, the docs' commands that take a few seconds: `python -m eval.zoo`, tools/plot_training.py on a
   log, tools/make_rec.py and tools/rec_info.py on a few images.

Speed: a python start that imports torch costs 2-5 s on the project's 2-core machine. Check 1 starts one process per
script, check 2 one process for all commands; they run two at a time, once for the whole module, and each test then
reads its own result.
"""
import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_DIRS = ("", "tools", "bench", "eval")
DOCS = ["README.md", "bench/README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))
# Scripts the docs name that belong to other projects (a description of where a command came from, not a command
# to run here).
FOREIGN = {"train_v2.py"}
TIMEOUT = 120


def has_main(path):
    """True if the file has a top-level `if __name__ == "__main__":` block."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return any(isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'
               for node in tree.body)


def invocation(relpath):
    """The command line a user types for a script: `-m package.module` inside a package, else the file path."""
    folder, name = os.path.split(relpath)
    if folder and os.path.isfile(os.path.join(REPO, folder, "__init__.py")):
        return ["-m", f"{folder.replace('/', '.')}.{name[:-3]}"]
    return [relpath]


def scripts():
    found = []
    for folder in SCRIPT_DIRS:
        for path in sorted(glob.glob(os.path.join(REPO, folder, "*.py"))):
            if has_main(path):
                found.append(os.path.relpath(path, REPO))
    return found


def clean_env():
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR") if key in os.environ}
    env.setdefault("HOME", "/tmp")
    return env


def run(args, timeout=TIMEOUT):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- the docs' commands

SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", ">&", "<", "(", ")"}


def doc_snippets(text):
    """Code the page shows: lines of fenced blocks (backslash continuations joined), inline `spans` (which may wrap
    lines in the source) and 4-space-indented lines."""
    fence = r"```[^\n]*\n(.*?)```"
    snippets = [line for block in re.findall(fence, text, flags=re.S)
                for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(fence, "", text, flags=re.S)
    snippets += re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", prose)
    snippets += [line for line in re.findall(r"^    (\S.*)$", prose, flags=re.M) if "`" not in line]
    return [" ".join(snippet.split()) for snippet in snippets]


def repo_module(name):
    """`-m name` runs this repository's code (eval.zoo), not a library's (pytest, venv, torch.distributed.launch)."""
    parts = name.split(".")
    return (os.path.isfile(os.path.join(REPO, *parts) + ".py") and
            (len(parts) == 1 or os.path.isfile(os.path.join(REPO, *parts[:-1], "__init__.py"))))


def commands_in(snippet):
    """[(script or '-m module', [args])] for each python/torchrun command in a shell snippet."""
    snippet = re.sub(r"<([\w.-]+)>", r"\1", snippet)  # a <placeholder> is an argument, not a redirection
    try:
        lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    if any(t.startswith("[-") for t in tokens):  # `script.py [--flag X]`: optional flags, shown in brackets
        tokens = [t.strip("[]") for t in tokens]
    found = []
    for i, token in enumerate(tokens):
        if not re.fullmatch(r"(\S*/)?(python3?|torchrun)", token):
            continue
        for j in range(i + 1, len(tokens)):
            t = tokens[j]
            if t in SEPARATORS:
                break
            if t == "-m" and j + 1 < len(tokens) and repo_module(tokens[j + 1]):
                script, start = "-m " + tokens[j + 1], j + 2
            elif t.endswith(".py"):
                script, start = t, j + 1
            else:
                continue
            args = []
            for a in tokens[start:]:
                if a in SEPARATORS or set(a) <= set("<>&|;()"):
                    break
                args.append(a)
            found.append((script, args))
            break
    return found


def doc_commands():
    """{(doc, script): [args, ...]} of every command the docs show."""
    commands = {}
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as f:
            for snippet in doc_snippets(f.read()):
                for script, args in commands_in(snippet):
                    if os.path.basename(script) not in FOREIGN:
                        commands.setdefault((doc, script), [])
                        if args not in commands[(doc, script)]:
                            commands[(doc, script)].append(args)
    return commands


# Runs each (script, args) as `python <script>.py args` / `python -m <module> args` would (sys.path[0] is the script's
# folder, not the working directory) and stops it at the end of its first parse_args(). All in one process, so the
# heavy imports are paid once; that the scripts start on their own is what --help checks, each in its own process.
PARSE_ONLY = r"""
import argparse, contextlib, io, json, os, runpy, sys, traceback

class Parsed(Exception):
    pass

parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
inside = []

def stop_after_parse_args(self, *a, **k):
    inside.append(1)
    parse_args(self, *a, **k)
    raise Parsed

def stop_after_parse_known_args(self, *a, **k):
    result = parse_known_args(self, *a, **k)
    if inside:
        return result
    raise Parsed

argparse.ArgumentParser.parse_args = stop_after_parse_args
argparse.ArgumentParser.parse_known_args = stop_after_parse_known_args
results = []
for script, args in json.loads(sys.argv[1]):
    inside.clear()
    sys.argv = [script] + args
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if script.startswith("-m "):
                sys.path[0] = os.getcwd()
                runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
            else:
                sys.path[0] = os.path.dirname(os.path.abspath(script))
                runpy.run_path(script, run_name="__main__")
        results.append("ok")  # no argument parser (python -m eval.zoo), and it ran cleanly
    except Parsed:
        results.append("ok")
    except SystemExit as e:
        results.append("ok" if e.code in (0, None) else f"exit {e.code}: {err.getvalue().strip()}")
    except BaseException:
        results.append(traceback.format_exc())
print(json.dumps(results))
"""


# ---------------------------------------------------------------- one pass over all processes

SCRIPTS = scripts()
DOC_COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def results():
    """Every --help (a process each) and the docs' commands (one process), two processes at a time."""
    checks = sorted({(script, tuple(args)) for (_doc, script), arg_lists in DOC_COMMANDS.items()
                     for args in arg_lists
                     if script.startswith("-m ") or os.path.isfile(os.path.join(REPO, script))})
    jobs = [["-c", PARSE_ONLY, json.dumps(checks)]] + [invocation(s) + ["--help"] for s in SCRIPTS]
    with ThreadPoolExecutor(2) as pool:
        docs, *helps = pool.map(run, jobs)
    assert docs.returncode == 0, docs.stderr
    out = dict(zip(checks, json.loads(docs.stdout.strip().splitlines()[-1])))
    out.update(zip(SCRIPTS, helps))
    return out


def test_discovery_finds_the_known_scripts():
    for script in ("train.py", "eval_ijbc.py", "tools/demo.py", "tools/plot_training.py", "bench/dpap.py",
                   "eval/zoo.py"):
        assert script in SCRIPTS
    assert "dataset.py" not in SCRIPTS and "eval/ijb.py" not in SCRIPTS  # modules without a command line
    assert invocation("eval/zoo.py") == ["-m", "eval.zoo"] and invocation("tools/demo.py") == ["tools/demo.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(results, script):
    proc = results[script]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    if script != "eval/zoo.py":  # prints the zoo table whatever its arguments
        assert "usage:" in proc.stdout


def test_doc_commands_are_found():
    """The parser of the docs sees the commands it should, flags and all."""
    assert ["--config", "configs/ms1mv2_vit_s.py"] in DOC_COMMANDS[("README.md", "train.py")]  # after torchrun
    assert [] in DOC_COMMANDS[("docs/visualization.md", "-m eval.zoo")]
    assert ["--threads", "1", "--probs", "0.2", "1.0"] in DOC_COMMANDS[("bench/README.md", "bench/dpap.py")]
    assert commands_in("python3 -m venv .venv && .venv/bin/pip install -r requirement.txt && "
                       ".venv/bin/python tools/demo.py") == [("tools/demo.py", [])]
    assert commands_in('python -c "import cv2; print(1)"') == []
    assert commands_in("nice -n 19 python bench/scale.py --steps 2 # MS1MV2") == [("bench/scale.py",
                                                                                   ["--steps", "2"])]
    assert commands_in("python tools/plot_training.py <output> -o x.png") == [("tools/plot_training.py",
                                                                              ["output", "-o", "x.png"])]


@pytest.mark.parametrize("doc,script", sorted(DOC_COMMANDS))
def test_doc_command(results, doc, script):
    if not script.startswith("-m "):
        assert os.path.isfile(os.path.join(REPO, script)), f"{doc} runs {script}, which does not exist"
    failures = {" ".join(args): results[(script, tuple(args))] for args in DOC_COMMANDS[(doc, script)]
                if results[(script, tuple(args))] != "ok"}
    assert not failures, f"{doc}: {script}: {failures}"


# ---------------------------------------------------------------- small real runs

def test_eval_zoo_prints_the_table():
    proc = run(["-m", "eval.zoo"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| MS1MV2 |") == 3 and proc.stdout.count("| Glint360K |") == 3


def test_plot_training_on_a_log(tmp_path):
    log = tmp_path / "run" / "training.log"
    log.parent.mkdir()
    log.write_text("".join(
        f"Training: 2023-03-17 10:11:12,345-Speed 100.0 samples/sec   Loss {70 - step / 10:.4f}   LearningRate "
        f"0.000100   Epoch: 0   Global Step: {step}   Required: 1 hours\n" for step in range(10, 60, 10)) +
        "Training: 2023-03-17 10:11:12,345-[lfw][50]Accuracy-Flip: 0.90000+-0.01000\n")
    proc = run(["tools/plot_training.py", str(log.parent), "-o", str(tmp_path / "curves.png")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == ("run: steps 10..50; loss 69.00 at step 10 (start), 65.00 at step 50 (end); "
                                           "LR peak 0.0001 at step 10; verification targets ['lfw']")
    assert cv2.imread(str(tmp_path / "curves.png")) is not None


def test_make_rec_and_rec_info(tmp_path):
    src, out = tmp_path / "faces", tmp_path / "rec"
    rng = np.random.default_rng(0)
    for c in range(2):
        (src / f"id{c}").mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(src / f"id{c}" / f"{i}.png"), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    proc = run(["tools/make_rec.py", str(src), str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 images of 2 identities" in proc.stdout
    proc = run(["tools/rec_info.py", str(out), "--check"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
