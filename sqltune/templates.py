"""Chat templates and prompt encoding: the one place that turns a record into tokens, for training and prediction.

A template renders the conversation (earlier turns from `history`, then `instruction + input`) into the prompt
text the model continues, and says what ends an answer. Training appends the answer (loss on it alone);
prediction generates from the same prompt, cut the same way when it is too long.

Templates: `default` (Human/Assistant), `llama2` ([INST] ... [/INST]), `mistral`, `chatml` (Qwen, SmolLM) and
`auto` (the tokenizer's own chat template).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqltune.errors import SqltuneError

SYSTEM = "You are a helpful assistant that writes SQLite queries."


@dataclass(frozen=True)
class Template:
    name: str
    user: str  # format with {content}
    assistant_end: str  # text closing an answer in the prompt history and in training targets ("" = eos token)
    system: str = ""
    stop: tuple[str, ...] = ()

    def render(self, tokenizer, turns: list[tuple[str, str]], query: str) -> str:
        """Prompt text for `query` after the earlier (question, answer) `turns`."""
        if self.name == "auto":
            messages = [{"role": "system", "content": SYSTEM}]
            for q, a in turns:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": query})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = self.system
        end = self.assistant_end or (tokenizer.eos_token or "")
        for q, a in turns:
            text += self.user.format(content=q) + a + end
        return text + self.user.format(content=query)

    def answer_end(self, tokenizer) -> str:
        if self.name == "auto":
            return _auto_answer_end(tokenizer)
        return self.assistant_end or (tokenizer.eos_token or "")


TEMPLATES = {
    "default": Template("default", "Human: {content}\nAssistant: ", "",
                        system="A conversation between a user and an assistant that writes SQL.\n"),
    "llama2": Template("llama2", "[INST] {content} [/INST] ", "",
                       system=f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n[/INST] OK. "),
    "mistral": Template("mistral", "[INST] {content} [/INST]", ""),
    "chatml": Template("chatml", "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n",
                       system=f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", stop=("<|im_end|>",)),
    "auto": Template("auto", "", ""),
}


def _auto_answer_end(tokenizer) -> str:
    """What the tokenizer's chat template writes after an assistant message (e.g. `<|im_end|>\\n`)."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER_PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = text.split("ANSWER_PROBE", 1)[1] if "ANSWER_PROBE" in text else ""
    return tail or (tokenizer.eos_token or "")


def get_template(name: str, tokenizer) -> Template:
    """The named template, checked against the tokenizer (a mismatch is a one-line error)."""
    if name not in TEMPLATES:
        raise SqltuneError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name == "auto" and not getattr(tokenizer, "chat_template", None):
        raise SqltuneError("template 'auto' needs a tokenizer with a chat template; this one has none "
                           "(choose --template default, llama2, mistral or chatml)")
    if name == "chatml":
        unk = tokenizer.unk_token_id
        for marker in ("<|im_start|>", "<|im_end|>"):
            ids = tokenizer.convert_tokens_to_ids(marker)
            if ids is None or ids == unk:
                raise SqltuneError(f"template 'chatml' does not fit this tokenizer: it has no {marker} token "
                                   "(try --template auto or default)")
    if name in ("default", "llama2", "mistral") and tokenizer.eos_token is None:
        raise SqltuneError(f"template {name!r} ends answers with the eos token, but the tokenizer has none")
    return TEMPLATES[name]


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for marker in template.stop + (("<|im_end|>",) if template.name == "auto" else ()):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_prompt(tokenizer, template: Template, record: dict, max_source_length: int) -> tuple[list[int], bool]:
    """Prompt token ids, at most `max_source_length`; the schema (instruction) is cut first, the question kept.

    Returns (ids, was_cut).
    """
    turns = [(q, a) for q, a in record.get("history") or []]
    instruction, question = record.get("instruction", ""), record.get("input", "")
    ids = _ids(tokenizer, template.render(tokenizer, turns, instruction + question), True)
    if len(ids) <= max_source_length:
        return ids, False
    inst_ids = _ids(tokenizer, instruction, False)
    for _ in range(6):  # re-rendering can shift a token or two at the seam; shrink until it fits
        excess = len(ids) - max_source_length
        if excess <= 0:
            return ids, True
        keep = max(0, len(inst_ids) - excess - 2)
        inst_ids = inst_ids[:keep]
        cut_instruction = tokenizer.decode(inst_ids) + ("\n" if inst_ids else "")
        ids = _ids(tokenizer, template.render(tokenizer, turns, cut_instruction + question), True)
        if not inst_ids:
            break
    return (ids[-max_source_length:] if len(ids) > max_source_length else ids), True


def encode_example(tokenizer, template: Template, record: dict, max_source_length: int, max_target_length: int
                   ) -> dict:
    """input_ids and labels for supervised training: prompt tokens are masked (-100), the answer is learnt.

    The answer (with its end marker) keeps at most `max_target_length` tokens; `answer_cut` says if any were cut.
    """
    prompt, prompt_cut = encode_prompt(tokenizer, template, record, max_source_length)
    answer = _ids(tokenizer, record["output"] + template.answer_end(tokenizer), False)
    answer_cut = len(answer) > max_target_length
    answer = answer[:max_target_length]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
            "prompt_cut": prompt_cut, "answer_cut": answer_cut}
