"""merge never writes into its inputs (issue #13 §1: "refuse an output folder that is, contains, or lies inside an
input" for every stage)."""

from __future__ import annotations

import shutil

import pytest

from sqltune.cli import main


@pytest.fixture
def own(tiny_model, prepared_demo, tmp_path):
    """A copy of the tiny model and a 1-step adapter beside it, so a regression destroys only copies."""
    model = tmp_path / "base"
    shutil.copytree(tiny_model, model)
    assert main(["train", "--model_name_or_path", str(model), "--dataset", "demo_train", "--dataset_dir",
                 str(prepared_demo), "--output_dir", str(tmp_path / "adapter"), "--max_steps", "1"]) == 0
    return model, tmp_path / "adapter"


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["base", "adapter", "parent", "inside_adapter"])
def test_merge_output_overlapping_an_input_is_refused(own, tmp_path, capsys, where):
    """Pins: `merge --out <base or adapter folder> --overwrite_output_dir` merged, then removed the folder and put the
    merged model in its place: the base model (or the adapter, or with a parent folder both) was destroyed."""
    model, adapter = own
    out = {"base": model, "adapter": adapter, "parent": tmp_path, "inside_adapter": adapter / "merged"}[where]
    before = files(tmp_path)
    capsys.readouterr()
    assert main(["merge", "--model_name_or_path", str(model), "--adapter", str(adapter), "--out", str(out),
                 "--overwrite_output_dir"]) == 2
    err = capsys.readouterr().err
    assert "choose another --out" in err and err.count("\n") == 1
    assert files(tmp_path) == before
