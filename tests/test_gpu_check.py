"""tests/gpu_check.sh on a CPU: its scaled-down run passes without pytest (a GPU box installs
requirements.txt only) and says what it skipped; a NaN in the loss or a missing package makes it
fail, with the reason on its last line."""

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT


def _check(tmp_path, name, env=None, shim=None):
    """Runs the check in tmp_path/name; shim: {module: source} on PYTHONPATH (every part)."""
    paths = []
    if shim:
        folder = tmp_path / f"{name}-shim"
        folder.mkdir()
        for module, source in shim.items():
            (folder / f"{module}.py").write_text(source)
        paths.append(str(folder))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
                "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", "tests/gpu_check.sh", str(tmp_path / name)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300)


NO_PYTEST = {"pytest": "raise ImportError('pytest: not on a GPU box')"}


def test_cpu_run_passes_without_pytest_and_lists_what_it_skipped(tmp_path):
    proc = _check(tmp_path, "run", shim=NO_PYTEST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["gpu_check"] == "passed" and summary["skipped"] == ["memory", "memory-sim"]
    for part in ("deps", "build", "train-ddp", "train-fsdp", "kernels", "resume", "speed"):
        assert part in summary, part
    for mode in ("ddp", "fsdp"):
        train = summary[f"train-{mode}"]
        assert train["kd/target_frac"] > 0 and train["rollout_probs_diff_max"] < 1e-4
    assert summary["kernels"]["kv_cache_greedy_equal"]
    assert summary["resume"]["final_weights_bitwise"]  # fp32 on a CPU
    assert "== speed" in (tmp_path / "run" / "gpu_check.log").read_text()  # the log is kept


FAULTS = {
    "nan": ({"env": {"GPU_CHECK_FAULT": "nan"}},
            "gpu_check: FAILED: train-ddp (exit 1): gpu_check: FAIL: train ddp: loss/grpo is nan "
            "at rl step 1"),
    "missing package": ({"shim": {"math_verify": "raise ImportError('no')"}},
                        "gpu_check: FAILED: deps (exit 1): gpu_check: FAIL: missing package(s) "
                        "math_verify: pip install -r requirements.txt"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_fails_with_the_reason_on_the_last_line(fault, tmp_path):
    """GPU_CHECK_FAULT=nan (a NaN in the first RL step's GRPO loss), or a runtime package that
    does not import."""
    how, last_line = FAULTS[fault]
    proc = _check(tmp_path, "fault", **how)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == last_line
