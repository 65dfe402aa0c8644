"""Progress of long stages (issue 29 item 1): `make demo` printed three `step N/100` lines in 30 minutes, with no time
left. Now sqltune/progress.py shows `n/total [elapsed<remaining]` on stderr: a bar on a terminal, a line now and then
in a log file, nothing with quiet; never in a result file. Time is injected here, never measured."""

from __future__ import annotations

import io
import re
import sys

import pytest

from sqltune.errors import SqltuneError
from sqltune.progress import Progress

METER = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d")  # n/total [elapsed<remaining
PROGRESS_TEXT = ("[00:", "<00:", "\r", "%|", "step/s", "ex/s", "q/s", "s/step", "s/ex", "s/q")


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_log_file_lines_say_count_elapsed_remaining_and_loss():
    clock, log = Clock(), io.StringIO()
    bar = Progress(100, "train", "step", stream=log, clock=clock)
    for _ in range(100):
        clock.now += 18  # 18 s a step: the demo's 100 steps in 30 minutes
        bar.postfix(loss="1.2346", lr="2e-04")
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "train: 4/100 [01:12<28:48, 18.00s/step, loss 1.2346, lr 2e-04]"  # 60 s passed
    assert lines[-1] == "train: 100/100 [30:00<00:00, 18.00s/step, loss 1.2346, lr 2e-04]"
    assert 10 <= len(lines) <= 30  # a line a minute or so, not one per step
    assert all(METER.search(line) for line in lines) and "\r" not in log.getvalue()


@pytest.mark.parametrize("summary", [False, True])
def test_log_file_of_quick_work_is_left_alone_unless_a_summary_is_asked(summary):
    clock, log = Clock(), io.StringIO()
    with Progress(1000, "prepare demo_train", "q", stream=log, clock=clock, summary=summary) as bar:
        for _ in range(1000):
            clock.now += 0.00390625  # exact in binary: 1000 of them are 3.90625 s, under the 5 s between lines
            bar.update()
    assert log.getvalue() == ("prepare demo_train: 1000/1000 [00:03<00:00, 256.00q/s]\n" if summary else "")


def test_log_file_of_work_over_min_s_gets_its_last_line():
    clock, log = Clock(), io.StringIO()
    with Progress(3, "evaluate", "q", stream=log, clock=clock) as bar:
        for _ in range(3):
            clock.now += 2
            bar.update()
    assert log.getvalue() == "evaluate: 3/3 [00:06<00:00,  2.00s/q]\n"


def test_log_file_line_every_tenth_when_steps_are_slow_enough():
    clock, log = Clock(), io.StringIO()
    bar = Progress(50, "predict", "ex", stream=log, clock=clock, every_s=3600)
    for _ in range(50):
        clock.now += 2
        bar.update()
    bar.close()
    counts = [line.split()[1] for line in log.getvalue().splitlines()]
    assert counts == [f"{n}/50" for n in range(5, 51, 5)]


def test_resumed_count_starts_at_initial_and_rate_counts_only_new_work():
    clock, log = Clock(), io.StringIO()
    bar = Progress(10, "train", "step", stream=log, clock=clock, initial=5)
    clock.now += 10
    bar.advance_to(6)
    bar.close()
    assert log.getvalue() == "train: 6/10 [00:10<00:40, 10.00s/step]\n"  # 4 steps left at 10 s each


def test_stopped_early_the_last_count_is_said_once():
    clock, log = Clock(), io.StringIO()
    bar = Progress(100, "train", "step", stream=log, clock=clock)
    clock.now += 30
    bar.advance_to(3)
    bar.close()
    bar.close()
    assert log.getvalue().splitlines() == ["train: 3/100 [00:30<16:10, 10.00s/step]"]


def test_terminal_gets_a_tqdm_bar_with_postfix():
    term = Terminal()
    bar = Progress(10, "train", "step", stream=term)
    bar.postfix(loss="0.5000", lr="1e-03")
    bar.update(3)
    bar.close()
    text = term.getvalue()
    assert "\r" in text and "3/10 [" in text and "<" in text and "loss 0.5000, lr 1e-03" in text


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_quiet_prints_nothing(stream):
    out, clock = stream(), Clock()
    bar = Progress(10, "evaluate", "q", quiet=True, stream=out, clock=clock)
    for _ in range(10):
        clock.now += 100
        bar.update()
    bar.close()
    assert out.getvalue() == ""


def test_nothing_to_do_prints_nothing():
    log = io.StringIO()
    Progress(0, "predict", "ex", stream=log).close()
    assert log.getvalue() == ""


@pytest.mark.parametrize("total, initial", [(-1, 0), (2.5, 0), (3, 4)])
def test_bad_counts_are_one_line(total, initial):
    with pytest.raises(SqltuneError, match="progress: "):
        Progress(total, "x", initial=initial, stream=io.StringIO())


# ------------------------------------------------------------------------------------------------ the stages
def _no_progress_in(folder):
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".sql", ".md", ".txt", ""):
            text = path.read_text(errors="replace")
            assert not any(mark in text for mark in PROGRESS_TEXT), path


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A real file for stderr, as `sqltune ... 2> log` gives; `to_file()` in the test body redirects (pytest puts
    its own capture back between a fixture and the test)."""
    handle = open(tmp_path / "stderr.log", "w+")
    yield lambda: monkeypatch.setattr(sys, "stderr", handle) or handle
    handle.close()


def _train(tiny_model, prepared_demo, out, *extra):
    from sqltune.cli import main

    return main(["train", "--model_name_or_path", str(tiny_model), "--dataset", "demo_train", "--dataset_dir",
                 str(prepared_demo), "--template", "chatml", "--output_dir", str(out), "--max_steps", "3",
                 "--logging_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", *extra])


def test_training_into_a_log_file_writes_progress_lines_with_loss(tiny_model, prepared_demo, tmp_path, stderr_file):
    stderr_file = stderr_file()
    assert _train(tiny_model, prepared_demo, tmp_path / "out") == 0
    stderr_file.seek(0)
    lines = [line for line in stderr_file.read().splitlines() if line.startswith("train: ")]
    assert lines and lines[-1].startswith("train: 3/3 [") and METER.search(lines[-1])
    assert re.search(r", loss \d+\.\d{4}, lr [0-9.e-]+, tokens/s \d+\]$", lines[-1])
    _no_progress_in(tmp_path / "out")


def test_training_on_a_terminal_shows_a_bar_with_loss(tiny_model, prepared_demo, tmp_path, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert _train(tiny_model, prepared_demo, tmp_path / "out") == 0
    assert re.search(r"3/3 \[\d\d:\d\d<00:00, [^\]]*loss \d+\.\d{4}, lr ", term.getvalue())


@pytest.fixture
def library_bars_back():
    """--quiet turns transformers' bars off for the process: on again for the tests after this one."""
    yield
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()


def test_training_quiet_prints_no_progress(tiny_model, prepared_demo, tmp_path, stderr_file, library_bars_back):
    stderr_file = stderr_file()
    assert _train(tiny_model, prepared_demo, tmp_path / "out", "--quiet") == 0
    stderr_file.seek(0)
    assert "train: " not in stderr_file.read()


def test_training_quiet_on_a_terminal_shows_no_bar_at_all(tiny_model, prepared_demo, tmp_path, monkeypatch,
                                                          library_bars_back):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert _train(tiny_model, prepared_demo, tmp_path / "out", "--quiet") == 0
    assert not any(mark in term.getvalue() for mark in PROGRESS_TEXT), term.getvalue()
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()  # transformers' loading and saving bars too


def test_prediction_into_a_log_file_keeps_progress_out_of_its_files(tiny_model, prepared_demo, tmp_path,
                                                                    stderr_file):
    stderr_file = stderr_file()
    from sqltune.config import PredictConfig
    from sqltune.infer.predict import predict

    out = tmp_path / "pred" / "p.sql"
    predict(PredictConfig(model_name_or_path=str(tiny_model), dataset="demo_dev", dataset_dir=str(prepared_demo),
                          out=str(out), template="chatml", max_new_tokens=4, batch_size=4, max_samples=8))
    stderr_file.seek(0)
    assert re.search(r"^predict: 8/8 \[\d\d:\d\d<00:00", stderr_file.read(), re.M)
    _no_progress_in(tmp_path / "pred")


def test_evaluation_into_a_log_file_and_quiet(demo_dir, prepared_demo, tmp_path, stderr_file, monkeypatch):
    stderr_file = stderr_file()
    monkeypatch.setattr("sqltune.progress.MIN_S", 0.0)  # a line even for these few seconds of work
    from sqltune.config import EvalConfig
    from sqltune.eval.evaluate import evaluate

    gold_lines = (prepared_demo / "demo_dev_gold.sql").read_text().splitlines() * 2  # 60: the bar shows from 50 questions
    (tmp_path / "gold.sql").write_text("\n".join(gold_lines) + "\n")
    (tmp_path / "pred.sql").write_text("\n".join(g.split("\t")[0] for g in gold_lines) + "\n")
    base = dict(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"), db_dir=str(demo_dir / "database"),
                tables=str(demo_dir / "tables.json"), workers=1)
    evaluate(EvalConfig(report=str(tmp_path / "report"), **base))
    stderr_file.seek(0)
    assert re.search(r"^evaluate: 60/60 \[\d\d:\d\d<00:00", stderr_file.read(), re.M)
    _no_progress_in(tmp_path / "report")
    stderr_file.seek(0)
    stderr_file.truncate()
    evaluate(EvalConfig(quiet=True, **base))
    stderr_file.seek(0)
    assert "evaluate: " not in stderr_file.read()


def test_evaluation_inside_run_keeps_its_bar_and_drops_its_table(demo_dir, tmp_path, capsys, stderr_file,
                                                                   monkeypatch):
    """Pins: `run` evaluated with quiet=True to keep the table off the screen, which also hid the progress bar.
    Now `table=False` drops only the table; the bar (and its closing line in a log) stays."""
    stderr_file = stderr_file()
    monkeypatch.setattr("sqltune.progress.MIN_S", 0.0)  # a line even for these few seconds of work
    from sqltune.config import EvalConfig
    from sqltune.eval.evaluate import evaluate

    golds = ["SELECT name FROM customer\tshop"] * 60
    (tmp_path / "gold.sql").write_text("".join(g + "\n" for g in golds))
    (tmp_path / "pred.sql").write_text("SELECT name FROM customer\n" * 60)
    evaluate(EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"),
                        db_dir=str(demo_dir / "database"), tables=str(demo_dir / "tables.json"), table=False))
    stderr_file.seek(0)
    assert "EXECUTION ACCURACY" not in capsys.readouterr().out and "evaluate: 60/60" in stderr_file.read()
