"""Chat templates and prompt encoding: the one place that turns a record into tokens, for training and prediction.

A template renders the conversation (system prompt, earlier turns from `history`, then `instruction + input`) into
the prompt text the model continues, and defines the end of an answer once: `Template.answer_end(tokenizer)` is the
text that closes an answer. Training targets end with it, the prompt history closes each earlier answer with it,
generation stops on its marker token (`stop_token_ids`) and SQL extraction cuts at its marker text (`end_marker`).

Named templates render byte for byte what each family's official chat template (the `chat_template` of its
tokenizer_config.json on the Hub) renders for the same conversation, history included: `llama2` (Llama-2-chat),
`mistral` (Mistral-7B-Instruct v0.1/v0.2), `chatml` (Qwen2.5, SmolLM), `llama3` (Llama-3-Instruct), `gemma`
(Gemma-it), `phi3` (Phi-3-mini-instruct), `deepseek` (deepseek-coder-instruct). Gemma's template has no system role
(it raises): the system text goes before the first user message, separated by a blank line, as Gemma 3's own
template does; `auto` does the same for any chat template that refuses a system message. `default` is a plain
Human/Assistant layout for base models without a chat template; `auto` uses the tokenizer's own chat template.

Chat renders are tokenised without adding special tokens, as `apply_chat_template` does: a template that writes
`{{ bos_token }}` gives one BOS, not two. Only `default` (which writes none) lets the tokenizer add its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from jinja2 import TemplateError

from sqltune.errors import SqltuneError

SYSTEM = "You are a helpful assistant that writes SQLite queries."
_PROBE = "ANSWER_PROBE"


@dataclass(frozen=True)
class Template:
    name: str
    user: str = "{content}"  # one user turn ({content}, {bos})
    end: str = "{eos}"  # text that closes an answer ({eos}); the one end of an answer
    system: str = ""  # system block at the start ({system})
    first_user: str = "{content}"  # content of the first user message: where a template puts the system text
    answer_start: str = ""  # text between the prompt and the answer (" " for Llama-2 and Mistral)
    bos: bool = False  # the text starts with the tokenizer's bos token
    strip: bool = False  # messages are stripped of surrounding whitespace, as the official template does
    markers: tuple[str, ...] = ()  # special tokens the tokenizer must have

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer adds its own special tokens: chat renders already hold theirs."""
        return self.name == "default"

    def render(self, tokenizer, turns: list[tuple[str, str]], query: str) -> str:
        """Prompt text for `query` after the earlier (question, answer) `turns`, ending where the answer starts."""
        if self.name == "auto":
            return _auto_render(tokenizer, turns, query)
        bos = tokenizer.bos_token or ""
        text = (bos if self.bos else "") + self.system.format(system=SYSTEM)
        questions = [q for q, _ in turns] + [query]
        for i, question in enumerate(questions):
            content = self.first_user.format(system=SYSTEM, content=question) if i == 0 else question
            text += self.user.format(content=content.strip() if self.strip else content, bos=bos)
            if i < len(turns):
                text += self.answer_text(tokenizer, turns[i][1])
        return text

    def answer_end(self, tokenizer) -> str:
        """The text that closes an answer (e.g. `<|im_end|>\\n`, `<|eot_id|>`, ` </s>`)."""
        if self.name == "auto":
            return _auto_parts(tokenizer)[1]
        return self.end.format(eos=tokenizer.eos_token or "")

    def answer_text(self, tokenizer, answer: str) -> str:
        """An answer as the template writes it after the prompt: training targets and prompt history alike."""
        start = _auto_parts(tokenizer)[0] if self.name == "auto" else self.answer_start
        return start + (answer.strip() if self.strip else answer) + self.answer_end(tokenizer)

    def end_marker(self, tokenizer) -> str | None:
        """The marker that ends an answer (answer_end without its whitespace): generation stops on its token and
        extraction cuts at its text. None when the end is only whitespace."""
        return self.answer_end(tokenizer).strip() or None


_CHATML = ("<|im_start|>", "<|im_end|>")
TEMPLATES = {
    "default": Template("default", "Human: {content}\nAssistant: ",
                        system="A conversation between a user and an assistant that writes SQL.\n"),
    "llama2": Template("llama2", "{bos}[INST] {content} [/INST]", " {eos}", answer_start=" ", strip=True,
                       first_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}"),
    "mistral": Template("mistral", " [INST] {content} [/INST]", "{eos}", answer_start=" ", bos=True,
                        first_user="{system}\n\n{content}"),
    "chatml": Template("chatml", "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n",
                       system="<|im_start|>system\n{system}<|im_end|>\n", markers=_CHATML),
    "llama3": Template("llama3", "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", bos=True, strip=True,
                       system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                       markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": Template("gemma", "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
                      "<end_of_turn>\n", first_user="{system}\n\n{content}", bos=True, strip=True,
                      markers=("<start_of_turn>", "<end_of_turn>")),
    "phi3": Template("phi3", "<|user|>\n{content}<|end|>\n<|assistant|>\n", "<|end|>\n",
                     system="<|system|>\n{system}<|end|>\n", markers=("<|system|>", "<|user|>", "<|assistant|>",
                                                                     "<|end|>")),
    # deepseek-coder writes a system message with no separator after it: ours carries its own newline, as the
    # model's default system prompt does
    "deepseek": Template("deepseek", "### Instruction:\n{content}\n### Response:\n", "\n<|EOT|>\n",
                         system="{system}\n", bos=True, markers=("<|EOT|>",)),
    "auto": Template("auto", end=""),
}


_REFUSED = (TemplateError, TypeError, ValueError, KeyError, IndexError)  # raise_exception, or a template's own bug


def _chat(tokenizer, messages: list[dict], generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except _REFUSED as exc:
        raise SqltuneError(f"the tokenizer's chat template refused the conversation: {exc}") from None


def _auto_render(tokenizer, turns: list[tuple[str, str]], query: str) -> str:
    messages = []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": query})
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + messages, tokenize=False,
                                             add_generation_prompt=True)
    except _REFUSED:  # a template with no system role (Gemma): the system text opens the first user message
        messages[0] = {"role": "user", "content": f"{SYSTEM}\n\n{messages[0]['content']}"}
        return _chat(tokenizer, messages, True)


def _auto_parts(tokenizer) -> tuple[str, str]:
    """(text before, text after) an assistant message in the tokenizer's chat template: e.g. ("", "<|im_end|>\\n").

    The end is what follows an answer both when it closes the conversation and when another user turn follows
    (their common prefix: Phi-3 writes an eos only at the very end); it falls back to the eos token.
    """
    user, answer, user2 = ({"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE},
                           {"role": "user", "content": "q2"})
    prompt = _chat(tokenizer, [user], True)
    closed, followed = _chat(tokenizer, [user, answer], False), _chat(tokenizer, [user, answer, user2], False)
    start = ""
    if closed.startswith(prompt) and _PROBE in closed[len(prompt):]:
        start = closed[len(prompt):closed.index(_PROBE, len(prompt))]
    tails = [text.split(_PROBE, 1)[1] for text in (closed, followed) if _PROBE in text]
    end = os.path.commonprefix(tails) if len(tails) == 2 else ""
    if "<" in end and ">" not in end[end.rindex("<"):]:  # "<|end|>\n<|" : the tails part inside a special token
        end = end[:end.rindex("<")]
    return start, end or (tokenizer.eos_token or "")


def _has_token(tokenizer, token: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid is not None and (tid != tokenizer.unk_token_id or token == tokenizer.unk_token)


def get_template(name: str, tokenizer) -> Template:
    """The named template, checked against the tokenizer (a mismatch is a one-line error)."""
    if name not in TEMPLATES:
        raise SqltuneError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    if name == "auto" and not getattr(tokenizer, "chat_template", None):
        raise SqltuneError("template 'auto' needs a tokenizer with a chat template; this one has none "
                           f"(choose --template {', '.join(t for t in TEMPLATES if t != 'auto')})")
    for marker in template.markers:
        if not _has_token(tokenizer, marker):
            raise SqltuneError(f"template {name!r} does not fit this tokenizer: it has no {marker} token "
                               "(try --template auto or default)")
    if (template.bos or "{bos}" in template.user) and tokenizer.bos_token is None:
        raise SqltuneError(f"template {name!r} starts with the bos token, but the tokenizer has none")
    if "{eos}" in template.end and tokenizer.eos_token is None:
        raise SqltuneError(f"template {name!r} ends answers with the eos token, but the tokenizer has none")
    return template


def _marker_id(tokenizer, marker: str) -> int | None:
    """The id of a marker that is one token (a special token, or text the tokenizer keeps in one piece)."""
    if _has_token(tokenizer, marker):
        return tokenizer.convert_tokens_to_ids(marker)
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer, template: Template, generation_config=None) -> list[int]:
    """Token ids that end generation: the tokenizer's eos, the model's generation_config eos ids (Llama-3.1 lists
    three; a GenerationConfig, a dict, an id or a list of ids) and the template's end marker token, merged."""
    eos = generation_config.get("eos_token_id") if isinstance(generation_config, dict) else \
        getattr(generation_config, "eos_token_id", generation_config)
    marker = template.end_marker(tokenizer)
    ids: list[int] = []
    for tid in [tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos]),
                _marker_id(tokenizer, marker) if marker else None]:
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)
    return ids


def stop_strings(tokenizer, template: Template, generation_config=None) -> list[str]:
    """The texts that end an answer, for engines that stop on text (an Ollama Modelfile's `stop` lines): the
    template's end marker and the text of each of `stop_token_ids`, in that order, each once."""
    marker = template.end_marker(tokenizer)
    texts: list[str] = []
    for text in [marker, *(tokenizer.decode([tid]) for tid in stop_token_ids(tokenizer, template,
                                                                              generation_config))]:
        if text and text.strip() and text not in texts:
            texts.append(text)
    return texts


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _prompt(tokenizer, template: Template, record: dict, max_source_length: int
            ) -> tuple[list[int], str | None, bool]:
    """(ids, text, was_cut) of the prompt; text is None when the ids are a cut that no text renders to.

    Too long: the oldest history turns go first, then the schema (instruction) is cut from its end; the system
    prompt, the template's start and the current question stay.
    """
    turns = [(q, a) for q, a in record.get("history") or []]
    instruction, question = record.get("instruction", ""), record.get("input", "")

    def encode(turns, instruction):
        text = template.render(tokenizer, turns, instruction + question)
        return _ids(tokenizer, text, template.add_special_tokens), text

    ids, text = encode(turns, instruction)
    if len(ids) <= max_source_length:
        return ids, text, False
    while turns:
        turns = turns[1:]
        ids, text = encode(turns, instruction)
        if len(ids) <= max_source_length:
            return ids, text, True
    inst_ids = _ids(tokenizer, instruction, False)
    for _ in range(6):  # re-rendering can shift a token or two at the seam; shrink until it fits
        excess = len(ids) - max_source_length
        if excess <= 0:
            return ids, text, True
        inst_ids = inst_ids[:max(0, len(inst_ids) - excess - 2)]
        ids, text = encode([], tokenizer.decode(inst_ids) + ("\n" if inst_ids else ""))
        if not inst_ids:
            break
    if len(ids) <= max_source_length:
        return ids, text, True
    return ids[-max_source_length:], None, True  # the question alone is longer than the limit


def encode_prompt(tokenizer, template: Template, record: dict, max_source_length: int) -> tuple[list[int], bool]:
    """Prompt token ids, at most `max_source_length` (oldest history turns cut first, then the schema).

    Returns (ids, was_cut).
    """
    ids, _, cut = _prompt(tokenizer, template, record, max_source_length)
    return ids, cut


def encode_example(tokenizer, template: Template, record: dict, max_source_length: int, max_target_length: int
                   ) -> dict:
    """input_ids and labels for supervised training: prompt tokens are masked (-100), the answer is learnt.

    The answer is `answer_text` (the output closed by the template's answer_end), tokenised together with the prompt
    so that the ids are those of the whole conversation's text; it keeps at most `max_target_length` tokens
    (`answer_cut` says if any were cut).
    """
    prompt, text, prompt_cut = _prompt(tokenizer, template, record, max_source_length)
    answer = _answer_ids(tokenizer, template, prompt, text, record["output"])
    answer_cut = len(answer) > max_target_length
    answer = answer[:max_target_length]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
            "prompt_cut": prompt_cut, "answer_cut": answer_cut}


def _answer_ids(tokenizer, template: Template, prompt: list[int], text: str | None, answer: str) -> list[int]:
    """The ids of `answer` closed by the template's answer_end, tokenised together with the prompt so that they are
    those of the whole conversation's text; on its own when that does not start with the prompt's ids (a merge
    across the seam) or the prompt is a cut no text renders to."""
    answer_text = template.answer_text(tokenizer, answer)
    if text is not None:
        whole = _ids(tokenizer, text + answer_text, template.add_special_tokens)
        if whole[:len(prompt)] == prompt:
            return whole[len(prompt):]
    return _ids(tokenizer, answer_text, False)


def encode_preference(tokenizer, template: Template, record: dict, max_source_length: int, max_target_length: int
                      ) -> dict:
    """prompt_ids, chosen_ids and rejected_ids of a preference pair (`sqltune samples`' record: the prompt fields of
    a prepared record, `chosen` and `rejected` SQL), as TRL's DPOTrainer reads them: the prompt rendered and cut as
    encode_example does, and each answer encoded as encode_example encodes an SFT answer, closed by the template's
    answer_end, at most `max_target_length` tokens (`answer_cut`: either was cut). So prompt_ids + chosen_ids are
    exactly the input_ids of the SFT record whose output is `chosen`."""
    prompt, text, prompt_cut = _prompt(tokenizer, template, record, max_source_length)
    chosen = _answer_ids(tokenizer, template, prompt, text, record["chosen"])
    rejected = _answer_ids(tokenizer, template, prompt, text, record["rejected"])
    return {"prompt_ids": prompt, "chosen_ids": chosen[:max_target_length],
            "rejected_ids": rejected[:max_target_length], "prompt_cut": prompt_cut,
            "answer_cut": max(len(chosen), len(rejected)) > max_target_length}


# ------------------------------------------------------------------------------------------- served as Jinja
def _jinja_expr(fmt: str, **names: str) -> str:
    """A str.format pattern of a Template as a Jinja expression: its text as string literals (JSON-escaped, which
    Jinja reads back unchanged), each {name} as the expression given for it."""
    import json
    import string

    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(json.dumps(literal))
        if name is not None:
            parts.append(names[name])
    return "(" + " ~ ".join(parts) + ")" if parts else '""'


def _adds_bos(template: Template, tokenizer) -> bool:
    """Whether encoding a prompt adds a bos token the rendered text lacks (`default` on a Llama-2-like tokenizer):
    a chat server tokenises the rendered text without special tokens, so the Jinja template writes that bos."""
    bos = tokenizer.bos_token_id
    return template.add_special_tokens and bos is not None and _ids(tokenizer, "x", True)[:1] == [bos]


def chat_template_jinja(template: Template, tokenizer) -> str:
    """The template as a Jinja chat template, for a server's chat endpoint (`sqltune serve`): for a conversation
    of user and assistant messages it renders what `template.render` renders, so chat clients get the trained
    prompt format (the same token ids once tokenised without special tokens, as chat servers do). A leading system
    message replaces sqltune's system text; without one, training's is used."""
    import json

    system = json.dumps(SYSTEM)
    if template.name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if not isinstance(own, str):
            raise SqltuneError("template 'auto' needs a tokenizer with one chat template (a text); this one has "
                               "none or several: give --template")
        try:
            _chat(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], True)
            add = '{%- set messages = [{"role": "system", "content": ' + system + '}] + messages %}'
        except SqltuneError:  # no system role (Gemma): the system text opens the first user message, as training
            add = ('{%- set messages = [{"role": "user", "content": ' + system + ' ~ "\\n\\n" ~ messages[0]'
                   '["content"]}] + messages[1:] %}')
        return ('{%- if messages and messages[0]["role"] != "system" %}' + add + '{%- endif %}\n' + own)
    content = "(c | trim)" if template.strip else "c"
    answer = '(m["content"] | trim)' if template.strip else 'm["content"]'
    return "".join([
        '{%- set has_system = messages and messages[0]["role"] == "system" -%}\n',
        '{%- set system = messages[0]["content"] if has_system else ' + system + ' -%}\n',
        '{%- set msgs = messages[1:] if has_system else messages -%}\n',
        "{{- bos_token -}}\n" if template.bos or _adds_bos(template, tokenizer) else "",
        "{{- " + _jinja_expr(template.system, system="system") + " -}}\n",
        "{%- for m in msgs -%}\n",
        '{%- if m["role"] == "user" -%}\n',
        "{%- set c = " + _jinja_expr(template.first_user, system="system", content='m["content"]') +
        ' if loop.first else m["content"] -%}\n',
        "{{- " + _jinja_expr(template.user, content=content, bos="bos_token") + " -}}\n",
        '{%- elif m["role"] == "assistant" -%}\n',
        "{{- " + _jinja_expr(template.answer_start) + " ~ " + answer + " ~ " +
        _jinja_expr(template.end, eos="eos_token") + " -}}\n",
        "{%- endif -%}\n",
        "{%- endfor -%}\n",
    ])
