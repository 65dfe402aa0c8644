"""`ask --endpoint URL`: the model's answers from an OpenAI-compatible server (`sqltune serve`) instead of a model
loaded here; with the standard library's urllib only.

The prompts are ask's own token ids, sent as the `prompt` of /v1/completions (the OpenAI API takes a list of token
ids there, and vLLM uses them as given): the server neither renders a chat template nor tokenises, so a prompt is
what training saw to the token (its bos, a cut in the middle of the schema), which the chat endpoint cannot
promise (it re-tokenises rendered text). Generation stops on the template's stop token ids (`stop_token_ids`, a
vLLM extension other servers ignore) and its end marker text (`stop`); extraction cuts at that marker either way.
A vote's samples are one request with the server's `n`.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from sqltune.config import PredictConfig
from sqltune.errors import SqltuneError

REPLY_CHARS = 200  # of a server's error text shown


def api_base(url: str) -> str:
    """The /v1 base of a server given as http://HOST:PORT or http://HOST:PORT/v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def call(url: str, payload: dict | None, timeout: float) -> dict:
    """GET (payload None) or POST JSON to `url`; the JSON object replied. Every failure is one line."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        raise SqltuneError(f"--endpoint: {url} answered HTTP {exc.code}: {_reason(exc)}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise SqltuneError(f"--endpoint: {url} did not answer within {timeout:g} s") from None
        raise SqltuneError(f"--endpoint: cannot reach {url}: {getattr(reason, 'strerror', None) or reason} "
                           "(is `sqltune serve` running there?)") from None
    except (TimeoutError, socket.timeout):
        raise SqltuneError(f"--endpoint: {url} did not answer within {timeout:g} s") from None
    except (ConnectionError, OSError) as exc:  # a connection reset or closed mid-reply
        raise SqltuneError(f"--endpoint: {url}: the connection failed: {exc}") from None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SqltuneError(f"--endpoint: {url} replied with something that is not JSON: {_excerpt(body)}") from None
    if not isinstance(obj, dict):
        raise SqltuneError(f"--endpoint: {url} replied with JSON that is not an object: {_excerpt(body)}")
    return obj


def _excerpt(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return repr(text[:REPLY_CHARS] + ("…" if len(text) > REPLY_CHARS else ""))


def _reason(exc: urllib.error.HTTPError) -> str:
    """An error reply's message (OpenAI's {"error": {"message"}}, or vLLM's {"message"}), else its text."""
    try:
        body = exc.read()
    except OSError:
        return str(exc.reason)
    try:
        obj = json.loads(body)
        error = obj.get("error", obj)
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            text = " ".join(message.split())
            return text[:REPLY_CHARS] + ("…" if len(text) > REPLY_CHARS else "")
    except (ValueError, AttributeError):
        pass
    return _excerpt(body) if body else str(exc.reason)


def served_model(base: str, wanted: str, timeout: float) -> str:
    """The model name to request: `wanted`, else the server's LoRA module (a model with a parent), else its only
    model; anything else is one line naming what it serves."""
    if wanted:
        return wanted
    reply = call(base + "/models", None, timeout)
    models = reply.get("data")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
        raise SqltuneError(f"--endpoint: {base}/models replied without a list of models (`data`)")
    loras = [m["id"] for m in models if m.get("parent")]
    names = loras if loras else [m["id"] for m in models]
    if len(names) != 1:
        raise SqltuneError(f"--endpoint: {base} serves {', '.join(map(repr, names)) or 'no model'}; pick one with "
                           "--served_model")
    return names[0]


class EndpointGenerator:
    """HFGenerator's interface (generate, candidates) over a server's /v1/completions."""

    def __init__(self, cfg: PredictConfig, url: str, model: str, stop_ids: list[int], end: str | None,
                 timeout: float):
        self.cfg, self.base, self.timeout = cfg, api_base(url), timeout
        self.model = served_model(self.base, model, timeout)
        self.common = {"model": self.model, "max_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                       "stop_token_ids": stop_ids, "echo": False}
        if end:
            self.common["stop"] = [end]

    def _complete(self, prompt: list[int], **params) -> list[dict]:
        """The choices of one completion request, checked (n of them, each with its text)."""
        n = params.get("n", 1)
        reply = call(self.base + "/completions", {**self.common, "prompt": prompt, **params}, self.timeout)
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != n or \
                not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise SqltuneError(f"--endpoint: {self.base}/completions replied without {n} choice"
                               f"{'' if n == 1 else 's'} with a text: {_excerpt(json.dumps(reply).encode())}")
        return sorted(choices, key=lambda c: c.get("index", 0))

    def generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        out = []
        for prompt in prompts:
            (choice,) = self._complete(prompt, temperature=self.cfg.temperature, top_p=self.cfg.top_p, logprobs=0)
            out.append((choice["text"], len(_token_logprobs(choice) or [])))
        return out

    def candidates(self, prompts: list[list[int]], n: int, include_greedy: bool, end: str | None) -> list[list[dict]]:
        """Per prompt: the greedy answer, then n samples from one request with `n`, each with its log-probability
        (the sum of its tokens' log-probabilities, `logprobs=0`; None when the server sends none)."""
        from sqltune.infer.vote import make_candidate, sampling_temperature

        rows = []
        for prompt in prompts:
            kinds = ([("greedy", self._complete(prompt, temperature=0.0, logprobs=0))] if include_greedy else []) + \
                ([("sample", self._complete(prompt, n=n, temperature=sampling_temperature(self.cfg.temperature),
                                            top_p=self.cfg.top_p, logprobs=0))] if n else [])
            row = []
            for source, choices in kinds:
                for c in choices:
                    logprobs = _token_logprobs(c)
                    row.append(make_candidate(c["text"], sum(logprobs) if logprobs else None, source,
                                              len(logprobs) if logprobs is not None else None, end))
            rows.append(row)
        return rows


def _token_logprobs(choice: dict) -> list[float] | None:
    """The log-probabilities of a choice's tokens (OpenAI's completions `logprobs.token_logprobs`), or None."""
    logprobs = choice.get("logprobs")
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        return None
    return [float(v) for v in values]
