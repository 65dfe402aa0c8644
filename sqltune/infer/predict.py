"""The predict stage: one SQL per prepared record, in record order, batched, resumable and never stale.

Order of work: every input is checked first (records, model folder, tokenizer, template, adapter, the training
record, the backend); then `<out>.lock` is taken (fcntl: a second predict on the same --out stops with one line
naming the holder; the file goes when the run ends); only then is anything written, and nothing at all before the
first batch has been generated.

Files: a run appends one JSON line per record to `<out>.partial.raw.jsonl` (one write per batch; a torn last line is
dropped on resume), beside `<out>.partial.meta.json`, which says what the lines were made from. When every record
has its line, the `.sql` file is written from them and the three files take their final names `<out>`,
`<out>.raw.jsonl`, `<out>.meta.json`; the meta names its .sql by digest, and a file at `<out>` is replaced only when
a meta names it. No file is written through a symbolic link. So a finished output is only ever replaced by another
finished one (with --overwrite as well), a failed or interrupted run leaves only partial files, and the next run
with the same settings continues them (counting records, not lines).

Identity: the meta holds a digest of the model's and the adapter's files (small files by content, weights over
64 MiB by size and modification time), a digest of the records answered, the resolved template, prompt length and
history mode, and the generation settings; never a path string. A finished output or a partial run whose meta
differs is another run's: an error naming what differs, unless --overwrite.

Prompt format: template and max_source_length default to the ones in the training record (`sqltune_train.yaml` of
the adapter, or of the model folder for a full fine-tune or a merged model (merge copies the adapter's), or of the
adapter an older merged model names in `sqltune_merge.json`), else auto and 1024. A max_source_length other than the trained one is refused unless
--template is given too (the user then sets the prompt format knowingly).

Multi-turn records (with an `interaction` field): the .sql file has a blank line after each interaction, as the
gold file does. `--history predicted` answers turn by turn: the t-th turns of up to batch_size interactions are
generated together, each with the model's own earlier SQL of its interaction as history.

Backends: `hf` (transformers, batches of batch_size) and `vllm` (all remaining prompts in one `generate` call, which
vLLM batches continuously; lines are written when it returns).

Beyond greedy (sqltune.infer.vote): `--vote execution --num_samples N` samples N candidates per question (plus the
greedy one), runs them on the question's database and writes one of the largest group of equal results;
`--retry_on_error K` samples K answers only when the greedy SQL fails to run. The raw line keeps every candidate and
the vote; the chosen SQL is also the history of later turns with `--history predicted`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from sqltune.config import PredictConfig, to_dict
from sqltune.data.registry import lookup
from sqltune.digest import files_digest, model_digest, records_digest
from sqltune.errors import SqltuneError
from sqltune.infer.extract import extract_sql
from sqltune.infer.vote import EXEC_TIMEOUT
from sqltune.io import (append_once, atomic_write, interaction_text, read_json, read_jsonl, refuse_link, truncate,
                        write_json)
from sqltune.lock import held

TRAIN_RECORD = "sqltune_train.yaml"  # written by sqltune.train.sft next to the adapter or full model
MERGE_RECORD = "sqltune_merge.json"  # written by sqltune.infer.merge: which adapter a merged model holds
DEFAULT_LENGTH = 1024
NOT_IDENTITY = {"model_name_or_path", "adapter", "dataset", "dataset_dir", "out", "batch_size", "overwrite",
                "attn_implementation", "tensor_parallel_size", "gpu_memory_utilization"}
# written for an empty answer: the official Spider evaluator drops blank lines (every later answer then meets the gold
# of the question before it), and in a SParC/CoSQL file a blank line ends the interaction
NO_SQL = "SELECT"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig accepts only these max_lora_rank values


def side_files(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".raw.jsonl"), out.with_name(out.name + ".meta.json")


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


# ------------------------------------------------------------------------------------------- identity
def training_record(model: Path, adapter: Path | None) -> tuple[dict, Path | None]:
    """The settings the model was trained with: the adapter's record, else the model folder's (full fine-tune),
    else that of the adapter a merged model names.

    The record may come with a model folder from elsewhere: it is read with the bounded YAML loader (an alias bomb,
    a value YAML cannot build, text over 1 MiB, not UTF-8 or not a mapping is one line naming the file)."""
    from sqltune.config import parse_yaml

    if adapter is not None:
        folders = [adapter]
    else:
        folders = [model]
        merged = read_json(model / MERGE_RECORD) if (model / MERGE_RECORD).is_file() else {}
        if isinstance(merged, dict) and merged.get("adapter"):
            folders.append(Path(merged["adapter"]))
    for folder in folders:
        path = folder / TRAIN_RECORD
        if path.is_file():
            try:
                with open(path, "rb") as handle:
                    raw = handle.read((1 << 20) + 1)  # sft writes a few hundred bytes
                if len(raw) > 1 << 20:
                    raise SqltuneError(f"training record {path} is over 1 MiB: is it really sqltune's record?")
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SqltuneError(f"training record {path} is not UTF-8 text (byte {exc.start}): is it really "
                                   "sqltune's record?") from None
            except OSError as exc:
                raise SqltuneError(f"cannot read the training record {path}: {exc.strerror or exc}") from None
            data = parse_yaml(text, f"training record {path}")
            if data is None:
                return {}, path
            if not isinstance(data, dict):
                raise SqltuneError(f"training record {path} must hold a mapping of settings, not "
                                   f"{type(data).__name__}")
            return data, path
    return {}, None


def prompt_settings(cfg: PredictConfig, trained: dict, where: Path | None) -> tuple[str, int]:
    """(template, max_source_length): as given, else as in training, else auto and 1024."""
    t_template = trained.get("template") or trained.get("template_resolved")
    t_length = trained.get("max_source_length")
    if cfg.max_source_length and t_length and cfg.max_source_length != t_length and not cfg.template:
        raise SqltuneError(f"the model was trained with max_source_length {t_length} ({where}); "
                           f"--max_source_length {cfg.max_source_length} would cut prompts differently: leave it out, "
                           "or give --template as well to set the prompt format yourself")
    if cfg.template and t_template and cfg.template != t_template:
        print(f"predict: note: the model was trained with template {t_template} ({where}); using --template "
              f"{cfg.template} as given", file=sys.stderr)
    return cfg.template or t_template or "auto", cfg.max_source_length or t_length or DEFAULT_LENGTH


def history_mode(cfg: PredictConfig, records: list[dict], entry: dict) -> str:
    """`none` (single-turn), `gold`/`questions` (multi-turn prompts as prepared) or `predicted`."""
    multi = any("interaction" in r for r in records)
    if cfg.history == "predicted":
        for i, r in enumerate(records):
            if not isinstance(r.get("question"), str) or "interaction" not in r or "turn" not in r:
                raise SqltuneError(f"--history predicted needs multi-turn records with `question`, `interaction` and "
                                   f"`turn` fields; record {i} of {entry['file_name']} lacks them (prepare it with "
                                   "--source sparc or cosql)")
        return "predicted"
    if not multi:
        return "none"
    return entry.get("history") or ("gold" if any(r.get("history") for r in records) else "questions")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, folders: list[Path], files: list[Path]) -> None:
    """--out must not be a folder, lie inside an input folder, or be (or share a file name with) an input."""
    if out.is_dir():
        raise SqltuneError(f"--out {out} is a folder; give a file name such as {out / 'pred.sql'}")
    target = out.resolve()
    for folder in folders:
        if _inside(target, folder.resolve()):
            raise SqltuneError(f"--out {out} lies inside the input folder {folder}: write predictions elsewhere")
    written = {target, *(p.resolve() for p in (*side_files(out), partial_of(out), *side_files(partial_of(out))))}
    for path in files:
        if path.resolve() in written:
            raise SqltuneError(f"--out {out} would overwrite the input {path}: choose another file name")


@contextmanager
def output_lock(out: Path):
    """Hold `<out>.lock` for the whole run; a second predict on the same --out gets one line naming the holder. The
    lock file is removed when the run ends (sqltune.lock)."""
    with held(out.with_name(out.name + ".lock"), f"another predict is writing {out}",
              "wait for it to finish or choose another --out"):
        yield


# ------------------------------------------------------------------------------------------- files
def _meta_of(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _identity(meta: dict | None) -> dict | None:
    """The settings that decide the output. An option added since a meta was written is absent from it and read
    as its default (a new option's default keeps the old behaviour), so adding one does not end every resume."""
    if meta is None:
        return None
    defaults = {k: v for k, v in to_dict(PredictConfig()).items() if k not in NOT_IDENTITY}
    return {**defaults, **{k: v for k, v in meta.items() if k != "about"}}


def _differences(old: dict | None, new: dict) -> str:
    if old is None:
        return "it has no readable meta file"
    names = {"model_sha256": "model", "adapter_sha256": "adapter", "records_sha256": "records",
             "databases_sha256": "databases"}
    keys = [names.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "different " + ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def _valid_rows(raw: Path, records: list[dict], predicted: bool) -> int:
    """Records of `raw` that are whole and in order; the rest is cut off the file. With predicted history the cut
    goes back to the start of an interaction (its turns were generated and written together)."""
    if not raw.is_file():
        return 0
    data = raw.read_bytes()
    pos = n = 0
    while n < len(records):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            row = json.loads(data[pos:end])
        except ValueError:
            break
        if not isinstance(row, dict) or row.get("index") != n:
            break
        pos, n = end + 1, n + 1
    if predicted:
        while 0 < n < len(records) and records[n].get("interaction") == records[n - 1].get("interaction"):
            n -= 1
            pos = data.rfind(b"\n", 0, pos - 1) + 1
    if pos != len(data):
        truncate(raw, pos)
    return n


def _names(meta: dict | None, out: Path) -> bool:
    """Whether a meta names this very output: it holds the digest of the .sql file now at `out` (a stray or copied
    meta, `{}` say, never vouches for a file predict did not write)."""
    about = meta.get("about") if isinstance(meta, dict) else None
    want = about.get("sql_sha256") if isinstance(about, dict) else None
    return isinstance(want, str) and out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == want


def resume_point(out: Path, meta: dict, records: list[dict], overwrite: bool, predicted: bool) -> int | None:
    """Records this run has already answered in its partial files; None when `out` is finished with these settings.
    A finished output or partial run of other settings is an error unless `overwrite`; a file at `out` that no meta
    names is never replaced, and a link among the files is refused (never followed)."""
    meta_path = side_files(out)[1]
    part_raw, part_meta = side_files(partial_of(out))
    for path in (out, *side_files(out), part_raw, part_meta):
        refuse_link(path, "--out's file")
    old_meta, old_part = _meta_of(meta_path), _meta_of(part_meta)
    if out.exists() and not _names(old_meta, out) and not _names(old_part, out):
        raise SqltuneError(f"{out} exists and is not a prediction file of sqltune (no {meta_path.name} naming it "
                           "beside it): predict does not replace it, even with --overwrite; choose another --out, or "
                           "remove it yourself if it is not needed")
    if overwrite:
        return 0
    if _names(old_meta, out) and _identity(old_meta) == _identity(meta):
        return None
    if _identity(old_part) == _identity(meta):
        return _valid_rows(part_raw, records, predicted)
    if out.exists():
        why = _differences(_identity(old_meta), _identity(meta))
        raise SqltuneError(f"{out} holds predictions of another run ({why}); pass --overwrite to replace them (they "
                           "stay until the new run is complete)")
    if part_raw.exists() or part_meta.exists():
        why = _differences(_identity(old_part), _identity(meta))
        raise SqltuneError(f"{part_raw} holds an unfinished run with other settings ({why}); pass --overwrite to "
                           "start again")
    return 0


def _one_line(sql: str) -> str:
    return sql.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def sql_text(rows: list[dict]) -> str:
    """The .sql file: one line per record (NO_SQL for an empty answer); for multi-turn records a blank line after
    each interaction, as the gold file has (interaction_text)."""
    return interaction_text([(row.get("interaction"), _answer_line(row["sql"])) for row in rows])


def _answer_line(sql: str) -> str:
    line = _one_line(sql)
    return line if line.strip() else NO_SQL


def publish(out: Path) -> None:
    """Give a complete partial run its final names. The meta names the .sql it describes (its digest) and is
    written before it, so a crash at any point leaves a .sql that a meta names, or the old files."""
    raw, meta_path = side_files(out)
    part_raw, part_meta = side_files(partial_of(out))
    text = sql_text(list(read_jsonl(part_raw)))
    meta = read_json(part_meta)
    write_json(part_meta, {**meta, "about": {**meta.get("about", {}),
                                             "sql_sha256": hashlib.sha256(text.encode()).hexdigest()}})
    with atomic_write(out) as handle:
        handle.write(text)
    os.replace(part_raw, raw)
    os.replace(part_meta, meta_path)


# ------------------------------------------------------------------------------------------- generators
def _torch_dtype(cfg: PredictConfig, gpu: bool):
    import torch

    return {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[cfg.dtype]


def only_token_ids(model) -> None:
    """Keep only the token ids of the model's generation_config. generate() fills every option it is not given from
    there, so a checkpoint's repetition_penalty (Qwen2.5 instruct models ship 1.05-1.1), top_k or
    no_repeat_ngram_size would silently change "greedy" answers and the samples and log-probabilities of a vote,
    and the vLLM backend, which decodes as the options say, would give other figures for the same model."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(**{k: getattr(saved, k, None) for k in
                                                  ("bos_token_id", "eos_token_id", "pad_token_id")})


class HFGenerator:
    """Batched generation with transformers: left padding, greedy unless temperature > 0."""

    def __init__(self, cfg: PredictConfig, tokenizer=None, template=None):
        import torch

        from sqltune.infer.merge import attach_adapter, check_adapter
        from sqltune.loading import load_model, load_tokenizer, resolve
        from sqltune.templates import get_template, stop_token_ids

        path = resolve(cfg.model_name_or_path)
        self.tokenizer = tokenizer or load_tokenizer(path)
        self.template = template or get_template(cfg.template or "auto", self.tokenizer)
        gpu = torch.cuda.is_available()
        model = load_model(path, None, dtype=_torch_dtype(cfg, gpu), device_map="auto" if gpu else None,
                           attn_implementation=cfg.attn_implementation)
        if cfg.adapter:
            model = attach_adapter(model, check_adapter(cfg.adapter))
        self.model = model.eval()
        self.cfg = cfg
        self.stop = stop_token_ids(self.tokenizer, self.template, self.model.generation_config)
        only_token_ids(self.model)
        torch.manual_seed(cfg.seed)

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        import torch

        pad = self.tokenizer.pad_token_id
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        device = next(self.model.parameters()).device
        sample = self.cfg.temperature > 0
        kwargs = dict(max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams, do_sample=sample,
                      eos_token_id=self.stop or None, pad_token_id=pad)
        kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p) if sample else \
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        results = []
        for row in out[:, longest:]:
            keep = row.tolist()
            n = len(keep)
            for j, tok in enumerate(keep):
                if tok in self.stop or tok == pad:
                    n = j
                    break
            results.append((self.tokenizer.decode(keep[:n], skip_special_tokens=True), n))
        return results

    def candidates(self, prompts: list[list[int]], n: int, include_greedy: bool, end: str | None) -> list[list[dict]]:
        """Per prompt: the greedy candidate (when asked) then n samples, with their log-probabilities."""
        from sqltune.infer.vote import generate_candidates

        return generate_candidates(self.model, self.tokenizer, prompts, self.stop, n, self.cfg.temperature,
                                   self.cfg.top_p, include_greedy, self.cfg.max_new_tokens, end=end)


def check_vllm() -> None:
    """vLLM importable and a CUDA GPU present (checked before any output is touched)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SqltuneError("--backend vllm needs vLLM (GPU only): pip install 'sqltune[gpu]'") from None
    import torch

    if not torch.cuda.is_available():
        raise SqltuneError("--backend vllm needs a CUDA GPU; use --backend hf on this machine")


def vllm_engine_args(cfg: PredictConfig, model: Path, adapter: Path | None) -> dict:
    """Keyword arguments of `vllm.LLM`: parallelism, memory and length limits, dtype, and LoRA sized from the
    adapter (vLLM's default max_lora_rank 16 rejects an r=64 adapter)."""
    args = dict(model=str(model), seed=cfg.seed, dtype="float32" if cfg.dtype == "float32" else "bfloat16",
                tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len or cfg.max_source_length + cfg.max_new_tokens)
    if adapter is not None:
        rank = read_json(adapter / "adapter_config.json").get("r")
        if not isinstance(rank, int) or rank <= 0:
            raise SqltuneError(f"{adapter}/adapter_config.json has no LoRA rank `r`")
        fits = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise SqltuneError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; {adapter} has r={rank}")
        args.update(enable_lora=True, max_loras=1, max_lora_rank=fits[0])
    return args


class VLLMGenerator:
    """vLLM on a GPU, for throughput; same prompts (token ids) and stop tokens as the HF path. predict hands it all
    remaining prompts at once, so vLLM schedules them continuously."""

    def __init__(self, cfg: PredictConfig, tokenizer, template, model: Path, adapter: Path | None):
        from vllm import LLM, SamplingParams

        from sqltune.templates import stop_token_ids

        self.tokenizer, self.template = tokenizer, template
        self.llm = LLM(**vllm_engine_args(cfg, model, adapter))
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.cfg, self.sampling = cfg, SamplingParams
        self.stop = stop_token_ids(tokenizer, template, _generation_config(model))
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed, stop_token_ids=self.stop)

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params, lora_request=self.lora,
                                 use_tqdm=True)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]

    def candidates(self, prompts: list[list[int]], n: int, include_greedy: bool, end: str | None) -> list[list[dict]]:
        """Greedy and sampled candidates of every prompt in one `generate` call (a SamplingParams per request);
        logprobs=0 makes vLLM fill cumulative_logprob (of the model's distribution, before temperature)."""
        from sqltune.infer.vote import make_candidate, sampling_temperature

        common = dict(max_tokens=self.cfg.max_new_tokens, stop_token_ids=self.stop, seed=self.cfg.seed, logprobs=0)
        kinds = ([("greedy", self.sampling(temperature=0.0, **common))] if include_greedy else []) + \
            ([("sample", self.sampling(n=n, temperature=sampling_temperature(self.cfg.temperature),
                                       top_p=self.cfg.top_p, **common))] if n else [])
        requests = [({"prompt_token_ids": p}, params) for _, params in kinds for p in prompts]
        outs = self.llm.generate([r for r, _ in requests], [params for _, params in requests],
                                 lora_request=self.lora, use_tqdm=True)
        rows: list[list[dict]] = [[] for _ in prompts]
        for k, (source, _) in enumerate(kinds):
            for row, out in zip(rows, outs[k * len(prompts):(k + 1) * len(prompts)]):
                row += [make_candidate(o.text, o.cumulative_logprob, source, len(o.token_ids), end)
                        for o in out.outputs]
        return rows


def _generation_config(model: Path):
    path = model / "generation_config.json"
    return read_json(path) if path.is_file() else None


# ------------------------------------------------------------------------------------------- the stage
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
    from sqltune.infer.merge import check_adapter
    from sqltune.loading import load_tokenizer, resolve
    from sqltune.templates import encode_prompt, get_template

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
        check_vllm()
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


def output_totals(rows: list[dict], voted: bool) -> dict:
    """Figures of the whole output, earlier sessions of a resumed run included: prompts cut, new tokens and, with a
    vote, the questions where no candidate ran (the greedy answer was written)."""
    totals = {"prompts_cut": sum(bool(r.get("prompt_cut")) for r in rows),
              "new_tokens": sum(r.get("new_tokens") or 0 for r in rows)}
    if voted:
        totals["no_candidate_ran"] = sum(bool((r.get("vote") or {}).get("fallback")) for r in rows)
    return totals


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
    bar = tqdm(total=len(records), initial=done, desc="predict", unit="ex", dynamic_ncols=True)
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
