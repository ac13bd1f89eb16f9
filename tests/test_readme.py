"""The README's copy-paste commands are the ones CI and the demo actually run."""
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(REPO_ROOT, path)) as handle:
        return handle.read()


def bash_blocks(text):
    return [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]


def test_readme_test_command_is_what_ci_runs():
    ci_command = read(".ci/run").strip().splitlines()[-1]
    assert ci_command == ("python3 -m venv .venv && .venv/bin/pip install -q -r requirement-test.txt && "
                          ".venv/bin/python -m pytest tests -q")
    # The README shows the same command without pip's -q.
    assert ci_command.replace("pip install -q ", "pip install ") in bash_blocks(read("README.md"))


def test_readme_demo_command_runs_the_demo_script():
    demo = "python3 -m venv .venv && .venv/bin/pip install -r requirement.txt && .venv/bin/python tools/demo.py"
    assert demo in bash_blocks(read("README.md"))
    assert os.path.isfile(os.path.join(REPO_ROOT, "tools", "demo.py"))
