"""scripts/gpu_check.py in its CPU mode, end to end, as on a GPU machine without datasets,
datasketch, langdetect or deepspeed: every run trains and reports tokens/s, peak memory and the
memory model's prediction; `make bench`'s section renders the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # three short trainings, one of them compiled

ABSENT = ("datasets", "datasketch", "langdetect", "deepspeed")

# Installed in every Python process the check starts (PYTHONPATH): importing any of ABSENT
# fails as if it were not installed.
BLOCKER = f"""
import sys

class _Absent:
    names = {ABSENT!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(root / "site"), "GPU_CHECK_TMP": str(root),
           "OMP_NUM_THREADS": "1"}
    out = root / "cpu.json"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--cpu", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), root


def test_the_blocker_blocks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def test_every_run_reports_speed_memory_and_the_prediction(cpu_check):
    report, root = cpu_check
    assert not list(root.glob("gpu-check-*"))  # each run's folder removed, no checkpoint kept
    assert report["mode"] == "cpu" and report["device"] == "cpu"
    assert [r["name"] for r in report["runs"]] == [
        "gpu-125m eager", "gpu-125m compiled", "gpu-1b + activation checkpointing"]
    for run in report["runs"]:
        assert run["error"] is None
        assert run["tokens_per_s"] > 0 and run["steps"]["timed"] >= 1
        assert run["peak_memory_bytes"] > 0
        predicted = run["predicted"]
        assert run["predicted_memory_bytes"] == sum(
            predicted[k] for k in ("weights", "grads", "optimizer", "buffers", "activations"))
        assert predicted["activations"] > 0 and predicted["weights"] == 4 * run["params"]
        assert run["mfu"] is None  # no peak for a CPU
        assert run["precision"] == "bf16-mixed" and run["vocab_size"] == 512
    compiled, ckpt = report["runs"][1], report["runs"][2]
    assert compiled["compile"] and ckpt["checkpointing"]
    # The tiny 1b keeps the recipe's grouped-query attention; the prediction counts
    # checkpointing (only each layer's input is kept, plus one layer's activations).
    eager = report["runs"][0]
    assert ckpt["predicted"]["activations"] < eager["predicted"]["activations"]


def test_mfu_uses_the_named_devices_dense_bf16_peak():
    sys.path.insert(0, "scripts")
    import gpu_check

    assert gpu_check.peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu_check.peak_flops("NVIDIA A10G") is None


def test_bench_renders_the_file_with_the_device_named(cpu_check, tmp_path, monkeypatch):
    from bench import gpu

    report, _ = cpu_check
    report = {**report, "mode": "gpu", "device": "NVIDIA H200", "gpus": 1}
    report["runs"] = [{**r, "mfu": 0.5, "device": "NVIDIA H200"} for r in report["runs"]]
    text = gpu.render(report)
    assert "NVIDIA H200" in text and "50.0%" in text
    assert "gpu-125m compiled" in text and "predicted" in text.lower()
