"""`sqltune run` never reports an old model's figures (issue #12 section 1): a stage's identity is its own settings
plus the identities of what it reads, so any upstream change reruns everything downstream.

Most tests replace the stages with stand-ins that only write files (no training), and read which stages ran from
the trace; the last ones run the real stages on the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from sqltune.cli import main
from sqltune.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def calls(monkeypatch):
    """Stand-in stages: each records its config and writes what the next stage reads."""
    seen: list[tuple[str, object]] = []

    def prepare(cfg):
        seen.append(("prepare", cfg))
        return real_prepare(cfg)

    def train(cfg):
        seen.append(("train", cfg))
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps({"lr": cfg.learning_rate}))
        return {"train_loss": 1.0}

    def merge(cfg):
        seen.append(("merge", cfg))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text((Path(cfg.adapter) / "adapter_config.json").read_text())
        return {}

    def predict(cfg):
        seen.append(("predict", cfg))
        if Path(cfg.out).exists() and not cfg.overwrite:
            raise AssertionError("predict would refuse: out holds predictions of another run")
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text("SELECT 1\n")
        return {"records": 1}

    def evaluate(cfg):
        seen.append(("evaluate", cfg))
        return {"count": 1, "ex": 0.5}

    real_prepare = STAGES["prepare"].run
    for name, func in (("prepare", prepare), ("train", train), ("merge", merge), ("predict", predict),
                       ("evaluate", evaluate)):
        monkeypatch.setitem(STAGES, name, dataclasses.replace(STAGES[name], run=func))
    return seen


@pytest.fixture
def recipe(tmp_path, demo_dir):
    path = tmp_path / "p.yaml"
    path.write_text(f"""
name: p
compare_base: true
model_name_or_path: some-base-model
template: chatml
prepare: {{source: spider, data_dir: {demo_dir}, name: demo}}
train: {{max_steps: 2, learning_rate: 1.0e-3}}
predict: {{batch_size: 8}}
""")
    return path


def ran(run: Path, calls: list) -> dict:
    """{stage label: status} of the last `sqltune run` in `run`, and forget the recorded calls."""
    spans = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    ends = [i for i, s in enumerate(spans) if s["stage"] == "run"]
    last = spans[(ends[-2] + 1 if len(ends) > 1 else 0):ends[-1]]
    calls.clear()
    return {s["stage"]: s["status"] for s in last}


def save_checkpoint(cfg) -> None:
    """What a training killed after its first save leaves: a complete checkpoint-1."""
    ckpt = Path(cfg.output_dir) / "checkpoint-1"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")


ALL = ["prepare", "train", "merge", "predict_base", "evaluate_base", "predict_finetuned", "evaluate_finetuned"]


def test_changed_training_setting_reruns_everything_downstream(recipe, tmp_path, calls):
    """Pins: after `train.learning_rate` changed, train reran but predict_finetuned and evaluate_finetuned were
    skipped ("done already with these settings"), so the old adapter's EX was printed as the new one's."""
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert ran(run, calls) == {label: "ok" for label in ALL}
    assert main(["run", str(recipe), "--run_dir", str(run), "--train.learning_rate", "5e-4"]) == 0
    status = ran(run, calls)
    assert [k for k, v in status.items() if v == "ok"] == ["train", "merge", "predict_finetuned", "evaluate_finetuned"]
    assert status["prepare"] == status["predict_base"] == status["evaluate_base"] == "skipped"


def test_changed_prepare_setting_reruns_every_stage(recipe, tmp_path, calls):
    """Pins: changing `prepare.schema_style` reran prepare but skipped train on the old records."""
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    ran(run, calls)
    assert main(["run", str(recipe), "--run_dir", str(run), "--prepare.schema_style", "ddl"]) == 0
    assert ran(run, calls) == {label: "ok" for label in ALL}


def test_changed_predict_setting_reruns_predict_with_overwrite(recipe, tmp_path, calls):
    """Pins: a changed predict setting failed with "holds predictions of another run ... pass --overwrite" and
    `run` had no way to pass it. The run passes overwrite only when the old file is of another identity."""
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert [c.overwrite for n, c in calls if n == "predict"] == [True, True]  # nothing to continue: fresh
    ran(run, calls)
    assert main(["run", str(recipe), "--run_dir", str(run), "--predict.batch_size", "4"]) == 0
    assert [c.overwrite for n, c in calls if n == "predict"] == [True, True]
    status = ran(run, calls)
    assert [k for k, v in status.items() if v == "ok"] == ["predict_base", "evaluate_base", "predict_finetuned",
                                                            "evaluate_finetuned"]


def test_unfinished_stage_continues_only_with_the_same_identity(recipe, tmp_path, calls, monkeypatch, capsys):
    """A stage that stopped half-way is continued (train resume, predict keeps its lines) when nothing changed,
    and started afresh when anything it depends on changed (its partial output is of another run)."""
    run = tmp_path / "run"
    stand_in = STAGES["train"].run

    def train_dies_after_a_checkpoint(cfg):
        save_checkpoint(cfg)
        raise RuntimeError("killed")

    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"], run=train_dies_after_a_checkpoint))
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 1
    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"], run=train_dies_after_a_checkpoint))
    assert main(["run", str(recipe), "--run_dir", str(run), "--train.learning_rate", "5e-4"]) == 1
    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"], run=stand_in))
    calls.clear()
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0  # learning rate changed back: no resume
    (train_cfg,) = [c for n, c in calls if n == "train"]
    assert not train_cfg.resume and train_cfg.overwrite_output_dir

    calls.clear()
    original = STAGES["predict"].run

    def predict_dies(cfg):
        Path(cfg.out).write_text("SELECT 1\n")
        raise RuntimeError("killed")

    monkeypatch.setitem(STAGES, "predict", dataclasses.replace(STAGES["predict"], run=predict_dies))
    assert main(["run", str(recipe), "--run_dir", str(run), "--predict.max_new_tokens", "9"]) == 1
    monkeypatch.setitem(STAGES, "predict", dataclasses.replace(STAGES["predict"], run=original))
    calls.clear()
    capsys.readouterr()  # the same identity continues: no overwrite, so the stand-in refuses like predict does
    assert main(["run", str(recipe), "--run_dir", str(run), "--predict.max_new_tokens", "9"]) == 1
    assert "would refuse" in capsys.readouterr().err
    calls.clear()
    assert main(["run", str(recipe), "--run_dir", str(run), "--predict.max_new_tokens", "10"]) == 0
    assert all(c.overwrite for n, c in calls if n == "predict")


def test_train_resumes_its_checkpoint_when_nothing_changed(recipe, tmp_path, calls, monkeypatch):
    """The resumed training is the same stage: resume=True, and its identity ignores the resume switch."""
    run = tmp_path / "run"
    stand_in = STAGES["train"].run

    def dies(cfg):
        save_checkpoint(cfg)
        raise RuntimeError("killed")

    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"], run=dies))
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 1
    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"], run=stand_in))
    calls.clear()
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    (train_cfg,) = [c for n, c in calls if n == "train"]
    assert train_cfg.resume and not train_cfg.overwrite_output_dir
    ran(run, calls)
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert set(ran(run, calls).values()) == {"skipped"}


def test_source_data_changed_in_place_reruns_every_stage(tmp_path, calls, demo_dir):
    """Pins: the identity held the data folder's path only, so after a question or gold query of dev.json was
    corrected in place, `sqltune run` skipped prepare and every later stage and printed the old EX as current."""
    import shutil

    data = tmp_path / "spider"
    shutil.copytree(demo_dir, data)
    again = first_run(tmp_path, calls, "some-base-model", data)
    dev = json.loads((data / "dev.json").read_text())
    dev[0]["query"] = dev[0]["query"] + " "  # same path, same size class: only the content differs
    (data / "dev.json").write_text(json.dumps(dev))
    assert set(again().values()) == {"ok"}
    (data / ".cache").mkdir()  # hidden files (locks, caches) are not the data
    (data / ".cache" / "x").write_text("x")
    assert set(again().values()) == {"skipped"}


def test_base_model_folder_changed_in_place_reruns_what_read_it(tmp_path, calls, demo_dir):
    """Pins: a base model folder rewritten in place (re-converted, another checkpoint copied over it) kept its
    path, so `sqltune run` reused the adapter trained on the old weights and the old base predictions."""
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text('{"v": 1}')
    again = first_run(tmp_path, calls, str(base), demo_dir)
    (base / "config.json").write_text('{"v": 2}')
    status = again()
    assert status.pop("prepare") == "skipped" and set(status.values()) == {"ok"}
    assert set(again().values()) == {"skipped"}


def first_run(tmp_path: Path, calls: list, model: str, data: Path):
    """Run a recipe of `model` on `data` once; returns a function that runs it again and says which stages ran."""
    recipe, run = tmp_path / "r.yaml", tmp_path / "run"
    recipe.write_text(f"name: r\ncompare_base: true\nmodel_name_or_path: {model}\ntemplate: chatml\n"
                      f"prepare: {{source: spider, data_dir: {data}, name: demo}}\ntrain: {{max_steps: 2}}\n")

    def again() -> dict:
        assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
        return ran(run, calls)

    again()
    return again


def test_same_folder_relative_or_absolute_is_the_same_run(recipe, tmp_path, calls, monkeypatch, demo_dir):
    """Pins: `--run_dir runs/x` then `--run_dir /abs/runs/x` reran every stage (then failed at predict); the same
    holds for a data folder spelled both ways in the recipe."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe), "--run_dir", "run"]) == 0
    run = tmp_path / "run"
    ran(run, calls)
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert set(ran(run, calls).values()) == {"skipped"}
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    relative = Path("..") / "run"
    data = Path("..", "..", *demo_dir.relative_to(tmp_path.parent).parts)  # the demo folder spelled from here
    assert data.resolve() == demo_dir.resolve()
    assert main(["run", str(recipe), "--run_dir", str(relative), f"--prepare.data_dir={data}"]) == 0
    assert set(ran(run, calls).values()) == {"skipped"}


def test_recipe_never_continues_a_run_of_a_longer_name(recipe, tmp_path, calls):
    """Pins: a recipe named `p` continued the unfinished run of a recipe named `p-big` (prefix match)."""
    runs = tmp_path / "runs"
    other = runs / "p-big-20260101-000000"
    other.mkdir(parents=True)
    (other / "trace.jsonl").write_text(json.dumps({"run_id": other.name, "stage": "prepare", "start": "",
                                                   "end": "", "duration_s": 1.0, "status": "ok", "figures": {},
                                                   "error": None}) + "\n")
    assert main(["run", str(recipe), "--runs_dir", str(runs), "--stages", "prepare"]) == 0
    mine = sorted(d.name for d in runs.iterdir() if d != other)
    assert len(mine) == 1 and mine[0].startswith("p-2") and not (other / "data").exists()


def test_dotted_and_run_level_overrides(recipe, tmp_path, calls, capsys):
    """Pins: `sqltune run configs/demo.yaml --train.max_steps 2` was "unknown option" (the demo header promised it).
    A run-level override wins over the same key in every section; unknown names are one line with a hint."""
    text = recipe.read_text().replace("predict: {batch_size: 8}", "predict: {batch_size: 8, template: default}")
    recipe.write_text(text)
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run), "--train.max_steps", "3", "--predict.batch_size", "4",
                 "--model_name_or_path", "other-model", "--template", "llama3"]) == 0
    train, merge = (next(c for n, c in calls if n == stage) for stage in ("train", "merge"))
    assert train.max_steps == 3 and train.model_name_or_path == "other-model" == merge.model_name_or_path
    predicts = [c for n, c in calls if n == "predict"]
    assert [c.batch_size for c in predicts] == [4, 4] and {c.template for c in predicts} == {"llama3"}
    assert predicts[0].model_name_or_path == "other-model"
    capsys.readouterr()
    assert main(["run", str(recipe), "--run_dir", str(run), "--trian.max_steps", "3"]) == 2
    assert "unknown stage 'trian'" in capsys.readouterr().err
    assert main(["run", str(recipe), "--run_dir", str(run), "--train.max_stesp", "3"]) == 2
    assert "did you mean --max_steps" in capsys.readouterr().err
    assert main(["run", str(recipe), "--run_dir", str(run), "--max_stesp", "3"]) == 2
    assert "unknown run-level key 'max_stesp'" in capsys.readouterr().err


def test_print_config_shows_every_stage_and_changes_nothing(recipe, tmp_path, calls, capsys):
    """Issue #11: `sqltune run RECIPE --print_config` prints each stage's resolved config (YAML) and exits."""
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs_dir", str(runs), "--print_config", "--train.max_steps", "7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert list(shown)[:4] == ["name", "run_dir", "stages", "compare_base"]
    assert set(shown) >= set(ALL)
    assert shown["train"]["max_steps"] == 7 and shown["train"]["template"] == "chatml"
    assert shown["predict_finetuned"]["model_name_or_path"].endswith("merged")
    assert not runs.exists() and calls == []


def test_demo_recipe_header_example_works(capsys):
    """Pins: configs/demo.yaml's header promised `--train.max_steps` overrides, which were "unknown option"."""
    header = (ROOT / "configs" / "demo.yaml").read_text().split("\nname:")[0]
    assert "sqltune run configs/demo.yaml --train.max_steps" in header
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--train.max_steps", "2", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 2


def test_force_reruns_every_stage_afresh(recipe, tmp_path, calls):
    """Pins: `--force` retrained everything and still failed at predict ("holds predictions of another run")."""
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    ran(run, calls)
    assert main(["run", str(recipe), "--run_dir", str(run), "--force"]) == 0
    assert all(c.overwrite for n, c in calls if n == "predict")
    assert ran(run, calls) == {label: "ok" for label in ALL}


def test_evaluate_scores_the_prefix_predict_answered(recipe, tmp_path, calls):
    """Pins: `predict.max_samples: N` in a recipe made evaluate fail ("has N lines but ... gold has M"): the run now
    passes the same prefix to evaluate."""
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run_dir", str(run), "--predict.max_samples", "5"]) == 0
    assert [c.max_samples for n, c in calls if n == "evaluate"] == [5, 5]


def test_an_unreadable_file_in_the_data_folder_does_not_stop_the_identity(tmp_path, monkeypatch):
    """The content digest reads every file of an input folder; one this user may not read (a stray root-owned file)
    is taken by size and modification time instead of ending the run with an internal error."""
    from sqltune.digest import tree_digest

    (tmp_path / "a.json").write_text("{}")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    before = tree_digest(tmp_path)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == locked.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert tree_digest(tmp_path) != before and tree_digest(tmp_path) == tree_digest(tmp_path)


def test_a_folder_read_by_several_stages_is_digested_once_per_run(tmp_path, calls, demo_dir, monkeypatch):
    """The databases are read by prepare (inside the data folder), evaluate_base and evaluate_finetuned, the base
    model folder by train, merge and predict_base: each outside folder's content is digested once per run."""
    from sqltune.pipeline import core as pipeline  # outside_content's module since the pipeline is a package

    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    seen: list[str] = []
    real = pipeline.tree_digest

    def counted(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(pipeline, "tree_digest", counted)
    first_run(tmp_path, calls, str(base), demo_dir)
    assert seen and len(seen) == len(set(seen)), seen
    assert str(base.resolve()) in seen


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def _glibc_linux() -> bool:
    try:
        return Path("/proc/self/status").is_file() and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc_linux(), reason="reads the RSS from /proc and relies on glibc's heap (Linux, glibc)")
def test_a_step_hands_the_memory_it_freed_back_before_the_next(tmp_path, monkeypatch):
    """Pins the Spider recipe that stopped after its first step: `sqltune run` runs steps in one process, and the
    SFT of Qwen2.5-Coder-0.5B left some 20 GB of freed heap there, so the next step's vLLM engine found 2 GiB of
    RAM and would not start. A stand-in step frees 300 MB of malloc'd blocks while a few of them stay alive
    spread over the heap (as a training leaves its model's small objects), which keeps glibc from shrinking the
    heap by itself; once the step is done the process must hold no more than a tenth of it."""
    from sqltune.config import PrepareConfig
    from sqltune.pipeline.core import run_step

    kept: list[bytes] = []

    def fragmenting_step(cfg):
        blocks = [bytes(8192) for _ in range(38_400)]  # 300 MB, each block over pymalloc's limit: malloc's heap
        kept.extend(blocks[999::1000])
        return {"records": len(blocks)}

    monkeypatch.setitem(STAGES, "prepare", dataclasses.replace(STAGES["prepare"], run=fragmenting_step))
    before = _rss_mb()
    run_step(tmp_path / "run", "prepare", PrepareConfig(out=str(tmp_path / "data")), [], force=False)
    assert _rss_mb() - before < 30, f"the step left {_rss_mb() - before:.0f} MB of freed heap in the process"
    assert len(kept) == 38
