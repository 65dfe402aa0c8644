"""Outputs are sqltune's own (issue 26, part 2): no write through a symbolic link, a report folder replaced whole,
--overwrite only over a file a meta names, one writer per output with a lock that goes at exit, no stale merge
folders, and hostile YAML or values refused in one bounded line before anything uses them."""

from __future__ import annotations

import errno
import json
import os

import pytest
from conftest import predict_killed_at_batch

from sqltune.cli import main
from sqltune.config import EvalConfig, MergeConfig, PredictConfig, TrainConfig, load
from sqltune.errors import SqltuneError
from sqltune.io import append_once


def _predict_cfg(tiny_model, prepared_demo, out, **kw):
    return PredictConfig(**{**dict(model_name_or_path=str(tiny_model), dataset="demo_dev",
                                   dataset_dir=str(prepared_demo), out=str(out), template="chatml", max_new_tokens=5,
                                   batch_size=2, max_samples=4), **kw})


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ no write through a link
def test_append_refuses_a_symbolic_link(tmp_path):
    """Pins: append_once opened with O_APPEND, which follows a link, so a line log planted as a link appended to
    whatever it pointed at."""
    victim = tmp_path / "gold.sql"
    victim.write_text("SELECT 1\tdb\n")
    (tmp_path / "log.jsonl").symlink_to(victim)
    with pytest.raises(SqltuneError, match="symbolic link"):
        append_once(tmp_path / "log.jsonl", '{"x": 1}\n')
    assert victim.read_text() == "SELECT 1\tdb\n"


def test_a_trace_link_is_a_warning_and_never_followed(tmp_path, capsys):
    """Pins: a `trace.jsonl` link in an output folder made a stage command append its span to the file it pointed
    at (the attacker's: the gold file)."""
    from sqltune.trace import append_span

    gold = tmp_path / "dev_gold.sql"
    gold.write_text("SELECT 1\tdb\n")
    (tmp_path / "trace.jsonl").symlink_to(gold)
    append_span(tmp_path / "trace.jsonl", {"stage": "evaluate"})
    assert gold.read_text() == "SELECT 1\tdb\n"
    assert "symbolic link" in _one_line(capsys)


def test_predict_resume_never_truncates_through_a_link(tiny_model, prepared_demo, tmp_path):
    """Pins: a `<out>.partial.raw.jsonl` that is a link to a database made predict's resume cut the database to
    0 bytes (the torn-line cut followed the link). Now one line, and the database is untouched."""
    from sqltune.infer.predict import predict

    out = tmp_path / "p.sql"
    with predict_killed_at_batch(2), pytest.raises(KeyboardInterrupt):
        predict(_predict_cfg(tiny_model, prepared_demo, out))
    database = tmp_path / "concert.sqlite"
    database.write_bytes(b"SQLite format 3\x00" + bytes(200))
    raw = tmp_path / "p.sql.partial.raw.jsonl"
    raw.unlink()
    raw.symlink_to(database)
    with pytest.raises(SqltuneError, match="symbolic link"):
        predict(_predict_cfg(tiny_model, prepared_demo, out))
    assert database.read_bytes() == b"SQLite format 3\x00" + bytes(200)
    assert not (tmp_path / "p.sql.lock").exists()


def test_the_training_log_is_never_appended_through_a_link(tmp_path):
    """Pins: JsonlLog.on_log opened trainer_log.jsonl with open(..., "a"), which follows a link, so each logged step
    was appended to the file a link planted there pointed at. Now one line, and the target is untouched."""
    from types import SimpleNamespace

    from sqltune.train.sft import _callbacks

    work = tmp_path / "adapter"
    work.mkdir()
    gold = tmp_path / "dev_gold.sql"
    gold.write_text("SELECT 1\tdb\n")
    (work / "trainer_log.jsonl").symlink_to(gold)
    log = next(c for c in _callbacks(TrainConfig(), work, 0, None) if type(c).__name__ == "JsonlLog")
    state = SimpleNamespace(is_world_process_zero=True, global_step=1, epoch=0.1, num_input_tokens_seen=10)
    with pytest.raises(SqltuneError, match="symbolic link"):
        log.on_log(None, state, None, logs={"learning_rate": 0.001})
    assert gold.read_text() == "SELECT 1\tdb\n"


def test_a_resumed_training_never_writes_its_log_through_a_link(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: a trainer_log.jsonl link (here dangling) in the folder a training resumes made the first logged step
    create the file it pointed at, outside the output folder. Now one line, before a step is trained."""
    from conftest import Killed, training_killed_after_save

    from sqltune.train.sft import train

    out = tmp_path / "adapter"
    args = dict(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
                template="chatml", output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=2)
    with training_killed_after_save(1), pytest.raises(Killed):
        train(TrainConfig(**args))
    (out / "trainer_log.jsonl").unlink()
    elsewhere = tmp_path / "elsewhere.jsonl"
    (out / "trainer_log.jsonl").symlink_to(elsewhere)
    argv = ["train", *[f"--{k}={v}" for k, v in args.items()], "--resume"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err  # `train: resuming from ...`, then the error
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "symbolic link" in errors[0] and "Traceback" not in err, err
    assert not elsewhere.exists() and not (out / "checkpoint-2").exists()


def test_overwrite_trusts_only_a_meta_that_names_the_output(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: a stray `{}` meta beside a user's file let `predict --overwrite` replace the file (any meta counted
    as "predict made this"). Now a meta must name the .sql (its digest); a real output is still replaced."""
    victim = tmp_path / "notes.sql"
    victim.write_text("my own queries\n")
    (tmp_path / "notes.sql.meta.json").write_text("{}")
    args = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--template", "chatml", "--max_new_tokens", "4", "--max_samples", "2"]
    assert main(args + ["--out", str(victim), "--overwrite"]) == 2
    assert "is not a prediction file of sqltune" in _one_line(capsys)
    assert victim.read_text() == "my own queries\n"
    out = tmp_path / "real.sql"
    assert main(args + ["--out", str(out)]) == 0
    assert main(args + ["--out", str(out), "--max_new_tokens", "3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "real.sql.meta.json").read_text())["max_new_tokens"] == 3
    assert not (tmp_path / "real.sql.lock").exists()  # the lock file goes with a clean exit


# ------------------------------------------------------------------ the report folder, one unit
def _report(folder, count):
    from sqltune.eval.report import write_report

    cfg = EvalConfig(pred="p.sql", gold="g.sql", etype="exec")
    write_report(folder, cfg, {"count": count, "etype": "exec"}, [], "table")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_report_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """Pins: a full disk during `evaluate --report` left a new metrics.json beside the old per_example.jsonl; the
    report is now written beside the folder and swapped in whole, or not at all."""
    import sqltune.eval.report as report

    folder = tmp_path / "eval"
    _report(folder, 1)
    before = _files(folder)

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_jsonl", disk_full)
    with pytest.raises(OSError):
        _report(folder, 2)
    assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporary folder left
    monkeypatch.undo()
    _report(folder, 2)
    assert json.loads((folder / "metrics.json").read_text())["count"] == 2


def test_a_report_never_writes_through_a_link(tmp_path):
    """Pins: a `trace.jsonl` (or any report file) that is a link in the report folder was written through; the new
    folder holds plain files, and a report path that is itself a link is refused."""
    gold = tmp_path / "gold.sql"
    gold.write_text("SELECT 1\tdb\n")
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "trace.jsonl").symlink_to(gold)
    (folder / "metrics.json").symlink_to(gold)
    _report(folder, 1)
    assert gold.read_text() == "SELECT 1\tdb\n"
    assert not any(p.is_symlink() for p in folder.iterdir())
    (tmp_path / "linked").symlink_to(folder)
    with pytest.raises(SqltuneError, match="symbolic link"):
        _report(tmp_path / "linked", 1)


def test_a_folder_of_other_files_is_not_a_report_folder(tmp_path):
    """Pins that the whole-folder swap never takes a user's other files with it: such a folder is refused."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SqltuneError, match="not a report"):
        _report(folder, 1)
    assert _files(folder) == {"notes.txt": b"mine"}


def test_a_report_clears_the_temporary_folders_a_killed_write_left(tmp_path):
    """Pins: the `.<report>.report-*` folder of an evaluate killed while writing its report (and the `.old-*`
    folder of a swap cut short) stayed beside the report forever. Writing the same report now removes them (under
    `<report>.lock`); other reports' and other names are kept, and the lock file goes."""
    folder = tmp_path / "eval"
    stale = [".eval.report-k3j9x_2a", ".eval.old-abcd1234"]
    kept = [".eval.report-notes", ".evalx.report-k3j9x_2a", ".eval.old-x.report-k3j9x_2a", ".eval.notes"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text("{}")
    (tmp_path / ".eval.old-abcd1234" / "eval").mkdir()
    _report(folder, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["eval"])
    assert json.loads((folder / "metrics.json").read_text())["count"] == 1


def test_a_report_another_evaluate_is_writing_is_waited_for_then_one_line(tmp_path, monkeypatch):
    """Pins that clearing stale folders never takes those of an evaluate writing the same report now: the writer
    holds `<report>.lock`; a second waits (REPORT_WAIT_S), then stops with one line naming the holder, and clears
    nothing."""
    import threading

    import sqltune.eval.report as report
    from sqltune.lock import held

    monkeypatch.setattr(report, "REPORT_WAIT_S", 0.3, raising=False)
    live = tmp_path / ".eval.report-live1234"
    live.mkdir()
    with held(tmp_path / "eval.lock", "first"):
        with pytest.raises(SqltuneError, match=f"another evaluate is writing the report .*pid {os.getpid()}"):
            _report(tmp_path / "eval", 1)
    assert live.is_dir() and not (tmp_path / "eval").exists()
    monkeypatch.setattr(report, "REPORT_WAIT_S", 30)
    first = held(tmp_path / "eval.lock", "first")
    first.__enter__()
    threading.Timer(0.3, first.__exit__, (None, None, None)).start()
    _report(tmp_path / "eval", 2)  # waits for the first writer, then writes
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["count"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


# ------------------------------------------------------------------ one writer per output
def test_the_lock_names_its_holder_and_goes_at_exit(tmp_path):
    """Pins: a second writer got no word of who held the lock, and the lock file stayed after the run."""
    from sqltune.lock import acquire, held

    path = tmp_path / "out.lock"
    with held(path, "another job is writing out"):
        with pytest.raises(SqltuneError, match=f"another job is writing out \\(pid {os.getpid()} on "):
            acquire(path, "another job is writing out")
    assert not path.exists()


def test_a_lock_file_removed_under_the_acquirer_is_locked_afresh(tmp_path, monkeypatch):
    """Pins the unlink race: the holder removes the lock file between the acquirer's open and its lock; the
    acquirer must then lock the file at the path, not the removed one (else a third process locks a new file)."""
    import fcntl

    import sqltune.lock as lock

    path = tmp_path / "out.lock"
    real = fcntl.flock
    calls = []

    def holder_leaves(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(path)  # the holder finished just now
        return real(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", holder_leaves)
    fd = lock.acquire(path, "busy")
    assert len(calls) == 2 and os.fstat(fd).st_ino == os.stat(path).st_ino
    lock.release(fd, path)
    assert not path.exists()


def test_second_run_of_a_run_folder_gets_one_line(tmp_path, demo_dir, capsys):
    """Pins: two `sqltune run` of one recipe worked in the same run folder (and trained into the same adapter/) at
    the same time; the second now stops with one line naming the first."""
    from sqltune.lock import held

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nstages: [prepare]\nprepare: {{source: spider, data_dir: {demo_dir}, name: demo}}\n")
    run = tmp_path / "runs" / "r-1"
    run.mkdir(parents=True)
    with held(run / ".lock", "first"):
        assert main(["run", str(recipe), "--run_dir", str(run)]) == 2
        assert f"pid {os.getpid()}" in _one_line(capsys)
    assert not (run / "data").exists()
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert (run / "data").is_dir() and not (run / ".lock").exists()


def test_second_training_of_an_output_dir_gets_one_line(tiny_model, prepared_demo, tmp_path):
    """Pins: two trainings of one output_dir wrote into it at the same time; the second now stops with one line
    naming the holder, before it writes anything."""
    from sqltune.lock import held
    from sqltune.train.sft import train

    out = tmp_path / "adapter"
    cfg = TrainConfig(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
                      template="chatml", output_dir=str(out), max_steps=1, per_device_train_batch_size=2)
    with held(tmp_path / "adapter.lock", "first"):
        with pytest.raises(SqltuneError, match=f"another training is writing .*pid {os.getpid()}"):
            train(cfg)
    assert not out.exists()


def test_merge_clears_its_stale_temporary_folders(tiny_model, prepared_demo, tmp_path):
    """Pins: a killed merge left its `.<out>.*` temporary folder (a whole model) beside the output forever."""
    from sqltune.infer.merge import merge
    from sqltune.train.sft import train

    train(TrainConfig(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
                      template="chatml", output_dir=str(tmp_path / "adapter"), max_steps=1,
                      per_device_train_batch_size=2))
    for stale in (".merged.k3j9x_2a", ".merged.merging-abc"):  # an earlier version's name, and today's
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(bytes(10))
    (tmp_path / ".merged.notes").mkdir()  # not a merge's: kept
    merge(MergeConfig(model_name_or_path=str(tiny_model), adapter=str(tmp_path / "adapter"),
                      out=str(tmp_path / "merged")))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == [".merged.notes"]
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged.lock").exists()


# ------------------------------------------------------------------ hostile YAML and values
BOMB = "[&a0 [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)) + "]"
# 9**6 values in one value: enough to refuse, small enough for the old code to finish


@pytest.mark.parametrize("where", [f"name: {BOMB}\n", f"predict: {{max_new_tokens: {BOMB}}}\n", "name: &r [*r]\n"])
def test_yaml_alias_bombs_are_refused_in_one_short_line(tmp_path, capsys, where):
    """Pins: anchors and aliases expanding to millions of values (`name:` or a stage option; 9 levels ran 60 s at
    1.5 GB) were built and put into the error message whole; a value holding itself was read too. Now the file
    is refused, in one short line, before any value is used."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [predict]\n" + where)
    assert main(["run", str(recipe), "--runs_dir", str(tmp_path / "runs"), "--print_config"]) == 2
    err = _one_line(capsys)
    assert len(err) < 300 and ("aliases expand to more than" in err or "refers to the value" in err), err[:300]


@pytest.mark.parametrize("text", ["max_new_tokens: 2001-13-45\n", "max_new_tokens: " + "9" * 5000 + "\n",
                                  "max_new_tokens: " + "[" * 3000 + "]" * 3000 + "\n"])
def test_values_yaml_cannot_build_are_one_line(tmp_path, capsys, text):
    """Pins: a date YAML cannot build (13th month), an integer of 5000 digits or nesting 3000 deep was an internal
    error (ValueError, RecursionError) instead of one line."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main(["predict", str(path)]) == 2
    assert len(_one_line(capsys)) < 300


@pytest.mark.parametrize("values", [{"backend": "x" * 100_000}, {"max_new_tokens": list(range(100_000))},
                                    {"z" * 100_000: 1}])
def test_bad_values_are_shown_cut_short(tmp_path, values):
    """Pins: an error message quoted the bad value whole (a 100 000-character name, a list of 100 000 items)."""
    with pytest.raises(SqltuneError) as caught:
        load(PredictConfig, overrides=values)
    assert len(str(caught.value)) < 300 and "\n" not in str(caught.value)


@pytest.mark.parametrize("mb", ["1e12", "0", "2000"])
def test_max_result_mb_out_of_range_is_one_line(mb):
    """Pins: `--max_result_mb 1e12` passed the checks and ended evaluate with an internal error (SQLite's length
    limit is a C int)."""
    with pytest.raises(SqltuneError, match="--max_result_mb must be in"):
        load(EvalConfig, overrides={"max_result_mb": mb})
