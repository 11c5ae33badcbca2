"""`launch bench`: a smoke run of --quick (a run, not a timing assertion) and its pure pieces."""

from __future__ import annotations

import importlib.util
import json

import pytest

from launch.commands.bench import crossover, markdown, mlp_params, plot
from launch.commands.bench import peers as peers_mod
from launch.commands.bench.workloads import SWEEP_CONFIG

from tests import jobs
from tests.helpers import PY, output, run


@pytest.fixture(autouse=True)
def _one_thread():
    """The loops this file runs in this process use one thread, as the bench's own process does under
    the tests (OMP_NUM_THREADS=1, tests/helpers.py): two threads on tiny MLPs spend most CPU at barriers."""
    with jobs.one_thread():
        yield


def test_mlp_params_match_the_seeds_sizes():
    assert mlp_params(1) == 90_902 and mlp_params(100) == 900_090_002


def test_bench_quick_writes_json_markdown_and_plot(tmp_path):
    p = run([PY, "-m", "launch", "bench", "--quick", "--devices", "cpu", "--out", str(tmp_path)], timeout=170)
    assert p.returncode == 0, output(p)
    res = json.loads((tmp_path / "bench.json").read_text())
    assert [r["scale"] for r in res["sweep"]] == [1, 2] and all(r["wall_s"]["n"] == 2 for r in res["sweep"])
    over = res["overhead"][0]
    assert set(over["loops"]) >= {"launch", "bare", "seed_dataloader"}
    # Our loop and the bare loop must do the very same computation, or the ratio means nothing.
    assert over["launch_equals_bare_weights"] is True
    kinds = {("ddp_world_1" in d, "world_2_gloo" in d) for d in res["ddp"]}
    assert kinds == {(True, False), (False, True)}
    assert res["big_batch"][0]["tflops"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| 1 | cpu | launch |" in md and "x bare loop" in md
    # Peers are optional: each is either timed next to our loop or recorded as not installed.
    peer_run = res["peers"][0]
    assert set(peer_run["loops"]) >= {"launch", "bare", "seed_dataloader"} and set(peer_run["peers"]) == {"lightning", "accelerate"}
    for peer, state in peer_run["peers"].items():
        assert (peer in peer_run["loops"]) == (state != "not installed" and not state.startswith("failed")), (peer, state)
    assert "### Peers" in md
    order = res["data"]["order"]
    assert "### Data path" in md and order["ours"]["added_mb"] < order["whole_epoch_lists"]["added_mb"]
    assert "memory" not in res  # --quick leaves it out (tests/test_bench.py::test_memory_section_...)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench.png").stat().st_size > 1000


def _rows(cpu: dict, acc: dict) -> list[dict]:
    rows = [{"device": "cpu", "scale": s, "params": mlp_params(s), "wall_s": {"median": t, "min": t, "max": t, "n": 1}} for s, t in cpu.items()]
    return rows + [{"device": "cuda", "scale": s, "params": mlp_params(s), "wall_s": {"median": t, "min": t, "max": t, "n": 1}} for s, t in acc.items()]


def test_crossover_interpolates_between_the_sizes_where_the_order_flips():
    c = crossover(_rows({1: 1.0, 5: 8.0, 10: 40.0}, {1: 4.0, 5: 6.0, 10: 7.0}), "cuda")
    assert mlp_params(1) < c["params"] < mlp_params(5)
    assert crossover(_rows({1: 1.0}, {1: 0.5}), "cuda")["params"] is None
    assert "still faster" in crossover(_rows({1: 1.0, 5: 2.0}, {1: 3.0, 5: 4.0}), "cuda")["note"]


def test_markdown_and_plot_from_a_result(tmp_path):
    res = {
        "environment": {"date": "d", "cpu": "c", "threads": 2, "torch": "t", "gpu": None},
        "config": {"epochs": 10},
        "sweep": _rows({1: 1.0}, {}) + [{"scale": 100, "params": mlp_params(100), "device": "cpu", "skipped": "budget"}],
    }
    for r in res["sweep"][:1]:
        r.update(samples_per_s=1e4, tflops=0.005, peak_fraction=None)
    md = markdown(res)
    assert "| 100 | 900,090,002 | cpu | | skipped: budget |" in md and "CPU 575.2 s, MPS 104.0 s" in md
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed")
    assert plot(res, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


def _block_peers(monkeypatch):
    """Make every peer package fail to import, as where none is installed."""
    import sys

    for name in ("lightning", "pytorch_lightning", "accelerate"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


def test_peers_not_installed_are_recorded_and_the_comparison_goes_on(monkeypatch, tmp_path):
    _block_peers(monkeypatch)
    said = []
    out = peers_mod.peer_comparison(SWEEP_CONFIG, 1, "cpu", reps=1, epochs=1, say=said.append)
    assert out["peers"] == {"lightning": "not installed", "accelerate": "not installed"}
    assert set(out["loops"]) == {"launch", "bare", "seed_dataloader"}
    assert all(r["n"] == 1 and r["median"] > 0 for r in out["loops"].values())
    assert len([line for line in said if "not installed" in line]) == 2  # one line each
    res = {"environment": {"date": "d", "cpu": "c", "threads": 1, "torch": "t", "gpu": None}, "config": {"epochs": 1}, "peers": [out]}
    md = markdown(res)
    assert "| 1 | cpu | seed_dataloader |" in md and "lightning: not installed; accelerate: not installed" in md
    if importlib.util.find_spec("matplotlib"):
        assert plot(res, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


def test_a_peer_that_fails_is_recorded_as_failed(monkeypatch):
    _block_peers(monkeypatch)
    monkeypatch.setattr(peers_mod, "find", lambda peer: object() if peer == "lightning" else None)
    monkeypatch.setitem(peers_mod.LOOPS, "lightning", lambda *a: 1 / 0)
    out = peers_mod.peer_comparison(SWEEP_CONFIG, 1, "cpu", reps=1, epochs=1, say=lambda msg: None)
    assert out["peers"]["lightning"].startswith("failed: ZeroDivisionError") and "lightning" not in out["loops"]


@pytest.mark.parametrize("peer", ["lightning", "accelerate"])
def test_an_installed_peer_trains_the_seeds_workload(peer):
    module = peers_mod.find(peer)
    if module is None:
        pytest.skip(f"{peer} is not installed (optional: pip install -e '.[bench]')")
    from launch.commands.bench.workloads import scale_overrides

    out = peers_mod.LOOPS[peer](SWEEP_CONFIG, [*scale_overrides(SWEEP_CONFIG, 1), "train.epochs=2"], "cpu", module)
    assert len(out["epochs"]) == 2 and all(t > 0 for t in out["epochs"])


def test_memory_section_shows_fsdp_holding_one_kth_of_ddps_state():
    """Issue 18: parameters + gradients + optimizer state per rank under FSDP <= 1/k of DDP's plus one block."""
    from launch.commands.bench.memory import markdown, measure

    ddp, fsdp = measure("ddp", 2, "cpu"), measure("fsdp", 2, "cpu")
    assert ddp["state_mb"] > 0 and fsdp["state_mb"] <= ddp["state_mb"] / 2 + 4 * fsdp["largest_block_mb"]
    assert fsdp["params_mb"] == pytest.approx(ddp["params_mb"] / 2, rel=0.01)
    assert fsdp["optimizer_mb"] == pytest.approx(ddp["optimizer_mb"] / 2, rel=0.01)
    table = "\n".join(markdown([ddp, fsdp]))
    assert "| cpu | 2 | fsdp |" in table and "| 0.50 |" in table
