"""Issue 16 (first-hour frictions) and issue 17 point 8 (bad input): nested and merged overrides,
overrides on both sides of --config, where a missing module was looked for, bounded YAML, byte-order
marks, and a measurement read as class labels. In-process where the behaviour is the loader's; real
processes where the entry point's one line, exit code and time are the point."""

from __future__ import annotations

import re
import shlex
import sys
import time

import numpy as np
import pytest
import yaml

from launch import config as config_mod
from launch.data.tabular import build_csv, build_npz
from launch.errors import UserError
from launch.processes.entry import parse
from launch.user_code import import_object
from tests.helpers import PY, ROOT, output, run


def one_line_exit_2(p, *needles: str) -> str:
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in needles), output(p)
    assert p.wall < 15, f"took {p.wall:.1f}s"
    return lines[0]


def write(path, text: str, encoding: str = "utf-8") -> str:
    path.write_text(text, encoding=encoding)
    return str(path)


# --------------------------------------------------------------------------- 1. nested, merged overrides

KWARGS_YAML = """\
model:
  kwargs:
    width: 16
    block: {depth: 2, act: relu}
    keep: [1, 2]
data:
  kwargs: {n: 100, digits: 2}
"""


def test_nested_kwargs_overrides_merge_into_the_files_mapping(tmp_path):
    f = write(tmp_path / "k.yaml", KWARGS_YAML)
    cfg = config_mod.load(f, ["model.kwargs.block.depth=5", "model.kwargs={dropout: 0.1}", "data.kwargs.n=7", "model.kwargs.keep=[3]"])
    assert cfg.model.kwargs == {"width": 16, "block": {"depth": 5, "act": "relu"}, "keep": [3], "dropout": 0.1}
    assert cfg.data.kwargs == {"n": 7, "digits": 2}
    # a new nested key builds its mappings; the file's value is not touched by a later load
    cfg = config_mod.load(f, ["model.kwargs.extra.a.b=1"])
    assert cfg.model.kwargs["extra"] == {"a": {"b": 1}} and cfg.model.kwargs["width"] == 16
    assert config_mod.load(f).model.kwargs["block"] == {"depth": 2, "act": "relu"}


def test_null_removes_a_key_and_empties_the_whole_setting(tmp_path):
    f = write(tmp_path / "k.yaml", KWARGS_YAML)
    cfg = config_mod.load(f, ["model.kwargs.block.act=null", "model.kwargs={keep: null}"])
    assert cfg.model.kwargs == {"width": 16, "block": {"depth": 2}}
    assert config_mod.load(f, ["model.kwargs=null", "model.kwargs.width=8"]).model.kwargs == {"width": 8}  # in order
    assert config_mod.load(f, ["model.kwargs.width=8", "model.kwargs=null"]).model.kwargs == {}
    # inside the file null is a value, passed on as None
    g = write(tmp_path / "n.yaml", "model:\n  kwargs: {dropout: null}\n")
    assert config_mod.load(g).model.kwargs == {"dropout": None}


@pytest.mark.parametrize("override, needle", [
    ("train.lr.x=1", "train.lr takes no dotted sub-keys here (only model.kwargs and data.kwargs do)"),
    ("model.kwarg.x=1", "did you mean 'model.kwargs'?"),
    ("model.kwargs..x=1", "model.kwargs..x: empty key between dots"),
    ("model.kwargs=3", "model.kwargs: expected a mapping, got 3"),
])
def test_bad_dotted_keys_are_one_line(override, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        config_mod.load(None, [override])


# --------------------------------------------------------------------------- 2. overrides on both sides of --config


def test_overrides_before_and_after_config_win_over_the_file(tmp_path):
    f = write(tmp_path / "c.yaml", "train:\n  lr: 0.2\n  epochs: 3\ndata:\n  batch_size: 4\n")
    cfg, _ = parse(["train.lr=0.05", "--config", f, "data.batch_size=8"], "train_single.py", ddp=False)
    assert (cfg.train.lr, cfg.data.batch_size, cfg.train.epochs) == (0.05, 8, 3)
    cfg, nproc = parse(["data.batch_size=2", "--nproc", "2", "-c", f, "train.lr=0.01", "data.batch_size=6"], "train_ddp.py", ddp=True)
    assert (cfg.train.lr, cfg.data.batch_size, nproc) == (0.01, 6, 2)  # the later of two wins, as in a shell script


def test_train_single_takes_overrides_on_both_sides_of_config(tmp_path):
    f = write(tmp_path / "c.yaml", "train:\n  lr: 0.2\n  epochs: 1\ndata:\n  batch_size: 4\n  n_train: 64\n  n_eval: 32\n  features: 4\n")
    run_dir = tmp_path / "r"
    p = run([PY, "train_single.py", "train.lr=0.05", "--config", f, "data.batch_size=8", "model.hidden=[8]",
             "log.progress=false", "train.device=cpu", f"run.dir={run_dir}"], timeout=120)
    assert p.returncode == 0, output(p)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["train"]["lr"], saved["data"]["batch_size"], saved["data"]["n_train"]) == (0.05, 8, 64)


# --------------------------------------------------------------------------- 3. where a missing module was looked for


def test_missing_module_names_the_working_directory_and_pythonpath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path[1:]])  # as `python -m` or a script in the working directory
    monkeypatch.setenv("PYTHONPATH", "/opt/a:/opt/b")
    with pytest.raises(UserError) as e:
        import_object("nosuch_input_mod.sub:Net", "model.name")
    msg = str(e.value)
    assert "cannot import module 'nosuch_input_mod.sub'" in msg and "\n" not in msg
    assert f"looked in the working directory {tmp_path}, PYTHONPATH /opt/a:/opt/b and the installed packages" in msg
    assert msg.endswith("add the directory that holds nosuch_input_mod/ or nosuch_input_mod.py to PYTHONPATH")


def test_missing_module_says_the_scripts_directory_is_not_the_working_directory(tmp_path, monkeypatch):
    # `cd project && python /elsewhere/train_single.py model.name=mynet:Net`: Python searches the
    # script's directory, not the working directory that holds mynet.py
    (tmp_path / "mynet_input.py").write_text("raise SystemExit('must not be imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path[1:]])
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train_single.py")])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with pytest.raises(UserError, match="mynet_input") as e:
        import_object("mynet_input:Net", "model.name")
    assert f"looked in {ROOT} (the script's directory, not the working directory {tmp_path}), PYTHONPATH (empty)" in str(e.value)
    with pytest.raises(UserError, match=r"package 'tests' \(.*tests\) has no module 'nosuch_input'"):
        import_object("tests.nosuch_input:Net", "model.name")


# --------------------------------------------------------------------------- 4. bounded YAML


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs shape: 9 aliases of 9 aliases ... = 9**9 (387 million) strings when expanded."""
    lines = ["model:", "  name: mlp", "  kwargs:", f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def flow_bomb(levels: int = 7, width: int = 10) -> str:
    """The same on one command-line value: {l0: &l0 [lol, ...], l1: &l1 [*l0, ...], ...}."""
    items = [f"l0: &l0 [{', '.join(['lol'] * width)}]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "{" + ", ".join(items) + "}"


def test_alias_bomb_recursion_depth_and_size_are_refused_in_process(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(UserError, match="more than 100,000 values once aliases are expanded"):
        config_mod.load(write(tmp_path / "bomb.yaml", alias_bomb()))
    with pytest.raises(UserError, match="the command line: more than 100,000 values"):
        config_mod.load(None, ["model.kwargs=" + flow_bomb()])
    with pytest.raises(UserError, match=r"alias \*a at line 2 refers to a value that contains it"):
        config_mod.load(write(tmp_path / "loop.yaml", "model:\n  kwargs: &a {self: [*a]}\n"))
    with pytest.raises(UserError, match="values nested more than 100 deep"):
        config_mod.load(write(tmp_path / "deep.yaml", "model:\n  kwargs: {a: " + "[" * 5000 + "]" * 5000 + "}\n"))
    assert time.monotonic() - t0 < 10
    big = write(tmp_path / "big.yaml", "# padding\n" * 120_000)  # 1.2 MB of comments
    with pytest.raises(UserError, match="larger than 1 MiB"):
        config_mod.load(big)
    # what real configs use still works: shared anchors and merge keys, overridden after the merge
    ok = "train: &t {lr: 0.5, epochs: 2}\nmodel:\n  kwargs: {a: *t, b: {<<: *t, lr: 0.1}}\n"
    assert config_mod.load(write(tmp_path / "ok.yaml", ok)).model.kwargs == {"a": {"lr": 0.5, "epochs": 2}, "b": {"lr": 0.1, "epochs": 2}}


def test_alias_bomb_config_is_one_line_exit_2_within_seconds(tmp_path):
    bomb = write(tmp_path / "bomb.yaml", alias_bomb())
    p = run([PY, "train_single.py", "--config", bomb, f"run.dir={tmp_path / 'run'}", "train.device=cpu"], timeout=60)
    one_line_exit_2(p, str(bomb), "more than 100,000 values once aliases are expanded")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bomb.yaml"], "nothing may be written"


# --------------------------------------------------------------------------- 5. byte-order marks


def test_csv_with_a_byte_order_mark_reads_its_first_column_name(tmp_path):
    rows = "".join(f"{'ab'[i % 2]},{i % 5},{(i * 7) % 3},id{i}\n" for i in range(40))
    f = write(tmp_path / "excel.csv", "label,f1,f2,id\n" + rows, encoding="utf-8-sig")
    assert (tmp_path / "excel.csv").read_bytes().startswith(b"\xef\xbb\xbflabel,")
    b = build_csv(config_mod.load(None, ["data.name=csv", f"data.path={f}", "data.target=label", "data.ignore=[id]"]))
    assert b.state["feature_columns"] == ["f1", "f2"] and b.state["target"] == "label" and b.state["class_names"] == ["a", "b"]


def test_yaml_config_with_a_byte_order_mark_is_utf8_whatever_the_locale(tmp_path):
    f = write(tmp_path / "bom.yaml", "# größe: Notepad's UTF-8\ntrain:\n  lr: 0.25\n", encoding="utf-8-sig")
    assert config_mod.load(f).train.lr == 0.25
    # under a bare C locale (a minimal container) Python's default text encoding is ASCII
    code = f"from launch import config; print(config.load({f!r}).train.lr)"
    p = run([PY, "-c", code], timeout=60, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    assert p.returncode == 0 and p.stdout.strip() == "0.25", output(p)


# --------------------------------------------------------------------------- 6. a measurement read as class labels


def test_diabetes_with_a_classification_loss_is_one_line_naming_train_loss_mse(tmp_path):
    p = run([PY, "train_single.py", "--config", "configs/diabetes.yaml", "train.loss=cross_entropy",
             f"run.dir={tmp_path / 'run'}", "train.device=cpu"], timeout=60)
    one_line_exit_2(p, "data/diabetes.csv", "214 distinct numbers in 442 rows", "train.loss=mse", "data.many_classes=true")
    assert not (tmp_path / "run").exists()


def test_many_classes_confirms_and_the_rule_spares_real_classifications(tmp_path):
    b = build_csv(config_mod.load("configs/diabetes.yaml", ["train.loss=cross_entropy", "data.many_classes=true"]))
    assert b.num_classes == 214
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)

    def npz(name, y, *extra):
        np.savez(tmp_path / name, x=x[: len(y)], y=y)
        return build_npz(config_mod.load(None, ["data.name=npz", f"data.path={tmp_path / name}", *extra]))

    for y in (rng.integers(100, 400, 300), rng.integers(100, 400, 300).astype(np.float64)):  # integer measurements
        with pytest.raises(UserError, match="distinct numbers in 300 rows .*train.loss=mse .*data.many_classes=true"):
            npz("m.npz", y)
    assert npz("m.npz", rng.integers(100, 400, 300), "data.many_classes=true").num_classes > 20
    assert npz("c.npz", np.arange(300) % 60).num_classes == 60  # 60 classes, 5 rows each: a classification
    assert npz("s.npz", np.array([f"p{i}" for i in range(300)])).num_classes == 300  # names are never measurements
    assert npz("r.npz", rng.integers(100, 400, 300), "train.loss=mse").num_classes == 1  # regression as asked


# --------------------------------------------------------------------------- issue 22.5: missing values in csv and npz


def csv_cfg(path, *extra):
    return config_mod.load(None, ["data.name=csv", f"data.path={path}", "data.target=label", *extra])


def ones_and_zeros(bad_row: int, value: str, column: str = "label") -> str:
    rows = [{"f1": f"{i * 0.1:.1f}", "f2": str(i % 3), "label": str(i % 2)} for i in range(30)]
    rows[bad_row][column] = value
    return "f1,f2,label\n" + "".join(f"{r['f1']},{r['f2']},{r['label']}\n" for r in rows)


@pytest.mark.parametrize("value", ["nan", "NaN", "None", "NA", "null", "#N/A", "", " "])
@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits", "mse"])
def test_a_missing_label_is_refused_with_file_line_and_column(tmp_path, value, loss):
    f = write(tmp_path / "d.csv", ones_and_zeros(11, value))  # row 11 is line 13 (the header is line 1)
    with pytest.raises(UserError) as e:
        build_csv(csv_cfg(f, f"train.loss={loss}"))
    msg = str(e.value)
    assert msg.startswith(f"{f} line 13, column 'label': ") and "\n" not in msg
    assert ("empty label" if not value.strip() else f"missing label {value!r}") in msg and "not a class" in msg
    # the same value as a class name in its own right is refused too, never a third class 'nan'
    assert build_csv(csv_cfg(write(tmp_path / "ok.csv", ones_and_zeros(11, "1")))).state["class_names"] == ["0", "1"]


def test_missing_features_validation_file_and_regression_targets_name_their_place(tmp_path):
    f = write(tmp_path / "d.csv", ones_and_zeros(4, "nan", column="f2"))
    with pytest.raises(UserError, match=re.escape(f"{f} line 6, column 'f2': feature value 'nan' is not a finite number")):
        build_csv(csv_cfg(f))
    good, val = write(tmp_path / "g.csv", ones_and_zeros(0, "0")), write(tmp_path / "v.csv", ones_and_zeros(20, "None"))
    with pytest.raises(UserError, match=re.escape(f"{val} line 22, column 'label': missing label 'None'")):
        build_csv(csv_cfg(good, f"data.val_path={val}"))
    for value in ("inf", "-Infinity", "1e999", "seven"):
        with pytest.raises(UserError, match=re.escape(f"line 9, column 'label': target value {value!r} is not a finite number")):
            build_csv(csv_cfg(write(tmp_path / "r.csv", ones_and_zeros(7, value)), "train.loss=mse"))
    # strings that merely look like numbers stay class names under a classification loss
    assert build_csv(csv_cfg(write(tmp_path / "s.csv", ones_and_zeros(7, "inf")))).state["class_names"] == ["0", "1", "inf"]


def test_npz_missing_values_name_their_index(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3, 2)), (np.arange(40) % 2).astype(np.float64)

    def build(xs, ys, *extra):
        np.savez(tmp_path / "d.npz", x=xs, y=ys)
        return build_npz(config_mod.load(None, ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", *extra]))

    bad = x.copy()
    bad[17, 2, 1] = np.nan
    with pytest.raises(UserError, match=re.escape("'x' holds non-finite values (the first: nan at sample 17, feature (2, 1))")):
        build(bad, y)
    for labels, needle, extra in [
        (np.where(np.arange(40) == 9, np.nan, y), "'y'[9]: missing label 'nan'", []),  # a 0/1 float column with one NaN
        (np.array(["a", "b"] * 19 + ["None", "a"]), "'y'[38]: missing label 'None'", []),
        (np.array(["a", "b"] * 19 + ["", "a"]), "'y'[38]: empty label", []),
        (np.where(np.arange(40) == 3, np.inf, y), "'y'[3]: target value 'inf' is not a finite number", ["train.loss=mse"]),
        (np.where(np.arange(40) == 5, np.nan, y), "'y'[5]: missing label 'nan'", ["train.loss=l1"]),
    ]:
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'd.npz'}: {needle}")):
            build(x, labels, *extra)
    assert build(x, y).num_classes == 2


# --------------------------------------------------------------------------- issue 22.6: `name:value` without a space


@pytest.mark.parametrize("override, meant", [
    ("model.kwargs={d_model:32}", "{d_model: 32}"),
    ("model.kwargs={n_heads: 4, d_model:32}", "{d_model: 32}"),
    ("model.kwargs.config={_target_:transformers:LlamaConfig}", "{_target_: transformers:LlamaConfig}"),
    ("data.kwargs={sub: {n:7}}", "{n: 7}"),
])
def test_a_colon_without_a_space_on_the_command_line_says_what_was_meant(override, meant):
    with pytest.raises(UserError) as e:
        config_mod.load(None, [override])
    msg = str(e.value)
    assert msg.startswith("the command line: '") and "reads as a key with no value (YAML needs a space after the colon)" in msg
    assert f"write {meant}" in msg and "\n" not in msg and " at line" not in msg


def test_a_colon_without_a_space_in_a_file_names_the_line(tmp_path):
    f = write(tmp_path / "c.yaml", "model:\n  name: x.y:Net\n  kwargs: {n_heads: 4,\n    d_model:32}\n")
    with pytest.raises(UserError, match=re.escape(f"{f}: 'd_model:32' at line 4 reads as a key with no value") + ".*write {d_model: 32}"):
        config_mod.load(f)
    # block style: YAML reads the lines as one string where a mapping belongs
    g = write(tmp_path / "b.yaml", "model:\n  kwargs:\n    d_model:32\n    n_heads:4\n")
    with pytest.raises(UserError, match=re.escape("model.kwargs: expected a mapping, got 'd_model:32 n_heads:4' (YAML needs a space after the colon: "
                                                  "write {d_model: 32, n_heads: 4}, or 'd_model: 32' on a line of its own)")):
        config_mod.load(g)
    with pytest.raises(UserError, match=re.escape("section 'train' must be a mapping, got 'lr:0.1' (YAML needs a space after the colon: write {lr: 0.1}")):
        config_mod.load(write(tmp_path / "t.yaml", "train:\n  lr:0.1\n"))
    # what is not that mistake still reads: a quoted key, a value holding colons, an import path, a key with a value
    h = write(tmp_path / "ok.yaml", "model:\n  name: a.b:C.make\n  kwargs: {\"a:b\": null, url: 'http://x', t: {_target_: m:C}, 'k:v': 1}\n")
    assert config_mod.load(h).model.kwargs == {"a:b": None, "url": "http://x", "t": {"_target_": "m:C"}, "k:v": 1}
    assert config_mod.load(None, ["model.kwargs={d_model: 32}", "log.profile_steps=3:5"]).model.kwargs == {"d_model": 32}


# --------------------------------------------------------------------------- issue 22.13: the extra to install, Class.method


class NotInstalled:
    """A meta-path finder that makes packages look uninstalled: importing them or their submodules
    raises ModuleNotFoundError naming the top-level package, as it does when pip never installed it."""

    def __init__(self, *names: str):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.names:
            raise ModuleNotFoundError(f"No module named '{top}'", name=top)
        return None


def not_installed(monkeypatch, *names: str) -> None:
    for loaded in [m for m in sys.modules if m.partition(".")[0] in names]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled(*names), *sys.meta_path])


def test_a_missing_optional_package_names_its_extra(tmp_path, monkeypatch):
    not_installed(monkeypatch, "transformers", "mlflow")
    with pytest.raises(UserError) as e:
        import_object("transformers:AutoModelForCausalLM.from_config", "model.name")
    assert str(e.value) == ("model.name 'transformers:AutoModelForCausalLM.from_config': cannot import module 'transformers'; transformers is not installed: "
                            "pip install -e \".[hf]\" (the launcher's hf extra) or pip install transformers")
    # the user's own module importing it: the same hint after the usual file:line
    (tmp_path / "hfmodel_input.py").write_text("import torch\nimport transformers\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"raised ModuleNotFoundError: No module named 'transformers' \(at .*\); transformers is not installed: pip install -e \"\.\[hf\]\""):
        import_object("hfmodel_input:Net", "model.name")
    with pytest.raises(UserError, match=re.escape('pip install -e ".[mlflow]" (the launcher\'s mlflow extra) or pip install mlflow-skinny')):
        import_object("mlflow.pytorch:log_model", "train.metrics")


def test_the_extras_table_matches_pyproject():
    import tomllib

    from launch.user_code import OPTIONAL

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    listed = {extra: {re.split(r"[<>=!~ \[;]", req)[0].lower() for req in reqs} for extra, reqs in extras.items() if extra != "test"}
    for extra, package in OPTIONAL.values():  # each hint names an extra that installs the package
        assert package in listed[extra], (package, extra)
    assert set().union(*listed.values()) == {package for _, package in OPTIONAL.values()}  # and every extra's package has a hint


def test_class_method_import_paths_and_their_one_lines():
    from collections import OrderedDict

    assert import_object("collections:OrderedDict.fromkeys", "data.name")("ab") == OrderedDict(a=None, b=None)
    for path, needle in [
        ("collections:OrderedDict.nope", "'collections:OrderedDict' has no 'nope'"),
        ("collections:Nope.fromkeys", "module 'collections' has no 'Nope'"),
        ("collections:OrderedDict..x", "expected 'pkg.module:Name' or 'pkg.module:Class.method' after the colon, got 'OrderedDict..x'"),
    ]:
        with pytest.raises(UserError, match=re.escape(f"train.loss '{path}': {needle}")):
            import_object(path, "train.loss")
    # a metric named by a method is recorded under the method's name; two that would collide are refused
    assert config_mod.load(None, ["train.metrics=[m:Scores.top3]"]).train.metrics == ["m:Scores.top3"]
    with pytest.raises(UserError, match="would be recorded as eval_top3"):
        config_mod.load(None, ["train.metrics=[m:Scores.top3, n:top3]"])


# --------------------------------------------------------------------------- issue 22.12: every documented command has its own run


TRAINING = re.compile(r"((?:[A-Z_]+=\S+\s+)*(?:python3?|torchrun|srun)\b[^`#\n]*?\b(train_single|train_ddp)\.py)([^`#\n]*)")


def documented_commands():
    """(where, command, script, args) for each training command in a code block of the README and docs
    or a comment of a shipped config: the commands a reader copies."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))]
    for path in sources:
        fenced = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            fenced ^= line.startswith("```")
            if (path.suffix == ".md" and fenced) or (path.suffix == ".yaml" and line.startswith("#")):
                for m in TRAINING.finditer(line.split("&&")[-1]):
                    yield f"{path.name}:{n}", " ".join((m.group(1) + m.group(3)).split()), m.group(2), shlex.split(m.group(3))


def test_no_two_documented_commands_share_a_run_directory():
    import contextlib
    import io

    runs: dict[str, dict[str, str]] = {}
    for where, command, script, args in documented_commands():
        with contextlib.redirect_stderr(io.StringIO()):
            cfg, _ = parse(args, script, ddp=script == "train_ddp")
        runs.setdefault(cfg.run.dir, {}).setdefault(command, where)
    shared = {d: c for d, c in runs.items() if len(c) > 1}
    assert not shared, f"a second command would find the first one's run finished ('nothing to do'): {shared}"
    assert len(runs) > 20  # the README's launchers and recipes, the configs' single and DDP commands
