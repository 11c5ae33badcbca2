import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Child processes (torchrun, spawn) must import this checkout's launch/ too.
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

# The longest files first (measured): xdist hands whole files to its two workers in collection order,
# and a long file handed out last keeps one worker busy after the other has run out of work.
LONGEST_FIRST = ["test_failures.py", "test_slurm.py", "test_lifecycle.py", "test_bench.py", "test_trackers.py",
                 "test_foundation.py", "test_k8s.py", "test_checkpoint.py", "test_mesh.py", "test_rendezvous.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: each file keeps its own order
