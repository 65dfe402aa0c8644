"""predict never returns stale lines and never destroys what it did not make (issues #12 §2-3, #13 §1)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest
from conftest import predict_killed_at_batch

from sqltune.cli import main
from sqltune.config import MergeConfig, PredictConfig, TrainConfig
from sqltune.errors import SqltuneError
from sqltune.infer.merge import merge
from sqltune.infer.predict import predict
from sqltune.train.sft import train


def _train(tiny_model, prepared_demo, out, lr=5e-3, **kw):
    train(TrainConfig(model_name_or_path=str(tiny_model), dataset="demo_train", dataset_dir=str(prepared_demo),
                      template="chatml", output_dir=str(out), max_steps=2, learning_rate=lr,
                      per_device_train_batch_size=4, save_steps=100, overwrite_output_dir=True, **kw))
    return out


@pytest.fixture(scope="module")
def trained(tiny_model, prepared_demo, tmp_path_factory):
    """An adapter trained with template chatml and max_source_length 256, and its merged model."""
    root = tmp_path_factory.mktemp("resume")
    adapter = _train(tiny_model, prepared_demo, root / "adapter", max_source_length=256)
    merge(MergeConfig(model_name_or_path=str(tiny_model), adapter=str(adapter), out=str(root / "merged")))
    return {"adapter": adapter, "merged": root / "merged", "root": root}


def cfg(tiny_model, prepared_demo, out, **kw):
    base = dict(model_name_or_path=str(tiny_model), dataset="demo_dev", dataset_dir=str(prepared_demo), out=str(out),
                template="chatml", max_new_tokens=8, batch_size=4, max_samples=4)
    base.update(kw)
    return PredictConfig(**base)


def test_retrained_adapter_in_the_same_folder_is_not_resumed(tiny_model, prepared_demo, tmp_path):
    """Pins: retrain into the same adapter folder, rerun predict -> `resumed_from=N, generated=0` with the old
    adapter's SQL (the resume check keyed on the path string)."""
    adapter = _train(tiny_model, prepared_demo, tmp_path / "adapter")
    out = tmp_path / "p.sql"
    first = predict(cfg(tiny_model, prepared_demo, out, adapter=str(adapter)))
    assert first["generated"] == 4
    _train(tiny_model, prepared_demo, adapter, lr=2e-2, seed=7)
    with pytest.raises(SqltuneError, match="another run"):
        predict(cfg(tiny_model, prepared_demo, out, adapter=str(adapter)))
    again = predict(cfg(tiny_model, prepared_demo, out, adapter=str(adapter), overwrite=True))
    assert again["generated"] == 4 and again["resumed_from"] == 0


def test_remerged_model_in_the_same_folder_is_not_resumed(tiny_model, prepared_demo, trained, tmp_path):
    """Pins: re-merge a retrained adapter into the same model folder, rerun predict -> the old model's lines kept."""
    merged = tmp_path / "merged"
    shutil.copytree(trained["merged"], merged)
    out = tmp_path / "m.sql"
    predict(cfg(merged, prepared_demo, out))
    adapter = _train(tiny_model, prepared_demo, tmp_path / "adapter2", lr=2e-2, seed=3)
    merge(MergeConfig(model_name_or_path=str(tiny_model), adapter=str(adapter), out=str(merged),
                      overwrite_output_dir=True))
    with pytest.raises(SqltuneError, match="another run.*model"):
        predict(cfg(merged, prepared_demo, out))


def test_a_merged_model_keeps_its_prompt_format_without_its_adapter(tiny_model, prepared_demo, trained, tmp_path):
    """Pins: merge wrote only the adapter's path, so once the adapter folder was moved or deleted, predict on the
    merged model fell back to template auto and 1024 prompt tokens without a word (trained: chatml, 256)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], adapter)
    merge(MergeConfig(model_name_or_path=str(tiny_model), adapter=str(adapter), out=str(tmp_path / "merged")))
    shutil.rmtree(adapter)
    predict(cfg(tmp_path / "merged", prepared_demo, tmp_path / "m.sql", template=""))
    meta = json.loads((tmp_path / "m.sql.meta.json").read_text())
    assert (meta["template"], meta["max_source_length"]) == ("chatml", 256)


def test_same_model_spelled_relative_or_absolute_resumes(tiny_model, prepared_demo, tmp_path, monkeypatch):
    """Pins: the model path written another way (relative vs absolute) counted as another run."""
    out = tmp_path / "r.sql"
    predict(cfg(tiny_model, prepared_demo, out))
    monkeypatch.chdir(tiny_model.parent)
    again = predict(cfg(tiny_model.name, prepared_demo, out))
    assert again["generated"] == 0 and again["resumed_from"] == 4


# ------------------------------------------------------------------ the training record decides the prompt format
def test_template_and_length_come_from_the_training_record(tiny_model, prepared_demo, trained, tmp_path):
    """Pins: predict ignored sqltune_train.yaml and prompted with `auto`/1024 whatever the adapter was trained with;
    a merged model reads the record through sqltune_merge.json."""
    for name, kw in (("a", {"adapter": str(trained["adapter"])}),
                     ("m", {"model_name_or_path": str(trained["merged"])})):
        out = tmp_path / f"{name}.sql"
        predict(cfg(tiny_model, prepared_demo, out, template="", **kw))
        meta = json.loads((tmp_path / f"{name}.sql.meta.json").read_text())
        assert meta["template"] == "chatml" and meta["max_source_length"] == 256, name


def test_other_prompt_length_than_training_is_refused(tiny_model, prepared_demo, trained, tmp_path, capsys):
    """Pins: a max_source_length other than the adapter's training one was used silently (prompts cut differently
    from training); an explicit --template is the user's way to take over."""
    for kw in ({"adapter": str(trained["adapter"])}, {"model_name_or_path": str(trained["merged"])}):
        with pytest.raises(SqltuneError, match="max_source_length 256"):
            predict(cfg(tiny_model, prepared_demo, tmp_path / "x.sql", template="", max_source_length=512, **kw))
        assert not list(tmp_path.iterdir())
    figures = predict(cfg(tiny_model, prepared_demo, tmp_path / "y.sql", template="chatml", max_source_length=512,
                          adapter=str(trained["adapter"])))
    assert figures["generated"] == 4


def test_base_model_defaults_to_auto_and_1024(tiny_model, prepared_demo, tmp_path):
    """Pins: with no training record the defaults stay what they were (auto template, 1024 prompt tokens)."""
    predict(cfg(tiny_model, prepared_demo, tmp_path / "b.sql", template=""))
    meta = json.loads((tmp_path / "b.sql.meta.json").read_text())
    assert meta["template"] == "auto" and meta["max_source_length"] == 1024


# ------------------------------------------------------------------ inputs first, outputs last
def _argv(tiny_model, prepared_demo, out, *extra):
    return ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir",
            str(prepared_demo), "--out", str(out), "--template", "chatml", "--max_new_tokens", "6",
            "--max_samples", "4", *extra]


def _snapshot(folder):
    """The prediction files of a folder (a command's trace span, written beside its output, left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "trace.jsonl"}


def test_overwrite_with_a_mistyped_model_keeps_the_old_predictions(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: `predict --overwrite` with a mistyped model truncated the old predictions before the model error."""
    out = tmp_path / "p.sql"
    assert main(_argv(tiny_model, prepared_demo, out)) == 0
    before = _snapshot(tmp_path)
    argv = _argv(tiny_model, prepared_demo, out, "--overwrite")
    argv[2] = str(tiny_model) + "_typo"
    assert main(argv) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_failed_checks_leave_nothing_that_blocks_the_next_run(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: `--backend vllm` without vLLM left empty output and meta files, so the next (hf) run said
    "holds predictions of another run"."""
    out = tmp_path / "v.sql"
    assert main(_argv(tiny_model, prepared_demo, out, "--backend", "vllm")) == 2
    assert "vLLM" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("v.sql") and not p.name.endswith(".lock")]
    assert main(_argv(tiny_model, prepared_demo, out)) == 0
    assert len(out.read_text().splitlines()) == 4


def test_interrupted_overwrite_keeps_the_finished_output(tiny_model, prepared_demo, tmp_path, monkeypatch):
    """Pins: --overwrite deleted the finished output before the new run had produced anything; the new run is
    written beside it and replaces it only when complete, and a rerun continues the new run."""
    out = tmp_path / "o.sql"
    predict(cfg(tiny_model, prepared_demo, out))
    before = _snapshot(tmp_path)
    with predict_killed_at_batch(2), pytest.raises(KeyboardInterrupt):
        predict(cfg(tiny_model, prepared_demo, out, max_new_tokens=5, batch_size=2, overwrite=True))
    now = _snapshot(tmp_path)
    assert {k: v for k, v in now.items() if k in before} == before  # the finished output is untouched
    figures = predict(cfg(tiny_model, prepared_demo, out, max_new_tokens=5, batch_size=2))
    assert figures["resumed_from"] == 2 and figures["generated"] == 2
    assert json.loads((tmp_path / "o.sql.meta.json").read_text())["max_new_tokens"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.sql", "o.sql.meta.json", "o.sql.raw.jsonl"]


@pytest.mark.parametrize("where", ["model", "adapter", "records"])
def test_out_inside_an_input_is_refused(tiny_model, prepared_demo, trained, tmp_path, where, capsys):
    """Pins: --out inside the model or adapter folder, or equal to the records file, was written (and with
    --overwrite destroyed) without a word."""
    target = {"model": tiny_model / "pred.sql", "adapter": trained["adapter"] / "pred.sql",
              "records": prepared_demo / "demo_dev.jsonl"}[where]
    before = target.read_bytes() if target.exists() else None
    extra = ["--adapter", str(trained["adapter"])] if where == "adapter" else []
    assert main(_argv(tiny_model, prepared_demo, target, "--overwrite", *extra)) == 2
    assert "--out" in capsys.readouterr().err
    assert (target.read_bytes() if target.exists() else None) == before
    assert not list(target.parent.glob(target.name + ".*"))


def test_second_predict_on_the_same_out_is_refused(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins: two predict processes on the same --out both appended every record (120 lines for 60 records)."""
    out = tmp_path / "l.sql"
    with open(tmp_path / "l.sql.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another predict holds it
        assert main(_argv(tiny_model, prepared_demo, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another predict" in err[0]
        assert not out.exists()
    assert main(_argv(tiny_model, prepared_demo, out)) == 0


def test_second_process_gets_one_line(tiny_model, prepared_demo, tmp_path):
    """Pins the same as above across real processes: the second `sqltune predict` exits 2 with one line."""
    import subprocess
    import sys

    out = tmp_path / "q.sql"
    with open(tmp_path / "q.sql.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "sqltune", *_argv(tiny_model, prepared_demo, out)],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 2 and "another predict" in done.stderr.strip().splitlines()[-1]


def test_a_file_predict_did_not_make_is_never_replaced(tiny_model, prepared_demo, tmp_path, capsys):
    """Pins data loss: `--out` naming a file of another dataset (here the train records, while predicting dev) or
    any file without a predict meta beside it was refused with "holds predictions of another run ... pass
    --overwrite to replace them", and following that advice replaced it. Now it is one line, with or without
    --overwrite, and the file is untouched."""
    data = tmp_path / "data"
    shutil.copytree(prepared_demo, data)
    victim = data / "demo_train.jsonl"
    before = victim.read_bytes()
    args = ["predict", "--model_name_or_path", str(tiny_model), "--dataset", "demo_dev", "--dataset_dir", str(data),
            "--template", "chatml", "--max_new_tokens", "4", "--max_samples", "2", "--out", str(victim)]
    for extra in ([], ["--overwrite"]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert "is not a prediction file of sqltune" in err and err.count("\n") == 1
        assert victim.read_bytes() == before
    assert not (data / "demo_train.jsonl.meta.json").exists()


def test_an_append_cut_short_writes_the_rest(tmp_path, monkeypatch):
    """Pins: append_once ignored the count os.write returns, so a write cut short (a full disk) lost the end of the
    batch's lines without an error, and a later publish could pass the file as complete."""
    from sqltune.io import append_once

    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))  # at most 3 bytes per call
    append_once(tmp_path / "raw.jsonl", '{"index": 0}\n{"index": 1}\n')
    assert (tmp_path / "raw.jsonl").read_text() == '{"index": 0}\n{"index": 1}\n'


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcde", "bcdef")
) + "template: *f\n"  # a million values (bounded: a thousand times this would take the machine down)


@pytest.mark.parametrize("record, says", [
    (BOMB.encode(), "anchors and aliases expand to more than"),
    (b"template: chatml\nwhen: 2024-13-45\n", "bad value in training record"),
    (b"template: chatml\nnote: caf\xe9\n", "is not UTF-8 text"),
    (b"- chatml\n- 256\n", "must hold a mapping"),
    (b"template: [chatml\n", "malformed"),  # one line already before: kept so
])
def test_a_bad_training_record_is_one_line(tiny_model, prepared_demo, tmp_path, capsys, record, says):
    """Pins: the training record (sqltune_train.yaml, which may come with a model folder from elsewhere) was read
    with yaml.safe_load: an alias bomb was taken in unbounded (and expanded when its value was shown), a value
    YAML cannot build or bytes that are not UTF-8 were a traceback, and a record that is not a mapping was
    silently ignored (prompts in the default format). Each is now one line naming the file, before any output."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "sqltune_train.yaml").write_bytes(record)
    assert main(_argv(model, prepared_demo, tmp_path / "p.sql")) == 2
    err = capsys.readouterr().err
    assert says in err and str(model / "sqltune_train.yaml") in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("p.sql") and not p.name.endswith(".lock")]
