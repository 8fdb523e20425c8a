"""Smoke test of benchmarks/bench_dispatch.py --quick (no timed assertions: speed goals live in the benchmark)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_dispatch_quick_runs_and_writes_tables(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dispatch.py"), "--quick", "--out", str(tmp_path),
         "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "dispatch_cpu_fp32_quick.json").read_text())
    variants = {r["variant"] for r in data["rows"]}
    assert {"active-dense", "dense-all", "ours-loop", "ours-sorted"} <= variants
    # every MoE variant was checked against the dense oracle before timing
    for r in data["rows"]:
        if r["variant"] not in ("active-dense", "dense-all"):
            assert r["max_abs_diff_vs_oracle"] is not None and r["max_abs_diff_vs_oracle"] < 1e-4
    assert (tmp_path / "dispatch_cpu_fp32_quick.csv").read_text().startswith("shape,")
    assert 0 < data["inference"]["ratio"]


def test_bench_dispatch_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dispatch.py"), "--repeats", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--repeats" in proc.stderr


def test_bench_multiseed_quick_runs_and_writes_tables(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_multiseed.py"), "--quick", "--out", str(tmp_path),
         "--seeds", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "multiseed_cpu_fp32_quick.json").read_text())
    assert {r["case"] for r in data["rows"]} == {"moe", "dense"}
    for r in data["rows"]:
        # the stacked run's seed 0 was checked against fit before anything was timed
        assert r["max_loss_diff_seed0"] < 1e-3
        assert r["ratio"] > 0 and r["seeds"] == 3
        assert sum(r["where_time_goes"]["share"].values()) >= 0.99  # every second is attributed somewhere
    assert (tmp_path / "multiseed_cpu_fp32_quick.csv").read_text().startswith("case,")


def test_bench_multiseed_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_multiseed.py"), "--cases", "moe,nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--cases" in proc.stderr
