import os
import sys

# Tests import the top-level research scripts (train.py, dataset.py, ...) the way the scripts import each other.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
