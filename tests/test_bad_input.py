"""Bad input and hostile environments: every case is one line on stderr, exit code 2, and nothing
written (or, where the input can be handled, the documented behaviour). CASES is the reliability
table of docs/reliability.md: each row's line is asserted here exactly (TMP = the test's temporary
folder) and must appear there."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import extract_strategies as ex
import inputs
import runtime
import sgpo
from tests.conftest import ROOT, read_metrics, tiny_rows, write_jsonl

SCRIPTS = {"sgpo.py": sgpo, "evaluate.py": evaluate, "extract_strategies.py": ex}


def _proc_error() -> str:
    """What creating a file in /proc says here: ENOENT as root (the table's line), EACCES for other
    users."""
    try:
        os.close(os.open("/proc/sgpo-probe", os.O_CREAT | os.O_WRONLY))
    except OSError as e:
        return e.strerror
    return "created"


PROC_ERROR = _proc_error()
# characters = tokens of the tiny model, whose context (max_position_embeddings) is 1024
LONG = "x" * 1100


def _data(tmp, edit=None, name="d.jsonl", n=16):
    rows = tiny_rows(n)
    if edit:
        edit(rows)
    write_jsonl(tmp / name, rows)
    return tmp / name


def _no_chat_template(tmp, tiny_dir):
    shutil.copytree(tiny_dir, tmp / "nochat")
    os.remove(tmp / "nochat" / "chat_template.jinja")
    cfg = json.loads((tmp / "nochat" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp / "nochat" / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp / "nochat"


def _sliding(tmp, tiny_dir):
    """The tiny model with sliding-window attention layers."""
    shutil.copytree(tiny_dir, tmp / "sliding")
    cfg = json.loads((tmp / "sliding" / "config.json").read_text())
    cfg.pop("layer_types", None)
    cfg.update(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    (tmp / "sliding" / "config.json").write_text(json.dumps(cfg))
    return tmp / "sliding"


def _afile(tmp):
    (tmp / "afile").write_text("not a folder")
    return tmp / "afile"


def _damaged(tmp, run_dir, damage):
    shutil.copytree(run_dir, tmp / "run")
    ckpt = tmp / "run" / "checkpoint-2"
    damage(ckpt)
    return ckpt


def _cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _sgpo(c, *extra, data=None):
    return [
        "--model", c["tiny_dir"], "--data", data or c["data_file"], "--eval_data", "",
        "--output_dir", c["tmp"] / "out", *extra
    ]


def _eval(c, bench, *extra, model=None):
    return [
        "--model", model or c["tiny_dir"], "--bench", f"b={bench}:1", "--output_dir",
        c["tmp"] / "out", "--max_new_tokens", 4, *extra
    ]


def _extract(c, *extra, input=None, output=None):
    return [
        "--input", input or _data(c["tmp"]), "--output", output or c["tmp"] / "out.jsonl",
        "--model", "m", *extra
    ]


def _bench(tmp, problem="pick a1"):
    write_jsonl(tmp / "b.jsonl", [{"problem": problem, "answer": "3"}])
    return tmp / "b.jsonl"


SURROGATE = lambda rows: rows[0].update(problem="a \ud800")  # noqa: E731  (valid JSON: "a \\ud800")

# (script, case, argv from the fixtures, the one line printed); every case exits with 2 and writes
# nothing.
CASES = [
    (
        "sgpo.py", "a batch that does not split into `--steps_per_generation` mini-batches",
        lambda c: _sgpo(c, "--batch_size", 6, "--steps_per_generation", 4),
        "error: --steps_per_generation: 4 mini-batches do not divide the global batch of 6 x 1 "
        "problems into 4 x 1 equal parts (--batch_size must be a multiple of 4)"
    ),
    (
        "sgpo.py", "a problem holding a lone UTF-16 surrogate",
        lambda c: _sgpo(c, data=_data(c["tmp"], SURROGATE)),
        "error: TMP/d.jsonl:1: problem: holds a lone UTF-16 surrogate (not text)"
    ),
    (
        "sgpo.py",
        "a problem longer than the model's context",
        lambda c: _sgpo(c, data=_data(c["tmp"], lambda rows: rows[1].update(problem=LONG))),
        "error: TMP/d.jsonl:2: problem: needs 1239 tokens with the response, more than the "
        "model's context of 1024 (max_position_embeddings)",
    ),
    (
        "sgpo.py",
        "a strategy that makes the guided prompt too long",
        lambda c: _sgpo(c, data=_data(c["tmp"], lambda rows: rows[2].update(strategy=LONG))),
        "error: TMP/d.jsonl:3: strategy: needs 1289 tokens with the response, more than the "
        "model's context of 1024 (max_position_embeddings)",
    ),
    (
        "sgpo.py",
        "a warm-up solution too long for the context",
        lambda c: _sgpo(
            c, "--sft_epochs", 1, data=_data(c["tmp"], lambda rows: rows[3].update(solution=LONG))
        ),
        "error: TMP/d.jsonl:4: solution: needs 1199 tokens with the response, more than the "
        "model's context of 1024 (max_position_embeddings)",
    ),
    (
        "sgpo.py",
        "a model whose tokenizer has no chat template",
        lambda c: _sgpo(c) + ["--model", _no_chat_template(c["tmp"], c["tiny_dir"])],
        "error: --model TMP/nochat: its tokenizer has no chat template (an instruct/chat model is "
        "needed)",
    ),
    (
        "sgpo.py", "a --model path that is not a folder (a hub id is org/name)",
        lambda c: _sgpo(c) + ["--model", c["tmp"] / "out" / "nomodel"],
        "error: --model TMP/out/nomodel: no such folder",
    ),
    (
        "sgpo.py", "`--share_prompts true` with a model of sliding-window layers",
        lambda c: _sgpo(c, "--share_prompts", "true")
        + ["--model", _sliding(c["tmp"], c["tiny_dir"])],
        "error: --share_prompts true: TMP/sliding needs SDPA attention and no sliding-window "
        "layer (a custom mask replaces the model's)",
    ),
    (
        "sgpo.py", "--output_dir is an existing file",
        lambda c: _sgpo(c, "--output_dir", _afile(c["tmp"])),
        "error: --output_dir TMP/afile: is not a directory"
    ),
    (
        "sgpo.py", "--output_dir under a file",
        lambda c: _sgpo(c, "--output_dir", _afile(c["tmp"]) / "out"),
        "error: --output_dir TMP/afile/out: TMP/afile is not a directory"
    ),
    (
        "sgpo.py", "--output_dir under /proc", lambda c: _sgpo(c, "--output_dir", "/proc/sgpo-out"),
        "error: --output_dir /proc/sgpo-out: cannot write there (No such file or directory)"
    ),
    (
        "sgpo.py", "an unreadable data file (mode 000)", lambda c: _sgpo(c, data=c["unreadable"]),
        "error: TMP/unreadable.jsonl: cannot read (Permission denied)"
    ),
    (
        "sgpo.py", "--resume with no checkpoint in --output_dir", lambda c: _sgpo(c, "--resume"),
        "error: --resume: no checkpoint in TMP/out (to start over there: --overwrite_output_dir)"
    ),
    (
        "sgpo.py", "--resume naming a folder that is not there",
        lambda c: _sgpo(c, "--resume", c["tmp"] / "nope"), "error: --resume TMP/nope: not a folder"
    ),
    (
        "sgpo.py",
        "--resume naming a checkpoint with an empty trainer_state.pt",
        lambda c: _sgpo(
            c, "--resume",
            _damaged(c["tmp"], c["run_dir"], lambda d: _cut(d / "trainer_state.pt", 0))
        ),
        "error: --resume TMP/run/checkpoint-2: trainer_state.pt: cannot be loaded (EOFError)",
    ),
    (
        "sgpo.py",
        "--resume naming a checkpoint whose trainer_state.pt was cut",
        lambda c: _sgpo(
            c, "--resume",
            _damaged(c["tmp"], c["run_dir"], lambda d: _cut(d / "trainer_state.pt", 2000))
        ),
        "error: --resume TMP/run/checkpoint-2: trainer_state.pt: cannot be loaded (RuntimeError)",
    ),
    (
        "sgpo.py",
        "--resume naming a checkpoint whose model.safetensors was cut",
        lambda c: _sgpo(
            c, "--resume",
            _damaged(c["tmp"], c["run_dir"], lambda d: _cut(d / "model.safetensors", 5000))
        ),
        "error: --resume TMP/run/checkpoint-2: model.safetensors: damaged or cut short (5000 "
        "bytes)",
    ),
    (
        "sgpo.py", "--resume with another --teacher than the checkpoint's",
        lambda c: _sgpo(
            c, "--resume", _damaged(c["tmp"], c["run_dir"], lambda d: None), "--teacher", "ema"
        ),
        "error: --resume TMP/run/checkpoint-2: written with --teacher live; resume with it",
    ),
    (
        "sgpo.py",
        "--resume naming a checkpoint of a --teacher ema run whose teacher weights are missing",
        lambda c: _sgpo(
            c, "--resume", _damaged(c["tmp"], c["run_dir"], _teacher_lost), "--teacher", "ema"
        ),
        "error: --resume TMP/run/checkpoint-2: teacher/config.json: missing",
    ),
    (
        "sgpo.py",
        "--resume where every checkpoint is damaged",
        lambda c: _sgpo(c, "--resume") + ["--output_dir", _all_cut(c)],
        "error: --resume: no whole checkpoint in TMP/run (TMP/run/checkpoint-2/model.safetensors: "
        "damaged or cut short "
        "(0 bytes); TMP/run/checkpoint-1/model.safetensors: damaged or cut short (0 bytes)); to "
        "start over: "
        "--overwrite_output_dir",
    ),
    (
        "evaluate.py", "a benchmark problem holding a lone UTF-16 surrogate",
        lambda c: _eval(c, _data(c["tmp"], SURROGATE, "b.jsonl", n=1)),
        "error: TMP/b.jsonl:1: problem: holds a lone UTF-16 surrogate (not text)"
    ),
    (
        "evaluate.py",
        "a benchmark prompt longer than the model's context",
        lambda c: _eval(c, _bench(c["tmp"], LONG)),
        "error: TMP/b.jsonl:1: problem: needs 1192 tokens with the response, more than the "
        "model's context of 1024 (max_position_embeddings)",
    ),
    (
        "evaluate.py",
        "a model whose tokenizer has no chat template",
        lambda c: _eval(c, _bench(c["tmp"]), model=_no_chat_template(c["tmp"], c["tiny_dir"])),
        "error: --model TMP/nochat: its tokenizer has no chat template (an instruct/chat model is "
        "needed)",
    ),
    (
        "evaluate.py", "--output_dir is an existing file",
        lambda c: _eval(c, _bench(c["tmp"])) + ["--output_dir", _afile(c["tmp"])],
        "error: --output_dir TMP/afile: is not a directory"
    ),
    (
        "evaluate.py", "--output_dir under /proc",
        lambda c: _eval(c, _bench(c["tmp"])) + ["--output_dir", "/proc/sgpo-ev"],
        "error: --output_dir /proc/sgpo-ev: cannot write there (No such file or directory)"
    ),
    (
        "extract_strategies.py", "an input row holding a lone UTF-16 surrogate",
        lambda c: _extract(c, input=_data(c["tmp"], SURROGATE)),
        "error: TMP/d.jsonl:1: problem: holds a lone UTF-16 surrogate (not text)"
    ),
    (
        "extract_strategies.py", "--output is a folder", lambda c: _extract(c, output=c["tmp"]),
        "error: --output TMP: is a directory"
    ),
    (
        "extract_strategies.py",
        "--output under /proc",
        lambda c: _extract(c, output="/proc/sgpo/out.jsonl"),
        "error: --output /proc/sgpo/out.jsonl: folder /proc/sgpo: cannot write there (No such "
        "file or directory)",
    ),
    (
        "extract_strategies.py",
        "--backend hf with a model that has no chat template",
        lambda c: (
            _extract(c, "--backend", "hf") + ["--model", _no_chat_template(c["tmp"], c["tiny_dir"])]
        ),
        "error: --model TMP/nochat: its tokenizer has no chat template (an instruct/chat model is "
        "needed)",
    ),
]


def _teacher_lost(ckpt):
    """A --teacher ema run's checkpoint (its flags say so) without its teacher/ folder."""
    config = json.loads((ckpt / "sgpo_config.json").read_text())
    (ckpt / "sgpo_config.json").write_text(json.dumps({**config, "teacher": "ema"}))


def _all_cut(c):
    shutil.copytree(c["run_dir"], c["tmp"] / "run")
    for step in (1, 2):
        _cut(c["tmp"] / "run" / f"checkpoint-{step}" / "model.safetensors", 0)
    return c["tmp"] / "run"


@pytest.fixture(scope="module")
def run_dir(warm_dir, data_file, tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (the resume cases damage a copy)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert (
        sgpo.main(
            [
                "--model", str(warm_dir), "--data", str(data_file), "--output_dir", str(out),
                "--eval_data", "", "--max_steps", "2", "--save_steps", "1", "--batch_size", "4",
                "--max_completion_length", "8"
            ]
        )
        == 0
    )
    return out


@pytest.mark.parametrize("script,case,argv,line", CASES, ids=[f"{s}: {c}" for s, c, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(
    script, case, argv, line, tmp_path, tiny_dir, data_file, run_dir, capsys, monkeypatch
):
    unreadable = _data(tmp_path, name="unreadable.jsonl")
    unreadable.chmod(0)
    if os.geteuid() == 0:  # root reads a mode-000 file: make the read fail as it does for a user
        real_open = open
        monkeypatch.setattr(
            inputs,
            "open",
            lambda p, *a, **k: (
                _raise_eacces() if str(p) == str(unreadable) else real_open(p, *a, **k)
            ),
            raising=False,
        )
    args = [
        str(a)
        for a in argv(
            dict(
                tmp=tmp_path, tiny_dir=tiny_dir, data_file=data_file, run_dir=run_dir,
                unreadable=unreadable
            )
        )
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert SCRIPTS[script].main(args) == 2
    err = capsys.readouterr().err
    assert (
        err
        == line.replace("TMP", str(tmp_path)).replace("No such file or directory", PROC_ERROR)
        + "\n"
    )
    # nothing written, nothing lost
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _raise_eacces():
    raise PermissionError(13, "Permission denied")


def test_readme_lists_every_case():
    readme = (ROOT / "docs" / "reliability.md").read_text()
    for script, case, _, line in CASES:
        assert f"| {script} | {case} | `{line}` |" in readme, (script, case)


# ---- inputs that are handled, not refused
def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(tiny_rows(1)[0]).encode() + b"\n")
    assert inputs.load_problems(str(path))[0]["problem"] == "pick a0"


def test_crash_before_the_first_record_does_not_block_a_rerun(warm_dir, data_file, tmp_path):
    """A run that died after creating an empty metrics.jsonl (before this fix, e.g. on a surrogate
    or an over-long prompt) must not make the next command refuse: an empty metrics file holds no
    run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    args = [
        "--model", str(warm_dir), "--data", str(data_file), "--output_dir", str(out), "--eval_data",
        "", "--max_steps", "1", "--batch_size", "4", "--max_completion_length", "8"
    ]
    assert sgpo.main(args) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1]


def test_resume_passes_over_a_damaged_latest_checkpoint(run_dir, data_file, tmp_path, capsys):
    """--resume (latest) with a cut newest checkpoint: a warning naming the file, then the run goes
    on from the newest whole one and reproduces the uninterrupted run (same metrics, rewritten
    checkpoint-2)."""
    shutil.copytree(run_dir, tmp_path / "run")
    _cut(tmp_path / "run" / "checkpoint-2" / "trainer_state.pt", 2000)
    # a checkpoint a killed run was writing: removed
    (tmp_path / "run" / "checkpoint-3.tmp").mkdir()
    capsys.readouterr()
    cfg = json.loads((run_dir / "checkpoint-2" / "sgpo_config.json").read_text())
    args = [
        "--model", cfg["model"], "--data", str(data_file), "--output_dir", str(tmp_path / "run"),
        "--eval_data", "", "--max_steps", "2", "--save_steps", "1", "--batch_size", "4",
        "--max_completion_length", "8", "--resume"
    ]
    assert sgpo.main(args) == 0
    run = tmp_path / "run"
    assert capsys.readouterr().err.splitlines()[0] == (
        f"warning: --resume: passed over {run}/checkpoint-2/trainer_state.pt: cannot be loaded "
        f"(RuntimeError); "
        f"resuming from {run}/checkpoint-1"
    )
    assert (
        runtime.checkpoint_damage(str(run / "checkpoint-2")) is None
        and not (run / "checkpoint-3.tmp").exists()
    )
    drop = ("time/", "perf/")
    strip = [
        {k: v for k, v in m.items() if not k.startswith(drop)}
        for m in read_metrics(run / "metrics.jsonl")
    ]
    assert strip == [
        {k: v for k, v in m.items() if not k.startswith(drop)}
        for m in read_metrics(run_dir / "metrics.jsonl")
    ]


def test_checkpoint_damage_detects_cut_weights_and_passes_whole_ones(run_dir, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(run_dir / "checkpoint-1", ckpt)
    assert runtime.checkpoint_damage(str(ckpt)) is None
    size = (ckpt / "model.safetensors").stat().st_size
    _cut(ckpt / "model.safetensors", size - 1)  # one byte short: the header's offsets say so
    assert (
        runtime.checkpoint_damage(str(ckpt))
        == f"model.safetensors: damaged or cut short ({size - 1} bytes)"
    )
    shutil.copy(run_dir / "checkpoint-1" / "model.safetensors", ckpt)
    (ckpt / "sgpo_config.json").write_text('{"fsdp": ')
    assert runtime.checkpoint_damage(str(ckpt)) == "sgpo_config.json: not valid JSON"


def test_checkpoint_is_synced_before_and_after_the_rename(
    warm_dir, data_file, tmp_path, monkeypatch
):
    """A power cut after the rename must not leave cut files: every file and the folder are fsynced
    before it, the parent folder (the rename itself) after it."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b)
    )
    out = tmp_path / "out"
    assert (
        sgpo.main(
            [
                "--model", str(warm_dir), "--data", str(data_file), "--output_dir", str(out),
                "--eval_data", "", "--max_steps", "1", "--batch_size", "4",
                "--max_completion_length", "8"
            ]
        )
        == 0
    )
    tmp = str(out / "checkpoint-1.tmp")
    rename = events.index(("replace", tmp))
    before = {p for kind, p in events[:rename] if kind == "fsync"}
    assert {f"{tmp}/{name}" for name in os.listdir(out / "checkpoint-1")} | {tmp} <= before
    assert ("fsync", str(out)) in events[rename:]


def test_ctrl_c_prints_one_line_and_leaves_no_partial_checkpoint(warm_dir, data_file, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable, str(ROOT / "sgpo.py"), "--model", str(warm_dir), "--data",
            str(data_file), "--output_dir", str(out), "--eval_data", "", "--max_steps", "100000",
            "--save_steps", "1", "--batch_size", "4", "--max_completion_length", "8"
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not runtime.latest_checkpoint(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # it is now stepping and writing a checkpoint every step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert (
        err.rstrip().splitlines()[-1]
        == "interrupted: the checkpoints in --output_dir are whole; continue with --resume"
    )
    assert "Traceback" not in err
    assert not list(out.glob("*.tmp"))
    assert runtime.checkpoint_damage(runtime.latest_checkpoint(str(out))) is None


def test_interrupt_while_writing_a_checkpoint_removes_it(
    warm_dir, data_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sgpo.torch, "save", interrupted)
    args = [
        "--model", str(warm_dir), "--data", str(data_file), "--output_dir", str(out), "--eval_data",
        "", "--max_steps", "1", "--batch_size", "4", "--max_completion_length", "8"
    ]
    with pytest.raises(KeyboardInterrupt):
        sgpo.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # no checkpoint-1.tmp


def test_math_verify_timeout_log_is_cut(caplog):
    """math-verify logs a timed-out input whole; the filter sgpo installs cuts every record to 300
    characters."""
    import logging

    with caplog.at_level(logging.WARNING):
        logging.getLogger("math_verify.parser").warning(
            "Timeout during parsing: %s", "1+" * 500_000
        )
        logging.getLogger("math_verify.grader").warning(
            "Timeout during comparison %s", "x" * 10_000
        )
    assert len(caplog.records) == 2 and all(len(r.getMessage()) <= 300 for r in caplog.records)
    assert caplog.records[0].getMessage().startswith("Timeout during parsing: 1+1+")


def test_unparsable_gold_answers_are_counted_and_named(warm_dir, tmp_path, capsys):
    bench = tmp_path / "b.jsonl"
    write_jsonl(
        bench,
        [
            {"problem": "pick a1", "answer": "see figure."}, {"problem": "pick b2", "answer": "3"},
            {"problem": "pick a3", "answer": "\\"}
        ],
    )
    assert (
        evaluate.main(
            [
                "--model", str(warm_dir), "--bench", f"b={bench}:1", "--output_dir",
                str(tmp_path / "out"), "--max_new_tokens", "4"
            ]
        )
        == 0
    )
    assert (
        f"warning: {bench}: 2 of 3 gold answers math-verify cannot parse into a value (lines 1, "
        f"3): only a "
        "response with the same text can match them"
    ) in capsys.readouterr().err.splitlines()


def test_read_only_output_dir(tmp_path, data_file, tiny_dir, monkeypatch, capsys):
    """A read-only filesystem (EROFS, which a container cannot mount for the test: the probe's error
    is simulated)."""
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(inputs.tempfile, "mkstemp", read_only)
    for script, args in (
        ("sgpo.py", ["--model", str(tiny_dir), "--data", str(data_file)]),
        ("evaluate.py", ["--bench", f"b={_bench(tmp_path)}:1"])
    ):
        assert SCRIPTS[script].main(args + ["--output_dir", str(tmp_path / "ro")]) == 2
        assert (
            capsys.readouterr().err
            == f"error: --output_dir {tmp_path / 'ro'}: cannot write there (Read-only file "
               f"system)\n"
        )


def test_a_pretrained_model_at_the_toys_learning_rate_is_warned(tiny_dir, data_file, tmp_path,
                                                                capsys):
    """One line as the run starts (bad input stays one line: the error alone); none at the toy's
    own model or at another learning rate."""
    toy = sgpo.Config()
    assert inputs.learning_rate_warning(toy, toy) == ""
    other = sgpo.Config(model=str(tiny_dir))
    assert inputs.learning_rate_warning(sgpo.Config(model="m", learning_rate=1e-6), toy) == ""
    warning = inputs.learning_rate_warning(other, toy)
    assert warning == ("warning: --learning_rate 0.0001 is the CPU testbed's; a pretrained model "
                       "usually needs about 1e-6 (paper.args) and can lose its fluency at this "
                       "rate")
    missing = tmp_path / "missing.jsonl"
    assert sgpo.main(["--model", str(tiny_dir), "--data", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {missing}: file not found"]
    args = ["--model", str(tiny_dir), "--data", str(data_file), "--eval_data", "",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "0"]
    assert sgpo.main(args) == 0
    assert warning in capsys.readouterr().err.splitlines()
    assert sgpo.main(args + ["--learning_rate", "1e-6", "--overwrite_output_dir"]) == 0
    assert warning not in capsys.readouterr().err


def _interrupt(args, written, timeout=120):
    """Runs a script (args after python), sends Ctrl-C once written() is true; checks that it
    exits 130 without a traceback and returns the last line of its stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not written() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_ctrl_c_in_evaluate_and_extract_is_one_line_and_a_rerun_continues(
        warm_dir, eval_file, tmp_path):
    """evaluate.py and extract_strategies.py stopped by Ctrl-C mid-run: exit 130, one line that
    counts what is on disk (every line of it whole), no traceback; the rerun (evaluate.py:
    --resume) finishes the rest without repeating any of it."""
    from tests.test_extract import GOOD, ChatServer, choices, serving

    out = tmp_path / "eval"
    args = ["evaluate.py", "--model", warm_dir, "--bench", f"t={eval_file}:12", "--limit", 2,
            "--batch_size", 1, "--max_new_tokens", 8, "--output_dir", out]
    samples = out / "samples-rank0.jsonl"
    last = _interrupt(args, lambda: len(_lines(samples)) >= 3)
    kept = [json.loads(line) for line in _lines(samples)]
    assert last == (
        f"interrupted: {len(kept)} samples kept in {out}; the same command with --resume "
        "generates the rest")
    assert 3 <= len(kept) < 24
    assert evaluate.main([str(a) for a in args[1:]] + ["--resume"]) == 0
    again = [json.loads(line) for line in _lines(samples)]
    assert again[:len(kept)] == kept and len({(s["id"], s["sample"]) for s in again}) == 24

    class Slow(ChatServer):
        def answer(self, body, prompt):
            time.sleep(0.15)
            return 200, choices([GOOD] * body["n"]), {}

    rows = [{"id": f"q{i}", "problem": f"q{i}", "answer": "1", "solution": "1"} for i in range(10)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = tmp_path / "strategies.jsonl"
    with serving(Slow) as url:
        args = ["extract_strategies.py", "--input", tmp_path / "in.jsonl", "--output", result,
                "--model", "m", "--base_url", url, "--batch_size", 1, "--num_candidates", 1]
        last = _interrupt(args, lambda: len(_lines(result)) >= 2)
        kept = [json.loads(line) for line in _lines(result)]
        assert last == (
            f"interrupted: {len(kept)} rows kept in {result}; the same command continues with "
            "the rest (the batch in flight is redone)")
        assert 2 <= len(kept) < 10
        assert ex.main([str(a) for a in args[1:]]) == 0
    again = [json.loads(line) for line in _lines(result)]
    assert again[:len(kept)] == kept and [r["id"] for r in again] == [r["id"] for r in rows]
