"""Files and traces (issue #13 section 4): outputs respect the umask, stage commands trace beside their output and
never fail for a trace, `trace list` survives bad lines and lists only runs, SIGTERM ends a run like Ctrl-C, and a
closed pipe ends `trace show` quietly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sqltune.cli import main
from sqltune.io import append_once, atomic_write, temp_dir, write_json

ROOT = Path(__file__).resolve().parents[1]


def span(run_id: str, stage: str, **more) -> str:
    return json.dumps({"run_id": run_id, "stage": stage, "start": "2026-01-01T00:00:00", "end": "",
                       "duration_s": 1.0, "status": "ok", "figures": {}, "error": None, **more}) + "\n"


@pytest.fixture
def umask():
    """Set the process umask for the test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_respect_the_umask(tmp_path, umask, mask):
    """Pins: every output was 0600 and every merged folder 0700 whatever the umask (mkstemp/mkdtemp modes)."""
    umask(mask)
    write_json(tmp_path / "a.json", {})
    with atomic_write(tmp_path / "b.txt") as handle:
        handle.write("x")
    append_once(tmp_path / "c.jsonl", "{}\n")
    for name in ("a.json", "b.txt", "c.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert temp_dir(tmp_path, ".t.").stat().st_mode & 0o777 == 0o777 & ~mask


def test_prepared_registry_is_readable_by_the_group(tmp_path, demo_dir, umask):
    """A real stage's outputs under umask 002 (a shared project folder): group-readable and writable."""
    umask(0o002)
    assert main(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "out"), "--name", "demo"]) == 0
    for path in (tmp_path / "out").iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o664, path.name


def test_stage_command_traces_beside_its_output(tmp_path, demo_dir, monkeypatch, capsys):
    """Pins: a stage run on its own wrote `./runs/commands/trace.jsonl` in the current folder (from a read-only
    folder the finished stage then exited 1); its span now lands in its output folder, marked as a command."""
    monkeypatch.delenv("SQLTUNE_RUNS_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "prepared"
    assert main(["prepare", "--data_dir", str(demo_dir), "--out", str(out), "--name", "demo"]) == 0
    assert list(cwd.iterdir()) == []
    (line,) = (out / "trace.jsonl").read_text().splitlines()
    recorded = json.loads(line)
    assert recorded["stage"] == "prepare" and recorded["status"] == "ok" and recorded["kind"] == "command"
    assert main(["trace", "show", str(out)]) == 0 and "prepare" in capsys.readouterr().out


def test_a_trace_that_cannot_be_written_never_fails_the_stage(tmp_path, demo_dir, monkeypatch, capsys):
    """Pins: the finished stage exited 1 when its trace could not be written; now one warning, exit 0."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SQLTUNE_TRACE", str(blocker / "trace.jsonl"))
    assert main(["prepare", "--data_dir", str(demo_dir), "--out", str(tmp_path / "out"), "--name", "demo"]) == 0
    err = capsys.readouterr().err
    assert "warning: could not write the trace span" in err and "Traceback" not in err
    assert (tmp_path / "out" / "demo_dev.jsonl").is_file()


def test_trace_list_shows_only_runs(tmp_path, capsys):
    """Pins: `trace list` showed a pseudo-run "commands" summing the durations of unrelated stage commands."""
    runs = tmp_path / "runs"
    (runs / "commands").mkdir(parents=True)
    (runs / "commands" / "trace.jsonl").write_text(span("commands", "train") + span("commands", "predict"))
    (runs / "adapter").mkdir()
    (runs / "adapter" / "trace.jsonl").write_text(span("adapter", "train", kind="command"))
    (runs / "demo-20260101-000000").mkdir()
    (runs / "demo-20260101-000000" / "trace.jsonl").write_text(span("demo-20260101-000000", "prepare"))
    assert main(["trace", "list", "--runs_dir", str(runs), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["demo-20260101-000000"] and listed[0]["status"] == "running or stopped"


def test_malformed_trace_lines_never_break_the_listing(tmp_path, capsys):
    """Pins: one malformed trace.jsonl (valid JSON but not a span) broke `trace list` for every run."""
    runs = tmp_path / "runs"
    bad, good = runs / "bad-20260101-000000", runs / "good-20260101-000000"
    bad.mkdir(parents=True)
    good.mkdir()
    bad.joinpath("trace.jsonl").write_bytes(
        b'[1, 2]\n"text"\n42\nnull\n{"stage": "train"}\n{"stage": 5}\n'
        b'{"stage": "predict", "figures": [1], "duration_s": "slow", "start": null, "status": 3}\n'
        b'{"stage": "evaluate", "duration_s": NaN, "figures": {"ex": "high"}}\n\xff\xfe not json\n{"sta')
    good.joinpath("trace.jsonl").write_text(span(good.name, "prepare") + span(good.name, "run", figures={"ex": 0.5}))
    assert main(["trace", "list", "--runs_dir", str(runs)]) == 0
    listing = capsys.readouterr().out
    assert bad.name in listing and good.name in listing and "0.5" in listing
    assert main(["trace", "show", bad.name, "--runs_dir", str(runs)]) == 0
    shown = capsys.readouterr().out
    assert "train" in shown and "predict" in shown and "evaluate" in shown
    assert main(["trace", "show", bad.name, "--runs_dir", str(runs), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["spans"]) == 3


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, demo_dir):
    """Pins: SIGTERM during `sqltune run` left the run "running or stopped" with 0.1 s and no span for the stage
    it stopped; now the stage and the run are marked interrupted and the exit code is 143."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nstages: [prepare, train]\nprepare: {{source: spider, data_dir: {demo_dir}}}\n")
    started, run = tmp_path / "started", tmp_path / "run"
    code = f"""
import dataclasses, time
from pathlib import Path
from sqltune.stages import STAGES
from sqltune.cli import main

def slow_train(cfg):
    Path({str(started)!r}).write_text("")
    time.sleep(120)

STAGES["train"] = dataclasses.replace(STAGES["train"], run=slow_train)
raise SystemExit(main(["run", {str(recipe)!r}, "--run_dir", {str(run)!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    spans = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    status = {s["stage"]: s["status"] for s in spans}
    assert status == {"prepare": "ok", "train": "interrupted", "run": "interrupted"}
    assert not (run / ".done" / "train.json").exists()


def test_closed_pipe_ends_trace_show_quietly(tmp_path):
    """Pins: `sqltune trace show RUN --json | head` printed a BrokenPipeError traceback."""
    run = tmp_path / "runs" / "big-20260101-000000"
    run.mkdir(parents=True)
    run.joinpath("trace.jsonl").write_text("".join(span(run.name, f"stage{i}") for i in range(3000)))
    proc = subprocess.Popen([sys.executable, "-m", "sqltune", "trace", "show", run.name, "--runs_dir",
                             str(run.parent), "--json"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode == 141, err


def test_a_refused_stage_writes_no_trace_into_an_input(tiny_model, prepared_demo, capsys):
    """Pins: `train --output_dir <the model folder>` was refused, yet its failed span was still appended to
    `<model folder>/trace.jsonl`, adding a file to an input. A failed standalone stage writes no span."""
    before = sorted(p.name for p in tiny_model.iterdir())
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset", "demo_train", "--dataset_dir",
                 str(prepared_demo), "--output_dir", str(tiny_model), "--max_steps", "1"]) == 2
    assert "error" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_model.iterdir()) == before


def test_memory_figures_say_whose_peak_they_are(monkeypatch):
    """A stage that raised the process's high-water mark has its own peak; one that did not, an upper bound; CUDA
    memory is read only when torch is already loaded with CUDA in use (a stand-in here: no GPU on this machine)."""
    import sqltune.usage as usage
    from sqltune.usage import peak_figures

    assert peak_figures({"rss": 1024 * 100}, {"rss": 1024 * 150}) == {"peak_rss_mb": 150.0,
                                                                       "peak_rss_mb_in_stage": True}
    assert peak_figures({"rss": 1024 * 150}, {"rss": 1024 * 150})["peak_rss_mb_in_stage"] is False
    assert peak_figures({}, {"rss": None, "gpu": None}) == {}
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert usage.marks()["gpu"] is None and usage.marks()["rss"] > 0

    class Cuda:
        peak = 3 * 1024 ** 2

        def is_available(self):
            return True

        def is_initialized(self):
            return True

        def device_count(self):
            return 2

        def max_memory_allocated(self, device):
            return self.peak * (device + 1)

    monkeypatch.setitem(sys.modules, "torch", type("torch", (), {"cuda": Cuda()}))
    before = usage.marks()
    Cuda.peak = 5 * 1024 ** 2
    figures = peak_figures(before, usage.marks())
    assert figures["gpu_peak_mb"] == 10.0 and figures["gpu_peak_mb_in_stage"] is True


def test_spans_carry_peak_memory_and_trace_show_prints_it(tmp_path, capsys):
    """Every span records the peak memory figures (issue 29: the stages with their time and memory); a span of an
    earlier version without them reads and prints as `-`."""
    from sqltune.trace import read_trace
    from sqltune.trace import span as trace_span

    run = tmp_path / "runs" / "r-20260101-000000"
    with trace_span(run / "trace.jsonl", run.name, "work"):
        pass
    append_once(run / "trace.jsonl", span(run.name, "old"))
    work, old = read_trace(run)
    assert work["memory"]["peak_rss_mb"] > 0 and isinstance(work["memory"]["peak_rss_mb_in_stage"], bool)
    assert "memory" not in old
    assert main(["trace", "show", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "peak RSS" in lines[1]
    assert re.fullmatch(r"work\s+ok\s+0\.0\s+(<= )?\d+ MB\s*", lines[2]), lines[2]
    assert re.fullmatch(r"old\s+ok\s+1\.0\s+-\s*", lines[3]), lines[3]
