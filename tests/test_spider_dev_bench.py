"""benchmarks/spider_dev.py with its arms (issue #16, section 4): the whole code path on the tiny model and the demo
data, and its table, chart and vote figures on made-up results (the real run is in BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import spider_dev
import vote_rules

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_arm_on_the_tiny_model(demo_dir, tiny_model, tmp_path):
    missing = spider_dev.vote_fields_missing()
    if missing:
        pytest.skip(f"PredictConfig has no {', '.join(missing)} yet (issue #16 section 1, predict integration): "
                    "the vote arms cannot run")
    out = tmp_path / "bench"
    assert spider_dev.main(["--spider", str(demo_dir), "--model", str(tiny_model), "--dev_sample", "6",
                            "--train_examples", "8", "--train_minutes", "1", "--max_new_tokens", "6",
                            "--num_samples", "2", "--vote_batch_size", "6", "--base_vote", "--schema_style", "ddl+rows",
                            "--sample_rows", "1",
                            "--lora_target", "q_proj,v_proj", "--no-bf16", "--predict_dtype", "auto",
                            "--base_after", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["base", "base_vote2", "finetuned", "finetuned_vote2"]
    assert list(results["results"]) == results["arms"]  # --base_after: the tuned arms ran first, listed as usual
    predicts = [k for k in results["stages"] if k.startswith("predict_")]
    assert predicts == ["predict_finetuned", "predict_finetuned_vote2", "predict_base", "predict_base_vote2"]
    assert results["dev_questions"] == 6 and results["train_examples"] == 8
    assert results["schema_style"] == "ddl+rows" and results["lora_target"] == "q_proj,v_proj"
    assert results["sample_rows"] == 1 and results["max_prompt_tokens"] == 680  # the recipe's, in the tiny tokenizer
    assert "/* 1 example rows from" in (out / "data" / "spider_devsample.jsonl").read_text()
    assert isinstance(results["train_dropped_failing_gold"], int)  # the recipe drops failing gold
    registry = json.loads((out / "data" / "dataset_info.json").read_text())
    assert registry["spider_devsample"]["schema_style"] == "ddl+rows"
    for arm in results["arms"]:
        r = results["results"][arm]
        assert r["table"]["all"]["count"] == 6
        assert r["wall_s"] > 0 and r["examples_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert results["stages"][f"predict_{arm}"]["wall_s"] == r["wall_s"]
        assert ("vote" in r) == arm.endswith("vote2")
    raw = [json.loads(line) for line in (out / "finetuned_vote2.sql.raw.jsonl").read_text().splitlines()]
    assert len(raw) == 6 and all(len(x["vote"]["candidates"]) == 3 for x in raw)  # greedy + 2 samples
    assert 0 <= results["results"]["finetuned_vote2"]["vote"]["all_failed"] <= 6
    section = (out / "section.md").read_text()
    assert "| all | 6 |" in section and "tuned vote@2 EX" in section and "base vote@2 EX" in section
    assert (out / "ex_by_hardness.png").read_bytes().startswith(PNG)
    assert len((out / "dev_questions.txt").read_text().split()) == 6
    # benchmarks/vote_rules.py re-votes the stored candidates: the count rule gives the stored answers again
    assert vote_rules.main(["--run", str(out), "--arm", "finetuned_vote2"]) == 0
    rules = json.loads((out / "vote_rules" / "results.json").read_text())
    assert set(rules["rules"]) == {"count", "prefer_rows"} and rules["rules"]["count"]["changed_answers"] == 0
    assert rules["rules"]["count"]["ex"] == results["results"]["finetuned_vote2"]["table"]["all"]["ex"]
    assert rules["stored_rule"] == "count"
    with pytest.raises(SystemExit, match="base.sql.raw.jsonl is no execution vote"):
        vote_rules.main(["--run", str(out), "--arm", "base"])
    _stored_under_prefer_rows(out, "finetuned_vote2")
    assert vote_rules.main(["--run", str(out), "--arm", "finetuned_vote2"]) == 0
    rules = json.loads((out / "vote_rules" / "results.json").read_text())
    assert rules["stored_rule"] == "prefer_rows" and rules["rules"]["prefer_rows"]["changed_answers"] == 0


def _stored_under_prefer_rows(run: Path, arm: str) -> None:
    """Make the run's vote arm look as if spider_dev.py --prefer_rows had voted it: records, answers, evaluation.

    Pins vote_rules reading the stored rule from the records: it used to take every stored vote for a `count` vote,
    so a --prefer_rows run's figures came out against the wrong rule (its own showing no change at all, the count
    rule flagged as not reproducing)."""
    raw = run / f"{arm}.sql.raw.jsonl"
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    answers = (run / "vote_rules" / f"{arm}_prefer_rows.sql").read_text().splitlines()
    for rec, sql in zip(records, answers):
        rec["sql"], rec["vote"]["prefer_rows"] = sql, True
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / f"{arm}.sql").write_text("".join(a + "\n" for a in answers))
    (run / f"eval_{arm}" / "per_example.jsonl").write_text(
        (run / "vote_rules" / "eval_prefer_rows" / "per_example.jsonl").read_text())


def _summary(arms: list[tuple[str, str, bool]]) -> dict:
    results = {}
    for k, (label, name, voted) in enumerate(arms):
        tab = {lv: {"count": c, "ex": 0.1 * (k + 1), "em": 0.05 * (k + 1)}
               for lv, c in zip(spider_dev.LEVELS, (4, 3, 2, 1, 10))}
        results[label] = {"name": name, "table": tab, "plug_value_ex": 0.2, "new_tokens": 100, "prompts_cut": 0,
                          "wall_s": 10.0, "peak_rss_mb": 400, "examples_per_s": 1.0, "generation_tokens_per_s": 10.0}
        if voted:
            results[label]["vote"] = {"all_failed": 1, "differs_from_greedy": 2}
    return {"model": "m", "schema_style": "mschema", "train_dropped_failing_gold": 5, "dev_questions": 10,
            "lora_target": "all", "bf16": True, "temperature": 0.7, "top_p": 1.0, "arms": [a[0] for a in arms],
            "train": {"records": 8, "steps": 2, "train_runtime_s": 60, "tokens_per_s": 9.0},
            "stages": {"prepare": {"wall_s": 1.0, "peak_rss_mb": 20}}, "results": results,
            "total_wall_min": 1.0, "command": "python benchmarks/spider_dev.py --x"}


def test_max_prompt_tokens_reaches_prepare_with_the_models_tokenizer(tiny_model, tmp_path, monkeypatch):
    """Pins --max_prompt_tokens: prepare gets the cap and the model's own folder to count tokens with (rows yield
    first there, tested in test_prepare.py)."""
    seen = []

    def stage(label, args, log, env):
        seen.append(args)
        raise SystemExit("stop after prepare")

    monkeypatch.setattr(spider_dev, "run_stage", stage)
    with pytest.raises(SystemExit, match="stop after prepare"):
        spider_dev.main(["--model", str(tiny_model), "--max_prompt_tokens", "680", "--out", str(tmp_path / "o")])
    args = seen[0]
    assert args[0] == "prepare" and args[args.index("--max_prompt_tokens") + 1] == "680"
    assert Path(args[args.index("--tokenizer") + 1]) == Path(tiny_model)


def test_table_and_chart_from_results(tmp_path):
    s = _summary([("base", "base greedy", False), ("finetuned", "tuned greedy", False),
                  ("finetuned_vote8", "tuned vote@8", True)])
    text = spider_dev.render(s)
    assert ("| level | count | base greedy EX | base greedy EM | tuned greedy EX | tuned greedy EM | tuned vote@8 EX "
            "| tuned vote@8 EM |") in text
    assert "| all | 10 | 0.100 | 0.050 | 0.200 | 0.100 | 0.300 | 0.150 |" in text
    assert "| tuned vote@8 | 10.0 | 1.0 | 400 | 100 | 10.0 | 0 | 0.200 |" in text
    assert "tuned vote@8 (temperature 0.7, top_p 1.0, greedy included): 2 answers differ" in text
    assert "5 train records with failing or empty gold left out" in text and "LoRA (all, bf16)" in text
    spider_dev.plot(s, tmp_path / "ex.png")
    assert (tmp_path / "ex.png").read_bytes().startswith(PNG)


def test_a_run_stopped_by_its_time_budget_says_how_many_records_it_saw():
    """Pins the training line of the section: a run the time budget stopped at 207 steps x batch 4 saw 828 of its
    1000 sampled records, and says so (it used to say "on 1000 train records")."""
    s = _summary([("base", "base greedy", False)])
    s.update(train_batch_size=4, train_minutes=45.0)
    s["train"].update(records=1000, steps=207)
    assert "on 828 of 1000 sampled train records (stopped by the 45-minute budget), 207 steps" in spider_dev.render(s)
    s["train"].update(steps=250)
    assert "on 1000 train records, 250 steps" in spider_dev.render(s)


def test_vote_figures_read_the_raw_records():
    raw = [{"sql": "a", "vote": {"fallback": None, "candidates": [{"source": "greedy", "sql": "a"}]}},
           {"sql": "b", "vote": {"fallback": None, "candidates": [{"source": "greedy", "sql": "a"},
                                                                  {"source": "sample", "sql": "b"}]}},
           {"sql": "a", "vote": {"fallback": "greedy", "candidates": [{"source": "greedy", "sql": "a"}]}}]
    assert spider_dev.vote_figures(raw) == {"all_failed": 1, "differs_from_greedy": 1}


def test_bad_options_stop_before_any_stage(tmp_path, monkeypatch):
    """One line, nothing written: --num_samples 1 (a vote of one), and vote arms while predict cannot vote yet."""
    with pytest.raises(SystemExit, match="--num_samples must be 0"):
        spider_dev.main(["--num_samples", "1", "--out", str(tmp_path / "a")])
    monkeypatch.setattr(spider_dev, "vote_fields_missing", lambda: ["num_samples", "vote"])
    with pytest.raises(SystemExit, match="predict has no --num_samples, --vote yet .* --num_samples 0"):
        spider_dev.main(["--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_defaults_follow_the_recipe():
    """With no options the benchmark measures the recipe: its prompt (schema style, drop_failing_gold, cap, template,
    model) and its training and prediction settings. Pins: the defaults had drifted from the recipe (720 records and
    fp32 training here while the recipe trained 1100 records in bf16), so a plain run measured something else."""
    recipe = spider_dev.recipe()
    prep, train, pred = recipe["prepare"], recipe["train"], recipe["predict"]
    a = spider_dev.build_parser().parse_args([])
    assert (a.model, a.template, a.max_source_length) == (recipe["model_name_or_path"], recipe["template"],
                                                         recipe["max_source_length"])
    assert (a.schema_style, a.drop_failing_gold) == (prep["schema_style"], prep["drop_failing_gold"])
    assert (a.train_examples, a.train_minutes, a.bf16) == (train["max_samples"], train["max_train_minutes"],
                                                           train["bf16"])
    assert (a.lora_rank, a.lora_target, a.learning_rate, a.train_batch_size) == (
        train["lora_rank"], train["lora_target"], train["learning_rate"], train["per_device_train_batch_size"])
    assert (a.predict_dtype, a.batch_size, a.max_new_tokens) == (pred["dtype"], pred["batch_size"],
                                                                 pred["max_new_tokens"])
    assert a.prefer_rows == bool(pred.get("prefer_rows"))
    assert not spider_dev.build_parser().parse_args(["--no-bf16"]).bf16


def test_train_settings_without_options_follow_the_recipe():
    """Pins: the train stage wrote lora_alpha = 2 x rank, answer length 128, warmup 0.03 and one epoch itself, which
    equalled the recipe only by chance and would have drifted like the defaults did. Alpha keeps the recipe's ratio
    to the rank, so --lora_rank 8 gives alpha 16 with the recipe's 16/32."""
    train = spider_dev.recipe()["train"]
    args = spider_dev.recipe_train_settings(train["lora_rank"])
    settings = dict(zip(args[::2], args[1::2]))
    assert float(settings["--lora_alpha"]) == train["lora_alpha"]
    assert int(settings["--max_target_length"]) == train["max_target_length"]
    assert float(settings["--warmup_ratio"]) == train["warmup_ratio"]
    assert float(settings["--num_train_epochs"]) == train["num_train_epochs"]
    assert settings["--lr_scheduler_type"] == train.get("lr_scheduler_type", "cosine")
    half = dict(zip(*[iter(spider_dev.recipe_train_settings(train["lora_rank"] // 2))] * 2))
    assert float(half["--lora_alpha"]) == train["lora_alpha"] / 2
    assert spider_dev.build_parser().parse_args([]).schedule_to_budget == bool(train.get("schedule_to_budget", False))


def test_sample_split_keeps_lines_with_unicode_line_separators(tmp_path):
    """Pins: sample_split read records and gold with str.splitlines(), which also ends a line at U+2028 or NEL; a
    question or literal holding one shifted every later record (the evaluator splits on "\\n" alone)."""
    from sqltune.data.registry import register

    rows = [{"db_id": "d", "input": f"question {i}" + ("\u2028two lines\x85" if i == 0 else "")} for i in range(3)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
    gold = ["SELECT 'a\u2028b'\td", "SELECT 1\td", "SELECT 2\td"]
    (tmp_path / "gold.sql").write_text("".join(g + "\n" for g in gold), encoding="utf-8")
    register(tmp_path, "spider_dev", {"file_name": tmp_path / "dev.jsonl", "gold": tmp_path / "gold.sql",
                                      "records": 3})
    spider_dev.sample_split(tmp_path, "spider_dev", "spider_devsample", [0, 2], with_gold=True)
    sampled = [json.loads(line) for line in (tmp_path / "spider_devsample.jsonl").read_text("utf-8").split("\n")[:-1]]
    assert sampled == [rows[0], rows[2]]
    assert (tmp_path / "spider_devsample_gold.sql").read_text("utf-8") == gold[0] + "\n" + gold[2] + "\n"


def test_backend_vllm_runs_predict_in_the_vllm_python(tiny_model, demo_dir, tmp_path, monkeypatch):
    """Pins --backend vllm (issue 27's benchmark goal): every predict stage is `sqltune predict --backend vllm` run by
    --vllm_python (vLLM lives in its own environment), every other stage by this Python; a missing vLLM Python is one
    line before anything runs."""
    import sys

    seen = []

    def stage(label, args, log, env, python=sys.executable):
        seen.append((label, args, python))
        if label.startswith("predict"):
            raise SystemExit("stop at the first predict")
        return spider_dev.__dict__["_real_run_stage"](label, args, log, env) if label == "prepare" else {}

    monkeypatch.setitem(spider_dev.__dict__, "_real_run_stage", spider_dev.run_stage)
    monkeypatch.setattr(spider_dev, "run_stage", stage)
    fake = tmp_path / "vpython"
    fake.write_text("")
    with pytest.raises(SystemExit, match="stop at the first predict"):
        spider_dev.main(["--spider", str(demo_dir), "--model", str(tiny_model), "--dev_sample", "4",
                         "--train_examples", "4", "--max_prompt_tokens", "0", "--backend", "vllm", "--enforce_eager",
                         "--vllm_python", str(fake), "--out", str(tmp_path / "o")])
    (prep_label, _, prep_python), (label, args, python) = seen[0], seen[-1]
    assert prep_label == "prepare" and prep_python == sys.executable
    assert label == "predict_base" and python == str(fake)
    assert args[args.index("--backend") + 1] == "vllm" and "--enforce_eager" in args
    with pytest.raises(SystemExit, match="make install-vllm"):
        spider_dev.main(["--backend", "vllm", "--vllm_python", str(tmp_path / "absent"), "--out", str(tmp_path / "p")])
