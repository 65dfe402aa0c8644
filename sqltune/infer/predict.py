"""The predict stage: one SQL per prepared record, in record order, batched, resumable and never stale.

Order of work: every input is checked first (records, model folder, tokenizer, template, adapter, the training
record (sqltune.infer.prompt_format), the backend); then `<out>.lock` is taken (fcntl: a second predict on the same
--out stops with one line naming the holder; the file goes when the run ends); only then is anything written, and
nothing at all before the first batch has been generated. The files, their identity and resuming:
sqltune.infer.outputs.

Multi-turn records (with an `interaction` field): the .sql file has a blank line after each interaction, as the
gold file does. `--history predicted` answers turn by turn: the t-th turns of up to batch_size interactions are
generated together, each with the model's own earlier SQL of its interaction as history.

Backends: `hf` (sqltune.infer.hf_backend: transformers, batches of batch_size) and `vllm`
(sqltune.infer.vllm_backend: all remaining prompts in one `generate` call, which vLLM batches continuously; lines
are written when it returns).

Beyond greedy (sqltune.infer.vote): `--vote execution --num_samples N` samples N candidates per question (plus the
greedy one), runs them on the question's database and writes one of the largest group of equal results;
`--retry_on_error K` samples K answers only when the greedy SQL fails to run. The raw line keeps every candidate and
the vote; the chosen SQL is also the history of later turns with `--history predicted`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path


from sqltune.config import PredictConfig, to_dict
from sqltune.data.registry import lookup
from sqltune.digest import files_digest, model_digest, records_digest
from sqltune.errors import SqltuneError
from sqltune.infer.extract import extract_sql
from sqltune.infer.hf_backend import HFGenerator
from sqltune.infer.outputs import (NOT_IDENTITY, check_out, output_lock, output_totals, partial_of, publish,
                                   resume_point, side_files)
from sqltune.infer.prompt_format import history_mode, prompt_settings, training_record
from sqltune.infer.vllm_backend import VLLMGenerator, check_vllm
from sqltune.infer.vote import EXEC_TIMEOUT
from sqltune.io import append_once, read_jsonl, write_json
from sqltune.progress import Progress, quiet_libraries


def _answers(gen, cfg: PredictConfig, prompts: list[list[int]], dbs: list[Path], executor, end: str | None,
             bird: bool = False) -> list[dict]:
    """Per prompt: the raw text, the SQL to write, the tokens generated and (when voting or retrying) the record
    of the candidates (grouped as EX scores them: BIRD's sets for a BIRD dataset)."""
    if cfg.vote == "execution":
        from sqltune.infer.vote import vote

        rows = []
        for cands, db in zip(gen.candidates(prompts, cfg.num_samples, cfg.include_greedy, end), dbs):
            sql, record = vote(cands, db, executor, prefer_rows=cfg.prefer_rows, bird=bird)
            rows.append({"raw": cands[record["chosen"]]["text"], "sql": sql, "vote": record,
                         "new_tokens": sum(c["new_tokens"] or 0 for c in cands)})
        return rows
    if cfg.retry_on_error:
        from sqltune.infer.vote import choose_retry

        greedy = [c[0] for c in gen.candidates(prompts, 0, True, end)]
        first = [choose_retry(g, [], db, executor, bird=bird) for g, db in zip(greedy, dbs)]
        failing = [i for i, (_, record) in enumerate(first) if record["fallback"]]
        drawn = gen.candidates([prompts[i] for i in failing], cfg.retry_on_error, False, end) if failing else []
        chosen = list(first)
        for i, samples in zip(failing, drawn):
            chosen[i] = choose_retry(greedy[i], samples, dbs[i], executor, bird=bird)
        return [{"raw": record["candidates"][record["chosen"]]["text"], "sql": sql, "vote": record,
                 "new_tokens": sum(c["new_tokens"] or 0 for c in record["candidates"])} for sql, record in chosen]
    return [{"raw": text, "sql": extract_sql(text, end), "new_tokens": n} for text, n in gen.generate(prompts)]


def vote_databases(cfg: PredictConfig, records: list[dict], entry: dict) -> list[Path]:
    """Each record's database, checked up front when candidates are to be run (one line naming the missing or
    unusable: a broken file would make every candidate fail and every answer fall back to greedy, silently)."""
    if cfg.vote == "none" and not cfg.retry_on_error:
        return []
    from sqltune.io import database_path

    if not entry.get("db_dir"):
        raise SqltuneError(f"--vote/--retry_on_error run candidates on the databases, but dataset {cfg.dataset!r} "
                           "names no db_dir")
    dbs = [database_path(entry["db_dir"], r.get("db_id", "")) for r in records]
    missing = sorted({str(db) for db in dbs if not db.is_file()})
    if missing:
        raise SqltuneError(f"--vote/--retry_on_error need the databases; missing: {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    from sqltune.sandbox import database_problem

    broken = {str(db): why for db in sorted(set(dbs)) if (why := database_problem(db))}
    if broken:
        first = next(iter(broken))
        raise SqltuneError(f"--vote/--retry_on_error need usable databases; {first} is {broken[first]}"
                           + (f" (and {len(broken) - 1} more are unusable)" if len(broken) > 1 else ""))
    return dbs


def _groups(records: list[dict], start: int, size: int, predicted: bool) -> list[list[int]]:
    """Record indices generated and written together: `size` records, or with predicted history `size` whole
    interactions."""
    if not predicted:
        return [list(range(i, min(i + size, len(records)))) for i in range(start, len(records), size)]
    groups: list[list[int]] = []
    count = 0
    for i in range(start, len(records)):
        new = i == start or records[i].get("interaction") != records[i - 1].get("interaction")
        if new and (not groups or count == size):
            groups.append([])
            count = 0
        count += new
        groups[-1].append(i)
    return groups


def _waves(records: list[dict], group: list[int], predicted: bool) -> list[list[int]]:
    """Generation order inside a group: all at once, or with predicted history the t-th turns of its interactions
    together, turn after turn."""
    if not predicted:
        return [group]
    interactions: list[list[int]] = []
    for i in group:
        if not interactions or records[i].get("interaction") != records[interactions[-1][-1]].get("interaction"):
            interactions.append([])
        interactions[-1].append(i)
    longest = max(len(x) for x in interactions)
    return [[x[t] for x in interactions if len(x) > t] for t in range(longest)]


def _with_predicted_history(records: list[dict], i: int, answers: dict[int, str]) -> dict:
    """Record i with the history of its interaction's earlier turns as the model answered them (CONTRACTS 3)."""
    from sqltune.data.prompts import make_input

    first = i
    while first > 0 and records[first - 1].get("interaction") == records[i].get("interaction"):
        first -= 1
    history = [[make_input(records[k]["question"]), answers[k]] for k in range(first, i)]
    return {**records[i], "history": history, "input": make_input(records[i]["question"])}


def predict(cfg: PredictConfig) -> dict:
    from sqltune.loading import check_adapter, load_tokenizer, resolve
    from sqltune.templates import encode_prompt, get_template

    if cfg.quiet:
        quiet_libraries()
    # 1. every input, before anything is written
    if not cfg.dataset:
        raise SqltuneError("--dataset is required (a registry name such as spider_dev)")
    entry = lookup(cfg.dataset_dir, cfg.dataset)
    records = list(read_jsonl(entry["file_name"]))
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    if not records:
        raise SqltuneError(f"dataset {cfg.dataset!r} has no records ({entry['file_name']})")
    model = resolve(cfg.model_name_or_path)
    adapter = check_adapter(cfg.adapter) if cfg.adapter else None
    trained, where = training_record(model, adapter)
    template_name, length = prompt_settings(cfg, trained, where)
    mode = history_mode(cfg, records, entry)
    dbs = vote_databases(cfg, records, entry)
    if cfg.backend == "vllm":
        check_vllm(cfg, model)
    else:
        from sqltune.loading import check_attention

        check_attention(cfg.attn_implementation)
    tokenizer = load_tokenizer(model)
    template = get_template(template_name, tokenizer)
    out = Path(cfg.out)
    check_out(out, [model] + ([adapter] if adapter else []),
              [Path(cfg.dataset_dir) / "dataset_info.json"] +
              [Path(entry[k]) for k in ("file_name", "gold", "tables", "difficulty") if entry.get(k)])
    cfg = dataclasses.replace(cfg, template=template_name, max_source_length=length)
    meta = {**{k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY}, "history": mode,
            "records": len(records), "records_sha256": records_digest(records), "model_sha256": model_digest(model),
            "adapter_sha256": model_digest(adapter) if adapter else None,
            **({"databases_sha256": files_digest(dbs), "exec_timeout": EXEC_TIMEOUT,  # a vote's choice depends
                "bird": entry.get("source") == "bird"} if dbs else {}),  # on their rows and how they compare
            "about": {"dataset": cfg.dataset, "file": str(Path(entry["file_name"]).resolve()),  # evaluate's questions
                      "model": str(model.resolve()),
                      "adapter": str(adapter.resolve()) if adapter else "",
                      "training_record": str(where.resolve()) if where else ""}}
    predicted = mode == "predicted"

    # 2. the output, under its lock
    with output_lock(out):
        done = resume_point(out, meta, records, cfg.overwrite, predicted)
        if done is None:
            return {"records": len(records), "resumed_from": len(records), "generated": 0, "history": mode}
        figures = {"records": len(records), "resumed_from": done, "generated": 0, "prompts_cut": 0, "history": mode}
        part_raw, part_meta = side_files(partial_of(out))
        if done < len(records):
            speed = _generate(cfg, records, dbs, done, predicted, tokenizer, template, model, adapter, part_raw,
                              part_meta, meta, encode_prompt)
            figures = {"examples_per_s": speed.pop("examples_per_s"), **figures, **speed}  # the headline speed
            figures.update(output_totals(list(read_jsonl(part_raw)), bool(dbs)))
        publish(out)
    return figures


def _generate(cfg, records, dbs, done, predicted, tokenizer, template, model, adapter, part_raw, part_meta, meta,
              encode_prompt) -> dict:
    """Answer records[done:], appending each group's rows to the partial raw file; returns the figures."""
    gen = VLLMGenerator(cfg, tokenizer, template, model, adapter) if cfg.backend == "vllm" else \
        HFGenerator(cfg, tokenizer, template)
    end = template.end_marker(tokenizer)
    size = len(records) if cfg.backend == "vllm" else cfg.batch_size
    answers: dict[int, str] = {}
    if predicted:  # earlier turns of the interaction being continued are already answered
        answers = {row["index"]: row["sql"] for row in read_jsonl(part_raw)} if done else {}
    new_tokens = generated = 0
    fresh = done == 0
    executor = None
    if dbs:
        from sqltune.infer.vote import make_executor

        executor = make_executor()
    start = time.perf_counter()
    stage = "predict+vote" if cfg.vote != "none" else "predict+retry" if cfg.retry_on_error else "predict"
    bar = Progress(len(records), stage, "ex", quiet=cfg.quiet, initial=done, summary=True)  # sampling counted here
    try:
        for group in _groups(records, done, size, predicted):
            rows = {}
            for wave in _waves(records, group, predicted):
                asked = [_with_predicted_history(records, i, answers) if predicted else records[i] for i in wave]
                encoded = [encode_prompt(tokenizer, template, r, cfg.max_source_length) for r in asked]
                results = _answers(gen, cfg, [ids for ids, _ in encoded], [dbs[i] for i in wave] if dbs else [],
                                   executor, end, meta.get("bird", False))
                for i, (ids, cut), res in zip(wave, encoded, results):
                    r = records[i]
                    answers[i] = res["sql"]
                    rows[i] = {"index": i, "db_id": r.get("db_id"),
                               **{k: r[k] for k in ("interaction", "turn") if k in r},
                               "raw": res["raw"], "sql": res["sql"], "prompt_tokens": len(ids), "prompt_cut": cut,
                               "new_tokens": res["new_tokens"], **({"vote": res["vote"]} if "vote" in res else {})}
                    new_tokens += res["new_tokens"]
            if fresh:  # the first batch is ready: only now are the files of an earlier partial run replaced
                part_raw.unlink(missing_ok=True)
                write_json(part_meta, meta)
                fresh = False
            append_once(part_raw, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in sorted(rows)),
                        sync=True)
            generated += len(group)
            bar.update(len(group))
    finally:
        bar.close()
        if executor is not None:
            executor.close()
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {"examples_per_s": round(generated / elapsed, 3), "generated": generated, "generation_s": round(elapsed, 2),
            "tokens_per_s": round(new_tokens / elapsed, 1)}  # this session's speed; predict adds the totals
