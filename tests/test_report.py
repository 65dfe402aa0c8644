"""The run's page (issue 29 items 2 and 3): `sqltune run` writes report.html, `sqltune trace show RUN --html FILE`
writes it for any run, evaluate --report draws its plots. The page is parsed and checked part by part: stages with
time and memory, loss and reward curves, EX/EM per level for every arm side by side, failure kinds, links to the
files (relative to the page, every one reaching its file), self-contained (no script, nothing fetched), every text
escaped, and a plot that fails named instead of failing the page or the run. tests/test_report_browser.py opens it in
a real browser."""

from __future__ import annotations

import json
import os
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import unquote

import pytest
from page_parse import parse, png_size
from report_fixture import HOSTILE, make_run

import sqltune.report.plots as plots
import sqltune.report.render as render
from sqltune.cli import main
from sqltune.report.page import TRAIN_LOG

ROOT = Path(__file__).resolve().parents[1]


def page_of(run: Path, out: Path | None = None):
    out = out or run / "report.html"
    render.write_page(run, out)
    html = out.read_text(encoding="utf-8")
    return html, parse(html)


def rows(table) -> list[list[str]]:
    return [[cell.text().strip() for cell in tr.children if not isinstance(cell, str)] for tr in table.all("tr")]


def check_links(doc, page_dir: Path) -> list[str]:
    """Every link is relative and reaches an existing file or folder from the page's folder; returns the targets."""
    targets = []
    for a in doc.all("a"):
        href = a.attrs["href"]
        assert "://" not in href and not href.startswith(("/", "#")), href
        target = page_dir / unquote(href)
        assert os.path.lexists(target), href
        targets.append(unquote(href))
    return targets


def test_page_has_every_part(tmp_path):
    run = make_run(tmp_path)
    html, doc = page_of(run)
    assert doc.all("title")[0].text() == f"sqltune run {run.name}"
    for section in ("summary", "stages", "training", "accuracy", "failures", "files"):
        assert doc.by_id(section) is not None, section
    # self-contained: no script, no stylesheet or image fetched, style inside
    assert not doc.all("script") and not doc.all("link") and not doc.all("iframe")
    assert "http://" not in html and "https://" not in html and "url(" not in html
    assert len(doc.all("style")) == 1
    images = {fig.attrs["id"]: fig.all("img")[0] for fig in doc.all("figure")}
    assert sorted(images) == ["plot-accuracy", "plot-failures", "plot-reward", "plot-training-loss"]
    for img in images.values():
        width, height = png_size(img.attrs["src"])
        assert width > 300 and height > 200

    stages = rows(doc.by_id("stages").all("table")[0])
    assert stages[0][:7] == ["stage", "status", "started", "time", "peak RSS", "largest child", "GPU peak"]
    by_stage = {r[0].split(" (")[0]: r for r in stages[1:]}
    assert list(by_stage) == ["prepare", "train", "predict_base", "evaluate_base", "predict_finetuned",
                              "evaluate_finetuned"]
    assert by_stage["prepare"][1] == "ok (skipped since)"  # the attempt that made its outputs, 1.5 s
    assert by_stage["train"][0] == "train (2 attempts)" and by_stage["train"][1] == "ok"
    assert by_stage["train"][3] == "2:05" and by_stage["train"][4] == "2048 MB" and by_stage["train"][6] == "900 MB"
    assert by_stage["predict_base"][4] == "<= 2048 MB"  # below an earlier stage's peak: an upper bound
    assert by_stage["evaluate_finetuned"][5] == "80 MB"
    invocations = rows(doc.by_id("stages").all("table")[1])
    assert [r[1] for r in invocations[1:]] == ["failed", "ok"]

    accuracy = rows(doc.by_id("accuracy").all("table")[0])
    assert accuracy[0] == ["level", "questions", "base (greedy)",
                           "finetuned (execution vote over 8 samples + greedy)"]
    assert accuracy[1] == ["EX", "EM", "EX", "EM"]
    assert accuracy[2] == ["easy", "4", "0.500", "0.250", "1.000", "0.750"]
    assert accuracy[-1] == ["all", "10", "0.300", "0.100", "0.600", "0.400"]
    best = [td.text() for td in doc.by_id("accuracy").all("td") if "best" in td.attrs.get("class", "")]
    assert best[:2] == ["1.000", "0.750"] and "0.000" not in best  # ties (all 0) are not marked

    failures = rows(doc.by_id("failures").all("table")[0])
    assert failures[0] == ["kind", "base", "finetuned"]
    assert failures[1] == ["wrong result", "4", "2"]
    assert ["execution error: no such column", "3", "0"] in failures
    assert [f"execution error: {HOSTILE}", "0", "2"] in failures  # the text, as text
    assert not any(r[0] == "gold query failed" for r in failures)  # not the model's failure

    training = doc.by_id("training")
    assert "8 logged steps" in training.text()
    targets = check_links(doc, run)
    assert "adapter/trainer_log.jsonl" in targets and "eval/finetuned/report.md" in targets
    assert "adapter/checkpoint-4" in targets and "adapter/checkpoint-4/optimizer.pt" not in targets
    assert 'predictions/odd "name" <&>.sql' in targets
    assert not any(t.startswith(".done") for t in targets)


def test_every_text_is_escaped(tmp_path):
    """A failure kind, an error or a file name holding markup is shown as text: the page's only elements are its
    own (no script, no img but the plots)."""
    run = make_run(tmp_path)
    html, doc = page_of(run)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert HOSTILE in doc.by_id("failures").text()
    assert len(doc.all("img")) == 4 and not doc.all("script")
    assert 'odd "name" <&>.sql' in doc.by_id("files").text()


def test_trace_show_html_writes_the_page_anywhere(tmp_path, capsys):
    """`trace show RUN --html FILE` for a run by name: the page's links lead from FILE's folder to the run's files."""
    run = make_run(tmp_path / "runs")
    out = tmp_path / "pages" / "deep" / "page.html"
    assert main(["trace", "show", run.name[:8], "--runs_dir", str(tmp_path / "runs"), "--html", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    doc = parse(out.read_text(encoding="utf-8"))
    targets = check_links(doc, out.parent)
    assert "../../runs/demo-20261204-100000/eval/base/report.md" in targets
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("argv, message", [
    (["show", "RUN", "--html"], "--html takes the page's file name"),
    (["show", "RUN", "--html", "x.html", "--json"], "--html takes the page's file name"),
    (["list", "--html", "x.html"], "--html goes with `sqltune trace show RUN`"),
    (["show", "RUN", "--html", "FOLDER"], "is a folder; give the page's file name"),
])
def test_trace_show_html_bad_input_is_one_line(tmp_path, capsys, argv, message):
    run = make_run(tmp_path)
    (tmp_path / "FOLDER").mkdir()
    argv = [str(run) if a == "RUN" else str(tmp_path / a) if a == "FOLDER" else a for a in argv]
    assert main(["trace", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_failing_plot_is_named_and_the_page_written(tmp_path, monkeypatch):
    run = make_run(tmp_path)

    def broken(rows):
        raise RuntimeError("no <canvas> here")

    monkeypatch.setattr(plots, "training_loss", broken)
    html, doc = page_of(run)
    missing = doc.by_id("missing")
    assert missing is not None
    assert "the training loss plot could not be drawn (RuntimeError: no <canvas> here)" in missing.text()
    assert "no <canvas> here" in doc.by_id("training").text()
    assert len(doc.all("img")) == 3  # the other plots are there


def test_run_never_fails_over_its_page(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)

    def broken(run_dir, page_dir):
        raise OSError("disk full")

    monkeypatch.setattr(render, "render", broken)
    assert render.write_run_page(run) is None
    err = capsys.readouterr().err
    assert "warning: could not write the run's page" in err and "disk full" in err
    assert not (run / "report.html").exists()


def test_no_reward_no_reward_plot(tmp_path):
    """SFT logs have no reward: no reward plot and no line about one; a log with `reward` gets one (GRPO's)."""
    run = make_run(tmp_path)
    log = run / "adapter" / TRAIN_LOG
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    _, doc = page_of(run)
    assert [f.attrs["id"] for f in doc.by_id("training").all("figure")] == ["plot-training-loss"]
    assert "reward" not in doc.by_id("training").text()
    assert plots.reward_curve([{"step": 1, "reward": 0.5}]) is not None  # a band needs reward_std, a line does not
    assert plots.reward_curve([{"step": 1, "loss": 0.5}]) is None


def test_a_bare_folder_gets_a_page(tmp_path):
    """A trace folder with nothing else (a stage's output folder): the page says what there is not."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "trace.jsonl").write_text(json.dumps({"stage": "merge", "duration_s": 2.0, "status": "ok",
                                                    "figures": {}, "kind": "command"}) + "\n")
    _, doc = page_of(folder)
    assert not doc.all("img")
    assert "no training log in this folder" in doc.by_id("training").text()
    assert "no evaluation in this run" in doc.by_id("accuracy").text()
    assert rows(doc.by_id("stages").all("table")[0])[1][0] == "merge"


def test_evaluate_report_draws_its_plots(tmp_path, demo_dir, monkeypatch):
    """evaluate --report writes accuracy.png and failures.png beside report.md, which shows them; a plot that
    fails is named in report.md and the report is written all the same."""
    from sqltune.config import EvalConfig
    from sqltune.eval.evaluate import evaluate

    gold = json.loads((demo_dir / "dev.json").read_text())[:6]
    (tmp_path / "gold.sql").write_text("".join(f"{g['query']}\t{g['db_id']}\n" for g in gold))
    (tmp_path / "pred.sql").write_text("".join((g["query"] if i % 2 else "SELECT nothing FROM nowhere") + "\n"
                                               for i, g in enumerate(gold)))

    def run(report):
        cfg = EvalConfig(pred=str(tmp_path / "pred.sql"), gold=str(tmp_path / "gold.sql"),
                         db_dir=str(demo_dir / "database"), tables=str(demo_dir / "tables.json"), quiet=True,
                         workers=1, report=str(tmp_path / report))
        evaluate(cfg)
        return tmp_path / report

    folder = run("report")
    for name in ("accuracy.png", "failures.png"):
        assert (folder / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
    text = (folder / "report.md").read_text()
    assert "![EX and EM per level](accuracy.png)" in text and "![failure kinds](failures.png)" in text

    def broken(*a, **k):
        raise RuntimeError("matplotlib is gone")

    monkeypatch.setattr(plots, "accuracy_by_level", broken)
    folder = run("report2")
    assert not (folder / "accuracy.png").exists() and (folder / "failures.png").is_file()
    assert "EX and EM per level: not drawn, could not be drawn (RuntimeError: matplotlib is gone)." in \
        (folder / "report.md").read_text()
    assert json.loads((folder / "metrics.json").read_text())["count"] == 6


def test_the_training_log_name_is_the_train_stage_s():
    from sqltune.train.sft import TRAIN_LOG as SFT_LOG

    assert TRAIN_LOG == SFT_LOG


def test_the_template_ships_as_package_data():
    """A wheel holds only .py files unless pyproject names the rest: the page's template must be named."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch(render.TEMPLATE, pattern) for pattern in data["sqltune.report"])
    assert (ROOT / "sqltune" / "report" / render.TEMPLATE).is_file()


# ---------------------------------------------------------------- a real run on the tiny model
@pytest.fixture
def recipe(tmp_path, demo_dir, tiny_model):
    cfg = tmp_path / "page.yaml"
    cfg.write_text(f"""
name: page
compare_base: true
model_name_or_path: {tiny_model}
template: chatml
max_source_length: 512
prepare: {{source: spider, data_dir: {demo_dir}, name: demo}}
train: {{max_steps: 3, per_device_train_batch_size: 4, logging_steps: 1, learning_rate: 1.0e-3, save_steps: 3}}
predict: {{max_new_tokens: 8, batch_size: 8, max_samples: 12}}
evaluate: {{etype: all}}
""")
    return cfg


def test_run_writes_its_page(recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs_dir", str(runs), "--quiet"]) == 0
    (run,) = runs.iterdir()
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    spans = [json.loads(x) for x in (run / "trace.jsonl").read_text().splitlines()]
    assert all(s["memory"]["peak_rss_mb"] > 0 for s in spans)
    html, doc = page_of(run, run / "report.html")  # written again here: the same page as the run's
    assert (run / "report.html").read_text(encoding="utf-8") == html
    stages = [r[0] for r in rows(doc.by_id("stages").all("table")[0])[1:]]
    assert stages == ["prepare", "train", "merge", "predict_base", "evaluate_base", "predict_finetuned",
                      "evaluate_finetuned"]
    assert all(r[4].endswith(" MB") for r in rows(doc.by_id("stages").all("table")[0])[1:])
    assert [f.attrs["id"] for f in doc.all("figure")] == ["plot-training-loss", "plot-accuracy", "plot-failures"]
    accuracy = rows(doc.by_id("accuracy").all("table")[0])
    assert accuracy[0][2:] == ["base (greedy)", "finetuned (greedy)"] and accuracy[-1][:2] == ["all", "12"]
    targets = check_links(doc, run)
    for rel in ("config.yaml", "trace.jsonl", "eval/base/accuracy.png", "eval/finetuned/failures.png",
                "predictions/finetuned.sql", "adapter/trainer_log.jsonl"):
        assert rel in targets, rel

    # continued: every stage skipped, the page rewritten with the attempts that did the work
    assert main(["run", str(recipe), "--run_dir", str(run), "--quiet"]) == 0
    doc = parse((run / "report.html").read_text(encoding="utf-8"))
    assert {r[1] for r in rows(doc.by_id("stages").all("table")[0])[1:]} == {"ok (skipped since)"}
    assert len(rows(doc.by_id("stages").all("table")[1])) == 3  # two invocations


def test_a_failed_run_writes_its_page(tmp_path, capsys):
    """The page of a run that stopped shows the stage that failed and its error, and the run still fails."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\nstages: [prepare]\nprepare: {{source: spider, data_dir: {tmp_path / 'none'}}}\n")
    assert main(["run", str(recipe), "--runs_dir", str(tmp_path / "runs")]) == 2
    (run,) = (tmp_path / "runs").iterdir()
    doc = parse((run / "report.html").read_text(encoding="utf-8"))
    (row,) = rows(doc.by_id("stages").all("table")[0])[1:]
    assert row[0] == "prepare" and row[1] == "failed" and str(tmp_path / "none") in row[7]
    assert "failed" in doc.by_id("summary").text()
