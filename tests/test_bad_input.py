"""Issue 12: bad inputs that used to escape through the config file and run.dir (one writer per run
directory, orphaned workers and failing user code: tests/test_lifecycle.py)."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import PY, SMALL, output, run

def one_line_exit_2(p, needle: str) -> str:
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], output(p)
    assert p.wall < 15, f"took {p.wall:.1f}s"
    return lines[0]


# --------------------------------------------------------------------------- bad inputs


def _yaml(tmp_path, name: str, text: str) -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("case", ["run.dir cannot be created", "key twice", "nan", "inf", "colon without a space", "nan label"])
def test_bad_input_classes_are_one_line_before_anything_is_written(tmp_path, case):
    run_dir, extra, needle = tmp_path / "run", [], ""
    # run.dir as a file, under a file, or unwritable: tests/test_lifecycle.py
    if case == "run.dir cannot be created":
        if not sys.platform.startswith("linux"):
            pytest.skip("uses /proc, where nobody (not even root) can create a directory")
        run_dir, needle = "/proc/launch-test-run", "cannot create /proc/launch-test-run under /proc"
    elif case == "key twice":
        extra, needle = ["--config", _yaml(tmp_path, "twice.yaml", "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")], "key 'lr' is given twice in one mapping (lines 2 and 4)"
    elif case == "nan":
        extra, needle = ["--config", _yaml(tmp_path, "nan.yaml", "train:\n  lr: .nan\n")], "train.lr: expected a finite number, got nan"
    elif case == "inf":
        extra, needle = ["--config", _yaml(tmp_path, "inf.yaml", "dist:\n  timeout_s: .inf\n")], "dist.timeout_s: expected a finite number, got inf"
    elif case == "colon without a space":  # issue 22.6: YAML reads {d_model:32} as the key 'd_model:32' with no value
        extra, needle = ["model.name=launch.examples.sums_lm:TinyGPT", "model.kwargs={vocab_size: 13,d_model:32}"], "write {d_model: 32}"
    else:  # issue 22.5: a 0/1 column with a NaN is not three classes
        data = _yaml(tmp_path, "d.csv", "a,b,y\n" + "".join(f"{i},{i % 3},{i % 2 if i != 5 else 'nan'}\n" for i in range(40)))
        extra, needle = ["data.name=csv", f"data.path={data}", "data.target=y"], f"{data} line 7, column 'y': missing label 'nan'"
    before = sorted(p.name for p in tmp_path.iterdir())
    p = run([PY, "train_single.py", *extra, *SMALL, f"run.dir={run_dir}"], timeout=60)
    one_line_exit_2(p, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"
