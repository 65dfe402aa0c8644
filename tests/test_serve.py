"""`sqltune serve` and `ask --endpoint` (issue 27 item 3): the vLLM server command built for the tiny model and a
tiny LoRA adapter (dry run), the trained chat template as Jinja for chat clients, `ask --endpoint` against a small
fake OpenAI-compatible server started here on 127.0.0.1 (the prompts it receives are ask's own token ids), its
one-line errors, and the real `vllm serve` on the tiny model when vLLM imports (`make test-vllm`)."""

from __future__ import annotations

import http.server
import json
import os
import shlex
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sqltune.cli import main
from sqltune.infer.hf_backend import HFGenerator
from sqltune.testing import FAMILIES, build_chat_tokenizer

CORPUS = ["SELECT name FROM singer WHERE age > 3", "how many singers are there?", "You are a helpful assistant"] * 5


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "concert.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, country TEXT);
        INSERT INTO singer VALUES (1, 'Ann', 52, 'France'), (2, 'Bo', 29, 'France'), (3, 'Cy', 41, 'Spain'),
                                  (4, 'Di', 35, 'Peru'), (5, 'Ed', 60, 'Chile');
    """)
    conn.commit()
    conn.close()
    return path


def _adapter(model: Path, data: Path, out: Path, rank: int = 4) -> Path:
    """A LoRA adapter of `model` after one training step (chatml, prompts cut at 300 tokens)."""
    from sqltune.config import TrainConfig
    from sqltune.train.sft import train

    train(TrainConfig(model_name_or_path=str(model), dataset="demo_train", dataset_dir=str(data), template="chatml",
                      output_dir=str(out), max_steps=1, max_source_length=300, per_device_train_batch_size=2,
                      save_steps=100, lora_rank=rank))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, prepared_demo, tmp_path_factory):
    return _adapter(tiny_model, prepared_demo, tmp_path_factory.mktemp("lora") / "adapter")


# ------------------------------------------------------------------------------------------- the chat template
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_served_chat_template_gives_the_training_prompt_ids(family):
    """A chat client's conversation, rendered by the Jinja template serve writes and tokenised as chat servers do
    (no special tokens added), is the prompt training encodes: named, default and auto templates, history too."""
    from sqltune.templates import chat_template_jinja, encode_prompt, get_template

    tok, _ = build_chat_tokenizer(family, CORPUS)
    turns = [("q1 ", " SELECT 1 "), ("q2", "SELECT 2")]
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages.append({"role": "user", "content": "schema\n  the question\n"})
    for name in (family, "default", "auto"):
        template = get_template(name, tok)
        text = tok.apply_chat_template(messages, chat_template=chat_template_jinja(template, tok), tokenize=False,
                                       add_generation_prompt=True)
        want, _ = encode_prompt(tok, template, {"instruction": "schema\n", "input": "  the question\n",
                                                "history": turns}, 10_000)
        assert tok(text, add_special_tokens=False)["input_ids"] == want, (family, name)


# ------------------------------------------------------------------------------------------- the command
def _dry_run(capsys, *argv) -> tuple[list[str], dict]:
    assert main(["serve", *argv, "--dry_run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w.split("=")[0].isupper())
    return words[len(env):], env


def _value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def test_the_command_serves_the_adapter_as_a_lora_module_in_its_trained_format(tiny_model, adapter, tmp_path,
                                                                                capsys):
    from sqltune.loading import load_tokenizer
    from sqltune.templates import TEMPLATES, chat_template_jinja

    argv, env = _dry_run(capsys, "--model_name_or_path", str(tiny_model), "--adapter", str(adapter), "--port",
                         "8123", "--serve_dir", str(tmp_path / "serve"), "--enforce_eager")
    assert argv[1:3] == ["serve", str(tiny_model)] or \
        argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model)]
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert "--enable-lora" in argv and "--enforce-eager" in argv
    assert _value(argv, "--lora-modules") == f"sqltune={adapter}"
    assert _value(argv, "--max-lora-rank") == "8"  # r=4, rounded up to a rank vLLM accepts
    assert _value(argv, "--max-model-len") == str(300 + 256)  # the trained prompt length + --max_new_tokens
    assert (_value(argv, "--host"), _value(argv, "--port")) == ("127.0.0.1", "8123")
    tok = load_tokenizer(tiny_model)
    assert Path(_value(argv, "--chat-template")).read_text() == chat_template_jinja(TEMPLATES["chatml"], tok)
    assert _value(argv, "--generation-config") == str(tmp_path / "serve")
    stops = json.loads((tmp_path / "serve" / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    import torch

    if not torch.cuda.is_available():  # on a CPU the KV cache has a fixed size, not a share of all RAM
        assert _value(argv, "--kv-cache-memory-bytes") == str(4 << 30)
        assert _value(argv, "--block-size") == "32"  # questions on one schema share more of it in the cache
        if "VLLM_USE_AOT_COMPILE" not in os.environ:  # a compiled start loads its cache (vLLM's AOT one does not)
            assert env["VLLM_USE_AOT_COMPILE"] == "0"
        assert _value(argv, "--dtype") == "float32"
        # a False engine setting is said (--no-...), not dropped: the server ran with chunked prefill, which kills
        # vLLM's CPU build on a seeded request (a vote's samples) whose prompt is prefilled over several steps
        assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv
        assert int(_value(argv, "--max-num-batched-tokens")) >= 300 + 256
        cpus = sorted(os.sched_getaffinity(0))
        if 1 < len(cpus) <= 4 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # the server computes on all CPUs
            assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cpus))


def test_a_kv_block_size_the_cpu_cannot_take_is_one_line_in_serve(tiny_model, tmp_path, capsys, monkeypatch):
    """Pins: serve built its command without checking the block size, so `--kv_block_size 48` on a CPU reached vLLM's
    engine (a page of worker tracebacks); it is one line, as in predict."""
    import sqltune.infer.vllm_backend as backend

    monkeypatch.setattr(backend, "vllm_on_cpu", lambda: True)
    assert main(["serve", "--model_name_or_path", str(tiny_model), "--serve_dir", str(tmp_path / "s"), "--dry_run",
                 "--kv_block_size", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv_block_size" in err[0], err


def test_without_an_adapter_the_model_is_served_under_the_name(tiny_model, tmp_path, capsys):
    argv, _ = _dry_run(capsys, "--model_name_or_path", str(tiny_model), "--template", "chatml", "--name", "m1",
                       "--serve_dir", str(tmp_path / "s"), "--kv_cache_gb", "1")
    assert _value(argv, "--served-model-name") == "m1"
    assert "--enable-lora" not in argv and "--lora-modules" not in argv
    assert _value(argv, "--max-model-len") == str(1024 + 256)


def test_lora_ranks_round_up_and_bad_input_is_one_line(tiny_model, adapter, tmp_path, capsys):
    import shutil

    wide = tmp_path / "wide"
    shutil.copytree(adapter, wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 17}))
    argv, _ = _dry_run(capsys, "--model_name_or_path", str(tiny_model), "--adapter", str(wide), "--serve_dir",
                       str(tmp_path / "s"))
    assert _value(argv, "--max-lora-rank") == "32"
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 600}))
    for args, words in [(["--adapter", str(wide)], "LoRA ranks up to 512"),
                        (["--adapter", str(tmp_path / "none")], "adapter folder not found"),
                        (["--port", "0"], "--port must be in 1..65535"),
                        (["--name", "a b"], "--name must be")]:
        assert main(["serve", "--model_name_or_path", str(tiny_model), *args, "--dry_run"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serving_without_vllm_names_the_install(tiny_model, capsys):
    assert main(["serve", "--model_name_or_path", str(tiny_model), "--template", "chatml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "make install-vllm" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------- a fake server
class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 in a thread: /v1/models lists a base model and a LoRA module,
    /v1/completions answers each choice with the next of `answers` (cycling). It records every request, can
    reply with `broken` (status, body) instead, or sleep `delay` seconds first."""

    def __init__(self, answers=("SELECT count(*) FROM singer",)):
        self.answers, self.requests, self.broken, self.delay = list(answers), [], None, 0.0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up waiting (the slow case)
                    pass

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._reply(404, b'{"error": {"message": "no such route"}}')
                self._reply(200, json.dumps({"object": "list", "data": [
                    {"id": "base", "object": "model", "parent": None},
                    {"id": "sqltune", "object": "model", "parent": "base"}]}).encode())

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(request)
                time.sleep(fake.delay)
                if fake.broken:
                    return self._reply(*fake.broken)
                choices = []
                for i in range(request.get("n", 1)):
                    text = fake.answers[(len(fake.requests) - 1 + i) % len(fake.answers)]
                    choices.append({"index": i, "text": text, "finish_reason": "stop",
                                    "logprobs": {"tokens": ["x", "y"], "token_logprobs": [-0.5, -0.25 * (i + 1)]}})
                self._reply(200, json.dumps({"object": "text_completion", "choices": choices}).encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _no_local_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ask --endpoint loaded the model")

    monkeypatch.setattr(HFGenerator, "__init__", refuse)


def test_ask_endpoint_sends_the_prompt_ask_builds_and_runs_the_sql(tiny_model, adapter, db, capsys, monkeypatch):
    """The completions request holds the token ids the local path generates from, the served LoRA module's name,
    the trained stop ids and end marker; the SQL runs in the sandbox as ever; the model is never loaded."""
    from sqltune.loading import load_tokenizer

    local = []
    monkeypatch.setattr(HFGenerator, "generate", lambda self, batch: local.extend(batch) or [("SELECT 1", 2)])
    common = ["ask", "--model_name_or_path", str(tiny_model), "--adapter", str(adapter), "--db", str(db),
              "--format", "json", "how many singers?"]
    assert main(common) == 0
    capsys.readouterr()
    _no_local_model(monkeypatch)
    with FakeServer() as fake:
        assert main(common + ["--endpoint", fake.url]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == {"sql": "SELECT count(*) FROM singer", "columns": ["count(*)"], "rows": [[5]], "error": None}
    (request,) = fake.requests
    tok = load_tokenizer(tiny_model)
    assert request["prompt"] == local[0] and request["model"] == "sqltune"
    assert set(request["stop_token_ids"]) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert request["stop"] == ["<|im_end|>"] and request["temperature"] == 0.0 and request["max_tokens"] == 256


def test_ask_endpoint_votes_over_the_servers_n_samples(tiny_model, db, capsys, monkeypatch):
    _no_local_model(monkeypatch)
    answers = ["SELECT name FROM singer WHERE age > 100", "SELECT count(*) FROM singer", "SELECT COUNT(*) FROM singer",
               "SELECT nonsense"]
    with FakeServer(answers) as fake:
        assert main(["ask", "--model_name_or_path", str(tiny_model), "--template", "chatml", "--db", str(db),
                     "--format", "json", "--endpoint", fake.url + "/v1/", "--served_model", "base",
                     "--num_samples", "3", "--vote", "execution", "how many singers?"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[5]]  # the two counts outvote the empty greedy answer
    greedy, sampled = fake.requests
    assert greedy.get("n", 1) == 1 and greedy["temperature"] == 0.0 and sampled["n"] == 3
    assert sampled["temperature"] > 0 and greedy["prompt"] == sampled["prompt"] and greedy["model"] == "base"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unreachable", "not json", "no choices", "http error", "slow"])
def test_ask_endpoint_failures_are_one_line(case, tiny_model, db, capsys, monkeypatch):
    _no_local_model(monkeypatch)
    argv = ["ask", "--model_name_or_path", str(tiny_model), "--template", "chatml", "--db", str(db),
            "--request_timeout", "1", "how many singers?"]
    words = {"unreachable": "cannot reach", "not json": "not JSON", "no choices": "without 1 choice",
             "http error": "HTTP 400: max_tokens is too large", "slow": "did not answer within 1 s"}[case]
    if case == "unreachable":
        assert main(argv + ["--endpoint", f"http://127.0.0.1:{_free_port()}"]) == 2
    else:
        with FakeServer() as fake:
            fake.broken = {"not json": (200, b"<html>oops</html>"), "no choices": (200, b'{"choices": []}'),
                           "http error": (400, b'{"error": {"message": "max_tokens is too large"}}'),
                           "slow": None}[case]
            fake.delay = 2.0 if case == "slow" else 0.0
            assert main(argv + ["--endpoint", fake.url]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_a_server_with_several_models_needs_served_model(tiny_model, db, capsys, monkeypatch):
    from sqltune.infer import endpoint

    _no_local_model(monkeypatch)
    monkeypatch.setattr(endpoint, "call", lambda url, payload, timeout: {"data": [{"id": "a"}, {"id": "b"}]})
    assert main(["ask", "--model_name_or_path", str(tiny_model), "--template", "chatml", "--db", str(db),
                 "--endpoint", "http://127.0.0.1:9", "how many?"]) == 2
    assert "serves 'a', 'b'; pick one with --served_model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the real engine
def _vllm_missing() -> str:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this environment (`make test-vllm` installs it into .venv-vllm and runs this)"
    try:
        from vllm import LLM, SamplingParams  # noqa: F401
    except Exception as exc:
        return f"vLLM is installed but does not import: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return ""


SERVER_TIMEOUT = 900  # a cold start on 2 CPU cores with --enforce_eager takes well under this


@pytest.mark.skipif(bool(_vllm_missing()), reason=_vllm_missing() or "vLLM imports")
def test_the_real_vllm_server_answers_ask_as_the_local_model_does(prepared_demo, db, tmp_path, capsys, monkeypatch):
    """`sqltune serve` starts vLLM's server on the tiny model with a LoRA adapter; `ask --endpoint` gets the SQL the
    transformers path writes for the same prompt (greedy, float32), and a chat client is answered too."""
    from sqltune.testing import build_tiny_llama

    corpus = []
    for line in open(prepared_demo / "demo_train.jsonl"):
        r = json.loads(line)
        corpus += [r["instruction"], r["input"], r["output"]]
    model = build_tiny_llama(tmp_path / "model", corpus, hidden=128)  # vLLM's CPU attention has no head size 16
    lora = _adapter(model, prepared_demo, tmp_path / "adapter", rank=8)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SQLTUNE_HOME": str(tmp_path / "home")}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "sqltune", "serve", "--model_name_or_path", str(model),
                               "--adapter", str(lora), "--port", str(port), "--enforce_eager", "--kv_cache_gb", "1",
                               "--dtype", "float32", "--max_new_tokens", "16"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.time()
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            assert time.time() - started < SERVER_TIMEOUT, "the server did not start in time"
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as reply:
                    models = json.loads(reply.read())["data"]
                break
            except OSError:
                time.sleep(2)
        with capsys.disabled():
            print(f"\nsqltune serve: vLLM's server answered after {time.time() - started:.0f} s", file=sys.stderr)
        assert "sqltune" in [m["id"] for m in models]
        common = ["ask", "--model_name_or_path", str(model), "--adapter", str(lora), "--db", str(db), "--format",
                  "json", "--max_new_tokens", "16", "--dtype", "float32", "how many singers?"]
        from sqltune.infer.endpoint import EndpointGenerator

        texts = {}
        for name, cls in (("local", HFGenerator), ("served", EndpointGenerator)):
            def generate(self, prompts, _name=name, _original=cls.generate):
                texts[_name] = _original(self, prompts)
                return texts[_name]

            monkeypatch.setattr(cls, "generate", generate)
        assert main(common) == 0
        local = json.loads(capsys.readouterr().out)
        assert main(common + ["--endpoint", url]) == 0
        served = json.loads(capsys.readouterr().out)
        # the same tokens from the same prompt ids (a random model's byte-level tokens cut characters anywhere:
        # vLLM holds back an incomplete character's bytes, transformers writes U+FFFD)
        ((text, new_tokens),), ((want, want_tokens),) = texts["served"], texts["local"]
        assert new_tokens == want_tokens > 0 and text == want.rstrip("\ufffd")
        assert served["sql"] == local["sql"]
        request = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "sqltune", "max_tokens": 8, "messages": [
                                             {"role": "user", "content": "how many singers?"}]}).encode())
        with urllib.request.urlopen(request, timeout=120) as reply:
            chat = json.loads(reply.read())["choices"][0]["message"]["content"]
        assert isinstance(chat, str)
        with capsys.disabled():
            print(f"ask --endpoint: {text!r} ({new_tokens} tokens; local: {want!r}); chat: {chat!r}; server log: "
                  f"{(tmp_path / 'server.log').read_text().splitlines()[0][:160]}", file=sys.stderr)
    finally:
        for signal, wait in ((15, 60), (9, 30)):  # the server and its engine workers (its own session)
            try:
                os.killpg(server.pid, signal)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
