"""An Ollama Modelfile for an exported GGUF: the prompt format the model was trained with, its stop strings, greedy.

Ollama renders prompts with a Go template. The one written here is in Ollama's plain form (.System, .Prompt,
.Response), which Ollama runs once per earlier (question, answer) pair and, for the last question, up to .Response;
the system text goes only to the first pair. Its pieces are cut out of sqltune's own renders (templates.py), so it
holds the same text as training's prompt for every template, `auto` included:

    {{ if .System }}FIRST TURN{{ else }}LATER TURN{{ end }}{{ if .Response }}ANSWER START{{ end }}{{ .Response }}END

What Ollama cannot do as training does: templates that strip the messages (llama2, llama3, gemma) get them unstripped
(Go templates in Ollama have no trim). A bos token that opens the prompt is left to the engine when the GGUF says it
adds one (tokenizer.ggml.add_bos_token), so the prompt has one bos, as in training.
"""

from __future__ import annotations

from sqltune.errors import SqltuneError
from sqltune.templates import SYSTEM, Template

_Q, _Q2, _A = "QUESTION_PROBE_ONE", "QUESTION_PROBE_TWO", "ANSWER_PROBE_ONE"


def _go(text: str) -> str:
    """Literal text inside a Go template: `{{` would open an action, so it is written as one."""
    return text.replace("{{", '{{ "{{" }}')


def _once(text: str, part: str, what: str, name: str) -> None:
    if text.count(part) != 1:
        raise SqltuneError(f"template {name!r} cannot be written as an Ollama template: {what} appears "
                           f"{text.count(part)} times in one rendered turn")


def go_template(template: Template, tokenizer, add_bos: bool) -> tuple[str, str]:
    """(Ollama TEMPLATE, SYSTEM text) that render what `template.render` renders, a turn at a time. `add_bos`: the
    engine puts the bos token before the prompt itself (then the template does not write it)."""
    name = template.name
    first = template.render(tokenizer, [], _Q)
    answer = template.answer_text(tokenizer, _A)
    history = template.render(tokenizer, [(_Q, _A)], _Q2)
    if not history.startswith(first + answer):
        raise SqltuneError(f"template {name!r} cannot be written as an Ollama template: a later question changes "
                           "the text of the earlier turns")
    later = history[len(first + answer):]
    for text, part, what in ((first, _Q, "the question"), (later, _Q2, "the question"), (answer, _A, "the answer")):
        _once(text, part, what, name)
    later = later.replace(_Q2, _Q)
    bos = tokenizer.bos_token or ""
    if add_bos and bos and first.startswith(bos):
        first = first[len(bos):]
    if first.count(SYSTEM) == 1:
        system = SYSTEM
    elif first != later and first.endswith(later):  # a fixed header (`default`): Ollama's system text
        system, first = first[:-len(later)], SYSTEM + later
    elif first == later:
        system = ""
    else:
        raise SqltuneError(f"template {name!r} cannot be written as an Ollama template: its first turn differs "
                           "from the later ones in more than the system text")

    def turn(text: str, with_system: bool) -> str:
        parts = [_go(x) for x in text.split(_Q)]
        if with_system:
            parts = [x.replace(_go(SYSTEM), "{{ .System }}") for x in parts]
        return "{{ .Prompt }}".join(parts)

    start, end = answer.split(_A)
    prompt = turn(later, False)
    if system:
        prompt = "{{ if .System }}" + turn(first, True) + "{{ else }}" + prompt + "{{ end }}"
    if start:
        prompt += "{{ if .Response }}" + _go(start) + "{{ end }}"
    return prompt + "{{ .Response }}" + _go(end), system


def _printable(text: str) -> bool:
    """Whether Ollama's Modelfile parser keeps every character (it drops those that do not print, but line breaks
    and tabs)."""
    return all(c.isprintable() or c in "\n\t" for c in text)


def _value(text: str, what: str) -> str:
    """A Modelfile value in triple quotes: Ollama's parser keeps it as written, but has no escape for `\"\"\"`."""
    if '"""' in text or not _printable(text):
        raise SqltuneError(f"the {what} holds '\"\"\"' or a character that does not print, which an Ollama "
                           "Modelfile cannot carry")
    return '"""' + text + '"""'


def modelfile(gguf_name: str, template: Template, tokenizer, add_bos: bool, stops: list[str], source: str) -> str:
    """The Modelfile's text, for a GGUF file in the same folder."""
    go, system = go_template(template, tokenizer, add_bos)
    if "\n" in gguf_name or gguf_name.startswith(('"', " ")):
        raise SqltuneError(f"the GGUF file name {gguf_name!r} cannot be written in a Modelfile's FROM line")
    source = " ".join(source.split())
    lines = [f"# Written by `sqltune export` for {source}:", f"# prompts as template {template.name} renders them, "
             "its stop strings, greedy decoding. In this folder: ollama create NAME, then ollama run NAME.",
             f"FROM ./{gguf_name}", f"TEMPLATE {_value(go, 'template')}"]
    if system:
        lines.append(f"SYSTEM {_value(system, 'system text')}")
    for stop in stops:
        if '"' in stop[:1] + stop[-1:] or not _printable(stop):
            raise SqltuneError(f"the stop string {stop!r} cannot be written in an Ollama Modelfile")
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
