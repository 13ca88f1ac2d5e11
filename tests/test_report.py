"""--report_to: every metric of metrics.jsonl, at its step, read back from the tracker's own files
(TensorBoard's event file; Weights & Biases' offline run file); a missing tracker package is one
line, exit 2, before anything is written."""

import glob
import json
import time

import pytest

import sgpo
from tests.conftest import read_metrics
from tests.test_e2e import COMMON


def _run(kind, warm_dir, data_file, eval_file, out):
    args = ["--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", 2,
            *COMMON, "--eval_data", eval_file, "--eval_steps", 1, "--report_to", kind,
            "--log_completions", 3]
    assert sgpo.main([str(a) for a in args]) == 0
    _check_samples(read_metrics(out / "completions.jsonl"), read_metrics(data_file))
    return read_metrics(out / "metrics.jsonl")


def _check_samples(samples, problems):
    """--log_completions 3: 3 problems a step, each sample's fields consistent with its rewards and
    its problem, the KD target a correct guided rollout, and none only where none is correct."""
    answers = {q["id"]: q["answer"] for q in problems}
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2]
    for s in samples:
        assert s["answer"] == answers[s["problem_id"]] and 0 <= s["alpha"] <= 0.8
        assert len(s["autonomous_rewards"]) == 4 and len(s["guided_rewards"]) == 2
        assert s["autonomous_reward"] == s["autonomous_rewards"][0]
        assert s["guided_reward"] == s["guided_rewards"][0]
        assert isinstance(s["autonomous_sample"], str) and isinstance(s["guided_sample"], str)
        if s["kd_target"] is None:
            assert s["kd_target_why"] == "no correct guided rollout" and s["kd_target_text"] is None
            assert max(s["guided_rewards"]) == 0
        else:
            assert s["kd_target_why"] == "chosen" and s["guided_rewards"][s["kd_target"]] == 1
            if s["kd_target"] == 0:
                assert s["kd_target_text"] == s["guided_sample"]
    # the toy's warm model: a correct guided rollout on most problems
    assert sum(s["kd_target"] is not None for s in samples) >= 3


def _numbers(record):
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


def test_tensorboard_holds_every_metric_at_its_step(warm_dir, data_file, eval_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = _run("tensorboard", warm_dir, data_file, eval_file, tmp_path / "out")
    (events,) = glob.glob(str(tmp_path / "out" / "runs" / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"scalars": 0})
    acc.Reload()
    # step 0: the evaluation before RL; steps 1-2 with their evaluations
    assert [m["step"] for m in metrics] == [0, 1, 2] and "eval/guided_acc" in metrics[2]
    expected = {(k, m["step"]): v for m in metrics for k, v in _numbers(m).items()}
    logged = {(k, e.step): e.value for k in acc.Tags()["scalars"] for e in acc.Scalars(k)}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config)["max_steps"] == 2
    # --log_completions: the samples as a text table at each step
    tables = {e.step: e.tensor_proto.string_val[0].decode()
              for e in acc.Tensors("completions/text_summary")}
    assert sorted(tables) == [1, 2]
    samples = read_metrics(tmp_path / "out" / "completions.jsonl")
    for s in samples:
        assert s["problem_id"] in tables[s["step"]]


def test_wandb_offline_run_holds_the_metrics_and_flags(warm_dir, data_file, eval_file, tmp_path,
                                                       monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = _run("wandb", warm_dir, data_file, eval_file, tmp_path / "out")
    # the offline run's log (wandb-core's record file, protobuf): every metric's name and the
    # flags are in it (values: the TensorBoard test; wandb ships no reader for this file)
    (run,) = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*" / "run-*.wandb"))
    names = {k for m in metrics for k in _numbers(m)}
    # wandb-core, a process of its own, may still be writing the file when finish() returns on a
    # loaded machine (seen once in a full suite: the file held its header only)
    deadline = time.time() + 30
    data = open(run, "rb").read()
    while not all(k.encode() in data for k in names) and time.time() < deadline:
        time.sleep(0.5)
        data = open(run, "rb").read()
    for k in names:
        assert k.encode() in data, k
    assert b"kd_loss" in data and b"fkl" in data and b"steps_per_generation" in data
    # --log_completions: the samples as a table at each step, read back
    tables = sorted(glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*" / "files" / "media"
                                  / "table" / "completions_*.table.json")))
    assert len(tables) == 2
    ids = []
    for table in tables:
        ids += [row[0] for row in json.load(open(table))["data"]]
    samples = read_metrics(tmp_path / "out" / "completions.jsonl")
    assert sorted(ids) == sorted(s["problem_id"] for s in samples)


@pytest.mark.parametrize("kind,message", [
    ("trackio", "the trackio package is not installed (pip install trackio)"),
    ("mlflow", "must be one of none, tensorboard, wandb, trackio"),
])
def test_missing_or_unknown_tracker_is_one_line(kind, message, data_file, tmp_path, capsys,
                                                monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    # trackio: absent, whether or not this machine has it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trackio" else real(name, *a))
    out = tmp_path / "out"
    assert sgpo.main(["--data", str(data_file), "--output_dir", str(out),
                      "--report_to", kind]) == 2
    assert capsys.readouterr().err == f"error: --report_to: {message}\n"
    assert not out.exists()
