"""--save_total_limit: the newest N checkpoints and the one a run resumed from are kept, the others
removed only once a new one is whole; a crash while writing or removing leaves every kept
checkpoint whole."""

import os
import shutil

import pytest

import runtime
import sgpo
from tests.test_e2e import COMMON


def _listing(out):
    return sorted(os.listdir(out))


def _args(tiny_dir, data_file, out, *more):
    args = ["--model", tiny_dir, "--data", data_file, "--output_dir", out, "--save_steps", 1,
            "--save_total_limit", 2, "--reward_workers", 0, *COMMON, *more]
    return [str(a) for a in args]


def test_keeps_the_newest_and_the_one_resumed_from(tiny_dir, data_file, tmp_path):
    """2 steps, then a run resumed from checkpoint-1 that writes 5 checkpoints (2 to 6): left are
    5 and 6, and 1, which it resumed from; each whole."""
    out = tmp_path / "run"
    assert sgpo.main(_args(tiny_dir, data_file, out, "--max_steps", 2)) == 0
    assert _listing(out) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl"]
    resumed = _args(tiny_dir, data_file, out, "--max_steps", 6, "--resume", out / "checkpoint-1")
    assert sgpo.main(resumed) == 0
    assert _listing(out) == ["checkpoint-1", "checkpoint-5", "checkpoint-6", "metrics.jsonl"]
    for name in ("checkpoint-1", "checkpoint-5", "checkpoint-6"):
        assert runtime.checkpoint_damage(str(out / name)) is None
    # every file readable as the others (safetensors writes its own 0600)
    modes = {f: os.stat(out / "checkpoint-6" / f).st_mode & 0o777
             for f in os.listdir(out / "checkpoint-6")}
    assert set(modes.values()) == {os.stat(out / "checkpoint-6" / "config.json").st_mode & 0o777}


def test_a_crash_while_writing_removes_nothing(tiny_dir, data_file, tmp_path, monkeypatch):
    """Ctrl-C while checkpoint-3 is written: checkpoints 1 and 2 are whole and nothing was
    removed; the run resumed from 2 goes on and keeps the newest two, and 2."""
    out = tmp_path / "run"
    real_sync = runtime.sync_to_disk

    def interrupted(path, recursive=True):
        if str(path).endswith("checkpoint-3.tmp"):
            raise KeyboardInterrupt
        return real_sync(path, recursive)

    monkeypatch.setattr(runtime, "sync_to_disk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sgpo.main(_args(tiny_dir, data_file, out, "--max_steps", 4))
    assert _listing(out) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl"]
    assert all(runtime.checkpoint_damage(str(out / f"checkpoint-{s}")) is None for s in (1, 2))
    monkeypatch.setattr(runtime, "sync_to_disk", real_sync)
    assert sgpo.main(_args(tiny_dir, data_file, out, "--max_steps", 4, "--resume")) == 0
    assert _listing(out) == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "metrics.jsonl"]


def test_a_crash_while_removing_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """A checkpoint is renamed to checkpoint-N.tmp before it is removed: cut off in between, it is
    no longer a checkpoint (none to resume from half-removed), and a resume clears it."""
    for step in (1, 2, 3):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "weights").write_text("x")
    real_rmtree = shutil.rmtree

    def cut(path, *a, **k):
        os.remove(os.path.join(path, "weights"))
        raise OSError("power cut")

    monkeypatch.setattr(shutil, "rmtree", cut)
    with pytest.raises(OSError):
        runtime.remove_old_checkpoints(str(tmp_path), 3, limit=1)
    assert runtime.checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-3"),
                                                 str(tmp_path / "checkpoint-1")]
    assert "checkpoint-2.tmp" in os.listdir(tmp_path)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    runtime.prepare_output_dir(str(tmp_path), resumed_step=3)
    assert _listing(tmp_path) == ["checkpoint-1", "checkpoint-3", "metrics.jsonl"]


def test_limit_zero_keeps_all_and_later_steps_stay(tmp_path):
    """0: every checkpoint stays; checkpoints of steps after the one just written (a run resumed
    from an earlier one) are neither counted nor removed."""
    for step in (1, 2, 3, 7):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    runtime.remove_old_checkpoints(str(tmp_path), 3, limit=0)
    assert len(runtime.checkpoints(str(tmp_path))) == 4
    runtime.remove_old_checkpoints(str(tmp_path), 3, limit=2, keep=str(tmp_path / "checkpoint-1"))
    assert _listing(tmp_path) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-7"]
    runtime.remove_old_checkpoints(str(tmp_path), 3, limit=1)
    assert _listing(tmp_path) == ["checkpoint-3", "checkpoint-7"]


def test_resume_on_another_world_size_reseeds_each_rank(capsys):
    """Saved by 2 ranks, resumed by 1: the saved RNG states do not map to ranks, so each rank is
    seeded from (seed, rank, step), a stream of its own that neither the start of a run nor
    another step or rank draws; on the same world size the rank's saved states come back."""
    import random

    import torch

    def draws(seed, rank, step):
        runtime.seed_sampling(seed, rank, step)
        return torch.rand(3).tolist(), random.random()

    optimizer, scheduler = runtime.make_optimizer(torch.nn.Linear(2, 2), 1e-3, sgpo.Config())
    torch.manual_seed(123)
    random.seed(123)
    saved_rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None}
    expected = draws(3, 0, 7)
    others = [draws(3, 1, 7), draws(3, 0, 0), draws(3, 0, 8), draws(4, 0, 7)]
    assert all(other != expected for other in others)
    for rng, want in (([saved_rng, saved_rng], expected), ([saved_rng], None)):
        saved = {"scheduler": scheduler.state_dict(), "rng": rng, "step": 7, "alpha": {}}
        torch.manual_seed(0)  # what a fresh process would hold
        state = runtime.restore_checkpoint("unused", saved, None, (optimizer, scheduler),
                                           {"step": 0, "alpha": None}, seed=3)
        assert state == {"step": 7, "alpha": {}}
        got = torch.rand(3).tolist(), random.random()
        if want is None:  # the same world size: the saved stream
            torch.set_rng_state(saved_rng["torch"])
            random.setstate(saved_rng["python"])
            want = torch.rand(3).tolist(), random.random()
        assert got == want
    assert "sampling reseeded from (seed 3, rank, step 7)" in capsys.readouterr().out


def test_ctrl_c_advice_says_what_is_on_disk(tmp_path):
    """Ctrl-C's line: continue with --resume where a checkpoint is whole; before the first one,
    start over (with --overwrite_output_dir where metrics.jsonl already holds lines)."""
    out = tmp_path / "out"
    assert runtime.interrupted_advice(str(out)).endswith("yet: run the same command again")
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"phase": "sft", "sft_step": 1}\n')
    assert runtime.interrupted_advice(str(out)).endswith("start over with --overwrite_output_dir")
    (out / "checkpoint-3.tmp").mkdir()  # being written when interrupted: not a checkpoint
    assert "start over" in runtime.interrupted_advice(str(out))
    (out / "checkpoint-2").mkdir()
    assert runtime.interrupted_advice(str(out)) == (
        "the checkpoints in --output_dir are whole; continue with --resume")
