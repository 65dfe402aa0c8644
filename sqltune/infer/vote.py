"""Beyond greedy: sample several SQL candidates per question, run them, and keep the answer most of them agree on.

Execution-guided self-consistency (Query-and-Conquer, arXiv 2503.24364): voting on *results* rather than SQL text,
because many different queries give the same answer. Two parts, kept apart so the vote needs no model:

- `generate_candidates` (transformers): N samples per prompt in one batched `generate` call, plus the greedy answer;
  each candidate carries the summed log-probability of its tokens;
- `vote` / `choose_retry`: run candidates in the sandbox (sqltune.sandbox: read-only, in a worker process killed
  past each query's deadline, bounded in rows, bytes and memory), grouped there exactly as EX would score them
  (sqltune.eval.answers: Spider's `value` rule, DISTINCT, every file of a test-suite folder, BIRD's sets), pick
  the winner; `choose_retry` keeps the greedy SQL unless it fails to run (predict's `--retry_on_error` samples
  only for those). The timeout is one figure (the evaluator's), recorded in each vote record.

Log-probabilities are those of the model's own distribution (predict keeps no decoding setting of the checkpoint's
generation_config, such as a repetition penalty; before temperature and top-p), so greedy and sampled candidates
are scored on the same scale;
the sum runs over the answer's tokens and the token that ended it (a stop token), nothing after.
"""

from __future__ import annotations

import math
from pathlib import Path

from sqltune.config import EvalConfig
from sqltune.errors import SqltuneError
from sqltune.eval.answers import ordered_sql, same_answers, signature
from sqltune.infer.extract import extract_sql
from sqltune.sandbox import Killed, Limits, Sandbox

SAMPLING_TEMPERATURE = 0.7  # used when sampling is asked for with --temperature 0 (greedy's setting)
EXEC_TIMEOUT = EvalConfig.timeout  # seconds per candidate query: the evaluator's, so a candidate EX would wait for
EXEC_MAX_ROWS = EvalConfig.max_rows  # is waited for here too; more rows counts as a failed query, as there

__all__ = ["EXEC_TIMEOUT", "choose_retry", "generate_candidates", "make_executor", "signature", "vote"]


def sampling_temperature(temperature: float) -> float:
    """The temperature to sample with: the user's, or SAMPLING_TEMPERATURE when theirs is 0 (greedy)."""
    return temperature if temperature > 0 else SAMPLING_TEMPERATURE


def make_executor(timeout: float = EXEC_TIMEOUT, max_rows: int = EXEC_MAX_ROWS) -> Sandbox:
    """One sandbox worker for a whole predict run (it keeps a read-only connection per database); close() at the
    end."""
    return Sandbox(1, Limits(timeout=timeout, max_rows=max_rows))


# ------------------------------------------------------------------------------------------------ candidates
def make_candidate(text: str, logprob: float | None, source: str, new_tokens: int | None = None,
                   end: str | None = None) -> dict:
    """One candidate as every backend builds it: the decoded text, its SQL (`end`: the template's end marker text,
    for extract_sql), its log-probability and where it came from ("greedy" or "sample")."""
    sql = extract_sql(text, end) if end else extract_sql(text)
    return {"source": source, "sql": sql, "logprob": logprob, "new_tokens": new_tokens, "text": text}


class _ChosenLogprobs:
    """A logits processor that records log p(chosen token) at each step, holding one step's log-softmax at a time.

    generate(output_scores=True) would keep every step's full-vocabulary scores (8 prompts x 8 samples x 256 steps x
    152k vocabulary is 10 GB in float32) and gives them after temperature and top-p. Placed before our own
    temperature/top-p warpers, this sees the model's distribution instead, so greedy and samples compare.
    """

    def __init__(self):
        self.pending = None
        self.steps = []

    def __call__(self, input_ids, scores):
        if self.pending is not None:  # input_ids now ends with the token chosen from the pending distribution
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = scores.float().log_softmax(-1)
        return scores

    def finish(self, sequences):
        """[rows, new tokens] log-probabilities; the last step's token is read from the final sequences."""
        import torch

        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sequences[:, -1:]).squeeze(1))
            self.pending = None
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(sequences.shape[0], 0)


def _left_pad(prompts: list[list[int]], pad: int):
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    return ids, mask


def _cache_argument(model) -> str:
    """The keyword transformers takes the KV cache by (`cache` since 5.2x, `past_key_values` before)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _shared_prompt(model, ids, mask, n: int):
    """Read each prompt once and copy its KV cache to its n samples.

    generate(num_return_sequences=n) repeats every prompt n times before reading it, so a vote@8 reads each
    ~500-token prompt 8 times; on a CPU that prefill is most of the cost. Here all but the prompt's last token are
    read once, the cache is repeated n times, and generate reads only the last token onwards. Positions follow the
    attention mask as generate's own do, so the samples' distributions are the unshared ones (tested).
    """
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    key = _cache_argument(model)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
          **{key: cache})
    cache.batch_repeat_interleave(n)
    return ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), {key: cache}


def _generate(model, tokenizer, prompts, stop_ids, n, temperature, top_p, max_new_tokens, source, end,
              share_prompt: bool = True) -> list[list[dict]]:
    """n sequences per prompt (greedy when temperature is 0) as candidates, grouped per prompt."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    pad = tokenizer.pad_token_id
    stop = set(stop_ids)
    ids, mask = _left_pad(prompts, pad)
    device = next(model.parameters()).device
    recorder = _ChosenLogprobs()
    processors = [recorder]
    # generate's own sampling warpers are switched off (temperature/top_p/top_k None) and ours run after the
    # recorder, so it sees the distribution before them
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": 1, "eos_token_id": list(stop_ids) or None,
              "pad_token_id": pad, "temperature": None, "top_p": None, "top_k": None, "logits_processor": processors}
    ids, mask = ids.to(device), mask.to(device)
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        kwargs.update(do_sample=True)
    else:
        kwargs.update(do_sample=False)
    with torch.inference_mode():
        if temperature > 0 and n > 1 and share_prompt and ids.shape[1] > 1:
            ids, mask, cached = _shared_prompt(model, ids, mask, n)
            kwargs.update(cached)
        elif temperature > 0:
            kwargs["num_return_sequences"] = n
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        logprobs = recorder.finish(out).tolist()
    new = out[:, ids.shape[1]:].tolist()
    rows = []
    for tokens, scores in zip(new, logprobs):
        cut, last = len(tokens), len(tokens)  # text stops at the first stop (or pad) token, as HFGenerator's does
        for j, tok in enumerate(tokens):
            if tok in stop or tok == pad:
                cut, last = j, j + 1
                break
        rows.append(make_candidate(tokenizer.decode(tokens[:cut], skip_special_tokens=True),
                                   float(sum(scores[:last])), source, new_tokens=cut, end=end))
    per = n if temperature > 0 else 1
    return [rows[i * per:(i + 1) * per] for i in range(len(prompts))]


def generate_candidates(model, tokenizer, prompts: list[list[int]], stop_ids: list[int], num_samples: int,
                        temperature: float, top_p: float, include_greedy: bool, max_new_tokens: int,
                        end: str | None = None, share_prompt: bool = True) -> list[list[dict]]:
    """Per prompt: the greedy candidate first (when include_greedy), then `num_samples` samples from one batched
    call, each prompt read once and its cache shared by its samples (`share_prompt=False`: generate's own
    num_return_sequences, kept for the benchmark). `prompts` are token ids, unpadded (left padding is done here);
    temperature 0 means SAMPLING_TEMPERATURE; `end` is passed to extract_sql."""
    if num_samples < 0 or (num_samples == 0 and not include_greedy):
        raise SqltuneError("generate_candidates needs num_samples > 0 or include_greedy")
    out = [[] for _ in prompts]
    if include_greedy:
        for row, cands in zip(out, _generate(model, tokenizer, prompts, stop_ids, 1, 0.0, 1.0, max_new_tokens,
                                             "greedy", end)):
            row += cands
    if num_samples:
        for row, cands in zip(out, _generate(model, tokenizer, prompts, stop_ids, num_samples,
                                             sampling_temperature(temperature), top_p, max_new_tokens, "sample", end,
                                             share_prompt)):
            row += cands
    return out


# ------------------------------------------------------------------------------------------------ execution
def _execute(candidates: list[dict], db_path: Path, executor: Sandbox, keep_distinct: bool, bird: bool) -> dict:
    """same_answers for the candidates' SQL, run in the sandbox; a candidate whose query the parent had to kill
    fails with that reason and the rest run again without it (each kill takes one candidate out)."""
    if not Path(db_path).is_file():
        raise SqltuneError(f"execution vote needs the question's database, and {db_path} is missing")
    sqls = [c["sql"] for c in candidates]
    failed: dict[int, str] = {}
    while True:
        try:
            return executor.call(same_answers, Path(db_path), sqls, bird, keep_distinct, failed)
        except Killed as exc:
            if exc.step in failed or not 0 <= exc.step < len(sqls):
                raise SqltuneError(f"the vote's sandbox failed twice on one candidate: {exc}") from None
            failed[exc.step] = str(exc)


def _record(cand: dict, result: dict, ordered: bool) -> dict:
    rec = {k: cand.get(k) for k in ("source", "sql", "logprob", "new_tokens", "text")}
    if "error" in result:
        rec.update(error=result["error"], result=None, group=None)
    else:
        rec.update(error=None, group=result["group"], result={"rows": result["rows"], "cols": result["cols"],
                                                              "ordered": ordered, "signature": result["signature"]})
    return rec


def _logprob(cand: dict) -> float:
    lp = cand.get("logprob")
    return float("-inf") if lp is None else lp


def _fallback(candidates: list[dict]) -> int:
    """The greedy candidate, or the most probable one when there is no greedy."""
    for i, cand in enumerate(candidates):
        if cand.get("source") == "greedy":
            return i
    return max(range(len(candidates)), key=lambda i: (_logprob(candidates[i]), -i))


def vote(candidates: list[dict], db_path: str | Path, executor: Sandbox, keep_distinct: bool = False,
         prefer_rows: bool = False, bird: bool = False) -> tuple[str, dict]:
    """The SQL to write and a JSON-able record of the vote.

    Candidates that fail to run are dropped. The rest are grouped as EX would score them (same_answers: for
    Spider any column order, row order as guessed for the whole question from the candidates that ran, every file
    of a test-suite folder; for BIRD sets of rows), so the grouping is an equivalence, independent of candidate
    order. The
    largest group wins; among equally large groups, the one with the larger summed
    log-probability of its members (sizes being equal, this is the larger mean log-probability); then the group
    whose first member comes first. The winning group's most probable member is written. When every candidate
    fails, the greedy candidate is written (the most probable one when there is no greedy).

    With `prefer_rows` a group whose result has rows beats every group with an empty result, whatever their
    sizes: an empty result is the usual sign of a wrong filter value or join (execution-guided decoding, Wang et
    al. 2018, treats it as a failure), yet it stays the answer when nothing that runs returns a row.
    """
    if not candidates:
        raise SqltuneError("vote needs at least one candidate")
    outcome = _execute(candidates, Path(db_path), executor, keep_distinct, bird)
    ordered, results = outcome["ordered"], outcome["results"]
    groups: dict[int, dict] = {}  # group id -> {"members", "rows"}, in order of first member
    for i, result in enumerate(results):
        if "error" not in result:
            groups.setdefault(result["group"], {"members": [], "rows": result["rows"],
                                                "signature": result["signature"]})["members"].append(i)
    groups = {g: groups[g] for g in sorted(groups, key=lambda g: groups[g]["members"][0])}
    summary = [{"id": g, "size": len(group["members"]), "members": group["members"], "signature": group["signature"],
                "logprob_sum": sum(_logprob(candidates[i]) for i in group["members"]), "rows": group["rows"]}
               for g, group in groups.items()]
    if summary:
        best = max(summary, key=lambda s: (prefer_rows and s["rows"] > 0, s["size"], s["logprob_sum"],
                                           -s["members"][0]))
        winner, fallback = best["id"], None
        chosen = max(best["members"], key=lambda i: (_logprob(candidates[i]), -i))
    else:
        winner, chosen = None, _fallback(candidates)
        fallback = "greedy" if candidates[chosen].get("source") == "greedy" else "best_logprob"
    for s in summary:
        s["logprob_sum"] = s["logprob_sum"] if math.isfinite(s["logprob_sum"]) else None
    record = {"method": "execution", "prefer_rows": prefer_rows, "rows_in_order": ordered, "winner": winner,
              "chosen": chosen, "fallback": fallback, "groups": summary, "timeout": executor.limits.timeout,
              "candidates": [_record(c, r, ordered) for c, r in zip(candidates, results)]}
    return candidates[chosen]["sql"], record


# ------------------------------------------------------------------------------------------------ retry
def choose_retry(greedy: dict, samples: list[dict], db_path: str | Path, executor: Sandbox,
                 keep_distinct: bool = False, bird: bool = False) -> tuple[str, dict]:
    """Execution-guided greedy: the greedy SQL when it runs; otherwise the most probable sample that runs; the
    greedy SQL again when none does. An empty result counts as running (only errors trigger a retry)."""
    cands = [greedy] + list(samples)
    results = _execute(cands, Path(db_path), executor, keep_distinct, bird)["results"]
    runs = [i for i, r in enumerate(results) if "error" not in r]
    chosen = 0 if 0 in runs or not runs else max(runs, key=lambda i: (_logprob(cands[i]), -i))
    record = {"method": "retry", "chosen": chosen, "retried": len(samples), "timeout": executor.limits.timeout,
              "fallback": "greedy" if not runs else None,
              "candidates": [_record(c, r, ordered_sql(c["sql"])) for c, r in zip(cands, results)]}
    return cands[chosen]["sql"], record
