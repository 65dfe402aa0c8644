"""The stages' settings: one dataclass per stage (prepare, merge, predict, ask, serve, export, evaluate; train's in
train.py, samples' in samples.py), with the names users know from DB-GPT-Hub and LLaMA-Factory.

Each field's `help` metadata is its `--help` text; each `__post_init__` checks values and fails with a sentence
naming the flag. Nothing here imports torch, so evaluation stays fast to start.
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any


from sqltune.errors import SqltuneError


def arg(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SqltuneError(message)


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, cut short (reprlib never builds the whole of a long list or
    string) and on one line (repr escapes line breaks)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 2, 4, 4, 4
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------- prepare
SCHEMA_STYLES = ("words", "ddl", "ddl+rows", "mschema")
SOURCES = ("spider", "bird", "sparc", "cosql", "demo", "sqlite")
TEMPLATES = ("auto", "default", "chatml", "llama2", "llama3", "mistral", "gemma", "phi3", "deepseek")


@dataclass
class PrepareConfig:
    source: str = arg("spider", f"dataset layout to read: {', '.join(SOURCES)}")
    data_dir: str = arg("", "folder with the source files (for Spider: train_spider.json, dev.json, tables.json, "
                             "database/); for source demo, where the demo data is generated (default: <out>/demo_source)")
    out: str = arg("data/prepared", "folder to write <name>_train.jsonl, <name>_dev.jsonl, gold files and dataset_info.json")
    name: str = arg("", "dataset name prefix in the registry (default: the source name)")
    schema_style: str = arg("words", f"how the schema is stated in the prompt: {', '.join(SCHEMA_STYLES)}")
    sample_rows: int = arg(3, "rows per table shown with schema_style ddl+rows; example values per column with mschema")
    max_prompt_tokens: int = arg(0, "cap on the instruction length in tokens, evidence included (0 = no cap): "
                                       "example rows yield first (fewer per table), then tables are cut from the end; "
                                       "both are counted")
    tokenizer: str = arg("", "tokenizer folder or catalog model name that counts tokens for max_prompt_tokens "
                             "(default: whitespace words)")
    splits: str = arg("train,dev", "comma list of splits to prepare")
    history: str = arg("questions", "SParC/CoSQL non-train splits: `questions` puts the earlier questions in the "
                                    "input (no gold SQL in the prompt); `gold` gives earlier turns with their gold SQL "
                                    "as history (DB-GPT-Hub's way). Train always uses gold")
    drop_failing_gold: bool = arg(False, "leave out train records whose gold query fails, times out or returns no "
                                         "rows on its database (run read-only with the evaluator's bounds); counted")
    db_dir: str = arg("", "source sqlite: folder of your databases, <db_dir>/<db_id>/<db_id>.sqlite or "
                          "<db_dir>/<db_id>.sqlite")
    pairs: str = arg("", "source sqlite: question/SQL pairs, JSONL (or .json list, or .csv with a header) with "
                         "db_id, question, query")
    dev_pairs: str = arg("", "source sqlite: the dev pairs, same format (else --dev_fraction of --pairs)")
    dev_fraction: float = arg(0.0, "source sqlite: fraction of --pairs held out as the dev split, drawn with --seed")
    seed: int = arg(0, "seed of the --dev_sample and --train_sample draws and (source sqlite) of the --dev_fraction draw")
    dev_sample: int = arg(0, "also register <name>_dev<N>: a seeded sample (--seed) of N dev questions whose database "
                             "exists, with its gold, the same N for the same seed (benchmarks/spider_dev.py's "
                             "rule); 0 = none")
    train_sample: int = arg(0, "also register <name>_train<N>: a seeded sample (--seed) of N train questions (after "
                               "--drop_failing_gold), spread over the split's databases, e.g. the questions a recipe "
                               "samples candidates for (the file runs database by database); 0 = none")
    quiet: bool = arg(False, "no progress bars or progress lines")

    def __post_init__(self):
        _check(self.source in SOURCES, f"--source must be one of {', '.join(SOURCES)}, not {shown(self.source)}")
        _check(self.schema_style in SCHEMA_STYLES,
               f"--schema_style must be one of {', '.join(SCHEMA_STYLES)}, not {shown(self.schema_style)}")
        _check(self.sample_rows >= 0, "--sample_rows must be >= 0")
        _check(self.max_prompt_tokens >= 0, "--max_prompt_tokens must be >= 0")
        self.name = self.name or self.source
        _check(all(c.isascii() and (c.isalnum() or c in "_-.") for c in self.name) and not self.name.startswith("."),
               f"--name must be a plain name (letters, digits, _, -, and . not first), not {shown(self.name)}")
        _check(self.history in ("questions", "gold"),
               f"--history must be questions or gold, not {shown(self.history)}")
        _check(0 <= self.dev_fraction < 1, f"--dev_fraction must be in [0, 1), not {self.dev_fraction:g}")
        _check(not (self.dev_pairs and self.dev_fraction), "give --dev_pairs or --dev_fraction, not both")
        _check(self.dev_sample >= 0, f"--dev_sample must be >= 0 (0 = none), not {self.dev_sample}")
        _check(self.train_sample >= 0, f"--train_sample must be >= 0 (0 = none), not {self.train_sample}")


# --------------------------------------------------------------------------------------------- merge
@dataclass
class MergeConfig:
    model_name_or_path: str = arg("", "base model folder or catalog name (default: the base named in the adapter's "
                                      "adapter_config.json)")
    adapter: str = arg("", "LoRA adapter folder written by `sqltune train`")
    out: str = arg("output/merged", "folder for the merged plain model")
    overwrite_output_dir: bool = arg(False, "replace an existing out folder")

    def __post_init__(self):
        _check(bool(self.adapter), "--adapter is required")


# --------------------------------------------------------------------------------------------- predict
@dataclass
class PredictConfig:
    model_name_or_path: str = arg("", "model folder or catalog name")
    adapter: str = arg("", "optional LoRA adapter folder applied on top of the model")
    dataset: str = arg("", "registry name of the prepared records to answer, e.g. spider_dev")
    dataset_dir: str = arg("data/prepared", "folder holding dataset_info.json")
    out: str = arg("output/pred.sql", "prediction file: one SQL per line, in record order")
    template: str = arg("", f"chat template: {', '.join(TEMPLATES)} (default: the one the adapter or model was "
                            "trained with, from its sqltune_train.yaml, else auto)")
    max_source_length: int = arg(0, "prompt tokens kept, cut as in training (0 = the training value, else 1024)")
    max_new_tokens: int = arg(256, "tokens generated per answer at most")
    batch_size: int = arg(8, "prompts generated together (left padded); with --history predicted: interactions")
    temperature: float = arg(0.0, "0 = greedy")
    top_p: float = arg(1.0, "nucleus sampling threshold (with temperature > 0), in (0, 1]")
    num_beams: int = arg(1, "beam search width (hf backend only)")
    max_samples: int = arg(0, "answer only the first N records (0 = all)")
    history: str = arg("records", "multi-turn records: `records` answers the prompts as prepared; `predicted` "
                                  "answers turn by turn with the model's own earlier SQL as history")
    backend: str = arg("hf", "hf (transformers) or vllm (when installed: GPU, or CPU with `make install-vllm`)")
    dtype: str = arg("auto", "weights for generation: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16")
    attn_implementation: str = arg("sdpa", "hf backend attention: sdpa, eager or flash_attention_2 (needs flash-attn)")
    tensor_parallel_size: int = arg(1, "vllm: GPUs the model is split over")
    gpu_memory_utilization: float = arg(0.9, "vllm on a GPU: fraction of GPU memory it may use (the KV cache gets "
                                             "what the model leaves; on a CPU see --kv_cache_gb)")
    max_model_len: int = arg(0, "vllm: longest prompt + answer in tokens (0 = max_source_length + max_new_tokens)")
    enforce_eager: bool = arg(False, "vllm: no torch.compile or CUDA graphs: the engine starts in seconds instead of "
                                     "minutes (SmolLM2-135M on 2 CPU cores: 8.5 s, not 131 s); decoding can be slower")
    kv_cache_gb: float = arg(0.0, "vllm: GiB for the KV cache (0 = on a GPU what --gpu_memory_utilization leaves; on "
                                  "a CPU 4, or VLLM_CPU_KVCACHE_SPACE when set)")
    kv_block_size: int = arg(0, "vllm: tokens per KV-cache block (0 = 32 on a CPU, vLLM's own on a GPU); prefix "
                                "caching reuses whole blocks only, so small blocks share more of a schema between "
                                "questions (on a CPU a multiple of 32)")
    num_samples: int = arg(0, "with --vote execution: candidates sampled per question (at least 2)")
    vote: str = arg("none", "none, or execution: run every candidate on the question's database and write one of "
                            "the largest group of equal results (ties: the larger summed log-probability)")
    include_greedy: bool = arg(True, "with --vote execution: the greedy answer is a candidate too")
    prefer_rows: bool = arg(False, "with --vote execution: a result with rows beats any empty result, whatever "
                                   "the group sizes (an empty answer wins only when nothing that runs has rows)")
    retry_on_error: int = arg(0, "with --vote none: sample up to K answers when the greedy SQL fails to run, and "
                                 "write the most probable one that runs")
    seed: int = arg(42, "random seed for sampling")
    overwrite: bool = arg(False, "start again even if `out` holds predictions of another run (the old files are "
                                 "replaced only when the new run is complete)")
    quiet: bool = arg(False, "no progress bar or progress lines")

    def __post_init__(self):
        _check(self.backend in ("hf", "vllm"), f"--backend must be hf or vllm, not {shown(self.backend)}")
        _check(self.dtype in ("auto", "float32", "bfloat16"),
               f"--dtype must be auto, float32 or bfloat16, not {shown(self.dtype)}")
        _check(self.template == "" or self.template in TEMPLATES,
               f"--template must be one of {', '.join(TEMPLATES)}, not {shown(self.template)}")
        _check(self.max_source_length >= 0, "--max_source_length must be > 0 (or 0: the training value)")
        _check(self.batch_size > 0, "--batch_size must be > 0")
        _check(self.max_new_tokens > 0, "--max_new_tokens must be > 0")
        _check(self.num_beams > 0, "--num_beams must be > 0")
        _check(self.temperature >= 0, "--temperature must be >= 0")
        _check(0 < self.top_p <= 1, f"--top_p must be in (0, 1], not {self.top_p}")
        _check(self.max_samples >= 0, "--max_samples must be >= 0 (0 = all)")
        _check(self.history in ("records", "predicted"),
               f"--history must be records or predicted, not {shown(self.history)}")
        _check(self.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
               f"--attn_implementation must be sdpa, eager or flash_attention_2, "
               f"not {shown(self.attn_implementation)}")
        _check(self.tensor_parallel_size > 0, "--tensor_parallel_size must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "--gpu_memory_utilization must be in (0, 1]")
        _check(self.max_model_len >= 0, "--max_model_len must be >= 0 (0 = max_source_length + max_new_tokens)")
        _check(0 <= self.kv_cache_gb < math.inf, f"--kv_cache_gb must be a size in GiB >= 0 (0 = the default), "
                                                 f"not {shown(self.kv_cache_gb)}")
        _check(self.kv_block_size >= 0, f"--kv_block_size must be >= 0 (0 = the default), not "
                                        f"{shown(self.kv_block_size)}")
        _check(not (self.backend == "vllm" and self.num_beams > 1),
               "--num_beams > 1 needs --backend hf (vLLM's generate does no beam search)")
        _check(self.vote in ("none", "execution"), f"--vote must be none or execution, not {shown(self.vote)}")
        _check(self.num_samples >= 0 and self.retry_on_error >= 0, "--num_samples and --retry_on_error must be >= 0")
        _check(self.vote == "none" or self.num_samples >= 2, "--vote execution needs --num_samples 2 or more")
        _check(self.num_samples < 2 or self.vote == "execution",
               f"--num_samples {self.num_samples} needs --vote execution (candidates are only sampled to vote)")
        _check(not self.prefer_rows or self.vote == "execution", "--prefer_rows needs --vote execution")
        _check(not (self.retry_on_error and self.vote != "none"),
               "--retry_on_error is for --vote none (a vote already samples candidates)")
        _check(self.num_beams == 1 or (self.vote == "none" and not self.retry_on_error),
               "--num_beams > 1 cannot be combined with --vote or --retry_on_error (candidates are sampled)")


# --------------------------------------------------------------------------------------------- ask
@dataclass
class AskConfig:
    model_name_or_path: str = arg("", "model folder or catalog name")
    adapter: str = arg("", "optional LoRA adapter folder applied on top of the model")
    db: str = arg("", "the SQLite file to ask about: its schema goes into the prompt, the SQL runs on it read-only")
    question: str = arg("", "the question (on the command line: the positional argument); none: questions are "
                            "read from stdin, one per line, until end of input, with the model loaded once")
    format: str = arg("table", "table (the SQL, then the result as a table) or json (one object per question: "
                               "sql, columns, rows, error)")
    max_rows: int = arg(20, "result rows shown at most (json: returned); a longer result is cut, not failed")
    schema_style: str = arg("", f"how the schema is stated: {', '.join(SCHEMA_STYLES)} (default: the style of the "
                                "data the model was trained on, from its training record and dataset_info.json, "
                                "else words)")
    sample_rows: int = arg(3, "rows per table with schema_style ddl+rows; example values per column with mschema")
    template: str = arg("", f"chat template: {', '.join(TEMPLATES)} (default: the one the adapter or model was "
                            "trained with, from its sqltune_train.yaml, else auto)")
    max_source_length: int = arg(0, "prompt tokens kept, cut as in training (0 = the training value, else 1024)")
    max_new_tokens: int = arg(256, "tokens generated per answer at most")
    num_samples: int = arg(0, "with --vote execution: candidates sampled (at least 2), plus the greedy one")
    vote: str = arg("none", "none, or execution: run every candidate and answer with one of the largest group of "
                            "equal results")
    prefer_rows: bool = arg(False, "with --vote execution: a result with rows beats any empty result")
    temperature: float = arg(0.0, "0 = greedy (a vote samples at 0.7 then)")
    top_p: float = arg(1.0, "nucleus sampling threshold (with temperature > 0), in (0, 1]")
    timeout: float = arg(30.0, "seconds a query may run (the worker running it is killed one second later)")
    dtype: str = arg("auto", "weights for generation: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16")
    attn_implementation: str = arg("sdpa", "attention: sdpa, eager or flash_attention_2 (needs flash-attn)")
    seed: int = arg(42, "random seed for sampling")
    endpoint: str = arg("", "ask an OpenAI-compatible server (`sqltune serve`, at http://HOST:PORT) instead of "
                            "loading the model; the model folder still gives the tokenizer and training record")
    served_model: str = arg("", "with --endpoint: the model name to request (default: the server's LoRA module, "
                                "else its only model)")
    request_timeout: float = arg(300.0, "with --endpoint: seconds to wait for one reply")

    def __post_init__(self):
        _check(self.format in ("table", "json"), f"--format must be table or json, not {shown(self.format)}")
        _check(self.request_timeout > 0, "--request_timeout must be > 0")
        _check(not self.endpoint or self.endpoint.startswith(("http://", "https://")),
               f"--endpoint must be an http:// or https:// URL, not {shown(self.endpoint)}")
        _check(self.max_rows > 0, f"--max_rows must be > 0, not {self.max_rows}")
        _check(self.schema_style == "" or self.schema_style in SCHEMA_STYLES,
               f"--schema_style must be one of {', '.join(SCHEMA_STYLES)}, not {shown(self.schema_style)}")
        _check(self.sample_rows >= 0, "--sample_rows must be >= 0")
        _check(self.timeout > 0, "--timeout must be > 0")
        # the generation settings are PredictConfig's, checked by it with the same flag names
        predict_settings(self)


def predict_settings(cfg: AskConfig) -> PredictConfig:
    """The PredictConfig that generates `ask`'s answers (the backend and the vote read one)."""
    return PredictConfig(model_name_or_path=cfg.model_name_or_path, adapter=cfg.adapter, template=cfg.template,
                         max_source_length=cfg.max_source_length, max_new_tokens=cfg.max_new_tokens,
                         num_samples=cfg.num_samples, vote=cfg.vote, prefer_rows=cfg.prefer_rows,
                         temperature=cfg.temperature, top_p=cfg.top_p, dtype=cfg.dtype,
                         attn_implementation=cfg.attn_implementation, seed=cfg.seed, batch_size=1)


# --------------------------------------------------------------------------------------------- serve
@dataclass
class ServeConfig:
    model_name_or_path: str = arg("", "model folder or catalog name (the base model when --adapter is given)")
    adapter: str = arg("", "optional LoRA adapter folder, served as a LoRA module named --name")
    host: str = arg("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = arg(8000, "port to listen on")
    name: str = arg("sqltune", "the model name clients request (the LoRA module's name with --adapter)")
    template: str = arg("", "chat template for chat clients (default: the one the model was trained with)")
    max_source_length: int = arg(0, "prompt tokens (0 = the training value, else 1024); with --max_new_tokens it "
                                    "sizes vLLM's --max-model-len")
    max_new_tokens: int = arg(256, "answer tokens at most (sizes --max-model-len with --max_source_length)")
    max_model_len: int = arg(0, "vLLM's longest prompt + answer in tokens (0 = max_source_length + max_new_tokens)")
    dtype: str = arg("auto", "weights: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16")
    tensor_parallel_size: int = arg(1, "GPUs the model is split over")
    gpu_memory_utilization: float = arg(0.9, "on a GPU: fraction of GPU memory vLLM may use (on a CPU see "
                                             "--kv_cache_gb)")
    kv_cache_gb: float = arg(0.0, "GiB for the KV cache (0 = on a GPU what --gpu_memory_utilization leaves; on a "
                                  "CPU 4, or VLLM_CPU_KVCACHE_SPACE when set)")
    kv_block_size: int = arg(0, "tokens per KV-cache block (0 = 32 on a CPU, vLLM's own on a GPU); prefix caching "
                                "reuses whole blocks only (on a CPU a multiple of 32)")
    enforce_eager: bool = arg(False, "no torch.compile or CUDA graphs: starts in seconds (a CPU compiles ~3 min), "
                                     "decodes slower")
    seed: int = arg(42, "random seed")
    serve_dir: str = arg("", "folder for the chat template and generation config the server reads (default: "
                             "$SQLTUNE_HOME/serve/<digest>)")
    dry_run: bool = arg(False, "print the command and write its files, but do not start the server")

    def __post_init__(self):
        _check(0 < self.port < 65536, f"--port must be in 1..65535, not {shown(self.port)}")
        _check(bool(self.host.strip()), "--host must not be empty")
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or "")),
               f"--name must be letters, digits, '.', '_' or '-', not {shown(self.name)}")
        serve_settings(self)  # the engine settings are PredictConfig's, checked by it with the same flag names


def serve_settings(cfg: ServeConfig) -> PredictConfig:
    """The PredictConfig that sizes the vLLM engine (sqltune.infer.vllm_backend reads one)."""
    return PredictConfig(model_name_or_path=cfg.model_name_or_path, adapter=cfg.adapter, template=cfg.template,
                         max_source_length=cfg.max_source_length, max_new_tokens=cfg.max_new_tokens,
                         max_model_len=cfg.max_model_len, dtype=cfg.dtype, backend="vllm",
                         tensor_parallel_size=cfg.tensor_parallel_size,
                         gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_gb=cfg.kv_cache_gb,
                         kv_block_size=cfg.kv_block_size,
                         enforce_eager=cfg.enforce_eager, seed=cfg.seed)

# --------------------------------------------------------------------------------------------- export
EXPORT_FORMATS = ("gguf",)
GGUF_OUTTYPES = ("bf16", "f16", "q8_0")


@dataclass
class ExportConfig:
    model_name_or_path: str = arg("", "model folder or catalog name (the base model when --adapter is given; default: "
                                      "the base named in the adapter's adapter_config.json)")
    adapter: str = arg("", "optional LoRA adapter folder: merged into the model first (as `sqltune merge` does)")
    format: str = arg("gguf", f"file format: {', '.join(EXPORT_FORMATS)} (llama.cpp, Ollama, LM Studio)")
    out: str = arg("", "the file to write, e.g. model.gguf (written under a temporary name, renamed when complete)")
    outtype: str = arg("bf16", f"weights in the file: {', '.join(GGUF_OUTTYPES)} (q8_0: 8-bit, about half of bf16)")
    modelfile: bool = arg(False, "also write an Ollama `Modelfile` beside --out: the prompt format the model was "
                                 "trained with, its stop strings, temperature 0")
    template: str = arg("", "the Modelfile's prompt format (default: the template the model was trained with)")
    overwrite: bool = arg(False, "replace an existing --out (and Modelfile)")

    def __post_init__(self):
        _check(self.format in EXPORT_FORMATS, f"unknown format {shown(self.format)} for --format: sqltune export "
                                              f"writes {', '.join(EXPORT_FORMATS)}")
        _check(self.outtype in GGUF_OUTTYPES, f"--outtype must be one of {', '.join(GGUF_OUTTYPES)}, not "
                                              f"{shown(self.outtype)}")
        _check(bool(self.out.strip()), "--out is required (the file to write, e.g. model.gguf)")
        _check(bool(self.model_name_or_path or self.adapter), "--model_name_or_path is required (a model folder "
                                                              "or a catalog name), or --adapter")
        _check(not self.template or self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}, "
                                                                f"not {shown(self.template)}")


# --------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalConfig:
    pred: str = arg("", "prediction file, one SQL per line")
    gold: str = arg("", "gold file, `SQL<TAB>db_id` per line (blank lines separate interactions)")
    db_dir: str = arg("", "folder with <db_id>/<db_id>.sqlite (every SQLite file in <db_id>/ is used: test-suite "
                          "accuracy)")
    tables: str = arg("", "tables.json (foreign keys for exact match; schema of databases that are absent)")
    etype: str = arg("all", "exec, match or all")
    plug_value: bool = arg(False, "plug the gold values into the prediction before executing it")
    keep_distinct: bool = arg(False, "keep DISTINCT when executing (the official default drops it)")
    timeout: float = arg(30.0, "seconds each query (and each step between queries) may run; the worker running it "
                               "is killed one second later")
    max_rows: int = arg(100_000, "rows a query may return; more counts as a failed query")
    workers: int = arg(0, "parallel processes (0 = number of cores; never more than the cores or the questions)")
    max_memory_mb: int = arg(768, "MB of address space each worker process may use (its hard memory bound)")
    skip_missing_db: bool = arg(False, "leave out (and count) questions whose database file is absent or unreadable; "
                                       "else an absent one is an error and an unreadable one counts wrong in EX")
    max_samples: int = arg(0, "score only the first N gold questions (0 = all), e.g. for `predict --max_samples N`; "
                              "multi-turn: the interactions they cover, the last one possibly partial")
    max_result_mb: float = arg(64.0, "MB a query's result may hold, every cell counted (and any one value); more "
                                     "counts wrong as `result too large`")
    report: str = arg("", "folder for metrics.json, per_example.jsonl and report.md")
    questions: str = arg("", "prepared JSONL (or dev.json) whose questions go into the report (default: the records "
                             "named in <pred>.meta.json, when they line up with the gold file)")
    bird: bool = arg(False, "BIRD execution accuracy, as the official BIRD evaluator: result sets compared as sets, "
                            "a timeout or error counts wrong")
    difficulty: str = arg("", "BIRD: file with one difficulty (simple/moderate/challenging) per gold line")
    quiet: bool = arg(False, "print no table and no progress bar")
    table: bool = arg(True, "print the figures' table (`run` writes it to the report instead and keeps the bar)")

    def __post_init__(self):
        _check(self.etype in ("exec", "match", "all"), f"--etype must be exec, match or all, not {shown(self.etype)}")
        _check(self.timeout > 0, "--timeout must be > 0")
        _check(self.max_rows > 0, "--max_rows must be > 0")
        _check(self.workers >= 0, "--workers must be >= 0")
        _check(256 <= self.max_memory_mb <= 1 << 20, f"--max_memory_mb must be in [256, {1 << 20}], not "
                                                     f"{self.max_memory_mb}")
        _check(self.max_samples >= 0, f"--max_samples must be >= 0 (0 = all), not {self.max_samples}")
        _check(0 < self.max_result_mb <= 1024,  # SQLite holds no value over 1 GB; its length limit is a C int
               f"--max_result_mb must be in (0, 1024], not {self.max_result_mb:g}")


