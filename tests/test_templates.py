"""Chat templates: named templates render what each family's official chat template renders, one BOS, one end of an
answer per template (training targets, history, stop tokens, extraction), multi-turn truncation keeps what matters.

Tokenizers are built on the fly in the shape of each family's real one (sqltune.testing.build_chat_tokenizer): its
special tokens, its official chat template, a BOS added on tokenising where the real one adds it.
"""

from __future__ import annotations

import pytest

from sqltune.errors import SqltuneError
from sqltune.infer.extract import extract_sql
from sqltune.templates import SYSTEM, TEMPLATES, encode_example, encode_prompt, get_template, stop_token_ids
from sqltune.testing import FAMILIES, build_chat_tokenizer

SCHEMA = ("I want you to act as a SQL terminal in front of an example database.\n##Instruction:\nconcert_singer "
          "contains tables such as stadium, singer, concert. Table singer has columns such as Singer_ID, Name, "
          "Country, Age. Singer_ID is the primary key.\n\n")
RECORD = {
    "instruction": SCHEMA,
    "input": "###Input:\nWhat are the names of singers older than 30?\n\n###Response:",
    "history": [["###Input:\nHow many singers do we have?\n\n###Response:", "SELECT count(*) FROM singer"],
                ["###Input:\nShow their names.\n\n###Response:", "SELECT Name FROM singer "]],
    "output": "SELECT Name FROM singer WHERE Age  >  30",
}
CORPUS = [SCHEMA, RECORD["input"], RECORD["output"], SYSTEM] + [q + " " + a for q, a in RECORD["history"]]


@pytest.fixture(scope="module")
def tokenizers():
    return {family: build_chat_tokenizer(family, CORPUS * 5) for family in FAMILIES}


def conversation(record: dict, fold_system: bool = False, answer: bool = False) -> list[dict]:
    """The record as chat messages, the way users of each family write them."""
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in record["history"]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": record["instruction"] + record["input"]})
    if answer:
        messages.append({"role": "assistant", "content": record["output"]})
    if fold_system:  # Gemma has no system role: its text opens the first user message
        messages = messages[1:]
        messages[0] = {"role": "user", "content": f"{SYSTEM}\n\n{messages[0]['content']}"}
    return messages


def official(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, **kwargs)
    return out if isinstance(out, str) else list(out.get("input_ids", out))


def test_config_lists_every_template():
    from sqltune.config import TEMPLATES as CONFIG_TEMPLATES

    assert set(CONFIG_TEMPLATES) == set(TEMPLATES) and CONFIG_TEMPLATES[0] == "auto"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_named_template_renders_the_official_chat_template(tokenizers, family):
    """Pins: `llama2` was not Llama-2's format (system prompt in a made-up `[/INST] OK.` turn, no `</s><s>` between
    turns) and `llama3`, `gemma`, `phi3`, `deepseek` did not exist. Each named template must render byte for byte
    what the family's official chat template renders for system + 2 history turns + a question, and the answer it
    learns must be what that template writes after the prompt."""
    tok, _ = tokenizers[family]
    template = get_template(family, tok)
    turns, query = RECORD["history"], RECORD["instruction"] + RECORD["input"]
    fold = family == "gemma"
    if family == "deepseek":  # deepseek-coder writes the system message with no separator: ours ends with one
        messages = conversation(RECORD)
        messages[0]["content"] += "\n"
        full_messages = messages + [{"role": "assistant", "content": RECORD["output"]}]
    else:
        messages, full_messages = conversation(RECORD, fold), conversation(RECORD, fold, answer=True)

    prompt = template.render(tok, turns, query)
    assert prompt == official(tok, messages, tokenize=False, add_generation_prompt=True)
    whole = official(tok, full_messages, tokenize=False)
    ours = prompt + template.answer_text(tok, RECORD["output"])
    assert whole in (ours, ours + tok.eos_token)  # Phi-3's template closes a finished chat with its eos

    ids, cut = encode_prompt(tok, template, RECORD, 4096)
    assert ids == official(tok, messages, tokenize=True, add_generation_prompt=True) and not cut
    ex = encode_example(tok, template, RECORD, 4096, 4096)
    assert tok.decode(ex["input_ids"]) == ours
    n_prompt = ex["labels"].count(-100)
    assert ex["input_ids"][:n_prompt] == ids and ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


@pytest.mark.parametrize("family", ["llama3", "gemma", "llama2", "deepseek"])
def test_auto_writes_one_bos(tokenizers, family):
    """Pins: with `auto`, the chat template already writes `{{ bos_token }}` and the text was then tokenised with
    special tokens added, giving [bos, bos, ...] in training and prediction alike."""
    tok, _ = tokenizers[family]
    template = get_template("auto", tok)
    ids, _ = encode_prompt(tok, template, RECORD, 4096)
    ex = encode_example(tok, template, RECORD, 4096, 256)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ex["input_ids"][:2] == ids[:2]
    assert ids.count(tok.bos_token_id) == (3 if family == "llama2" else 1)  # Llama-2 writes <s> before each turn


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_equals_the_named_template(tokenizers, family):
    """`auto` on a family's tokenizer gives the same prompt, answer and end as the named template (the same
    conversation; Gemma's template refuses a system message, so `auto` opens the first user message with it)."""
    tok, _ = tokenizers[family]
    auto, named = get_template("auto", tok), get_template(family, tok)
    record = dict(RECORD, history=[[q, a.strip()] for q, a in RECORD["history"]])
    if family != "deepseek":  # deepseek's named template ends our system text with a newline; auto passes it as is
        assert auto.render(tok, record["history"], "q") == named.render(tok, record["history"], "q")
        assert encode_example(tok, auto, record, 4096, 256) == encode_example(tok, named, record, 4096, 256)
    assert auto.answer_text(tok, "SELECT 1") == named.answer_text(tok, "SELECT 1")
    assert auto.end_marker(tok) == named.end_marker(tok)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", ["auto", "named"])
def test_stop_ids_merge_eos_generation_config_and_end_marker(tokenizers, family, name):
    """Pins: stop_token_ids returned only eos and `<|im_end|>`, so a model whose template ends answers with
    `<end_of_turn>` (Gemma), `<|eot_id|>` (Llama-3 with another eos), `<|end|>` (Phi-3) learnt to stop there but
    generation never stopped; and predict's `eos_token_id=` replaced the model's generation_config eos list (Llama-3.1
    has three ids) instead of merging it."""
    tok, generation_eos = tokenizers[family]
    template = get_template(family if name == "named" else "auto", tok)
    stop = stop_token_ids(tok, template, {"eos_token_id": generation_eos})
    marker = template.end_marker(tok)
    assert tok.convert_tokens_to_ids(marker) in stop
    assert tok.eos_token_id in stop and set(generation_eos) <= set(stop) and len(stop) == len(set(stop))
    # the same end everywhere: the answer learnt ends with the marker, and extraction cuts at its text
    ex = encode_example(tok, template, RECORD, 4096, 256)
    assert tok.convert_tokens_to_ids(marker) in ex["labels"]
    assert extract_sql(f"SELECT 1 FROM t{marker}\nuser\nHow many", marker) == "SELECT 1 FROM t"


def test_stop_ids_take_a_generation_config_object(tokenizers):
    from transformers import GenerationConfig

    tok, generation_eos = tokenizers["llama3"]
    stop = stop_token_ids(tok, get_template("llama3", tok), GenerationConfig(eos_token_id=generation_eos))
    assert stop == [tok.eos_token_id] + [i for i in generation_eos if i != tok.eos_token_id]
    assert stop_token_ids(tok, get_template("llama3", tok), GenerationConfig(eos_token_id=7))[-1] == 7


def test_predict_stops_on_the_merged_ids(tokenizers, tmp_path):
    """Pins predict's `eos_token_id=self.stop`: the generator's stop list holds the model's generation_config eos
    ids (three for Llama-3.1) and the template's end marker, not only the tokenizer's eos."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqltune.config import PredictConfig
    from sqltune.infer.hf_backend import HFGenerator

    tok, generation_eos = tokenizers["llama3"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         bos_token_id=tok.bos_token_id, eos_token_id=generation_eos))
    model.generation_config.eos_token_id = generation_eos
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    gen = HFGenerator(PredictConfig(model_name_or_path=str(tmp_path / "m"), template="auto", max_new_tokens=4))
    assert set(generation_eos) | {tok.convert_tokens_to_ids("<|eot_id|>")} <= set(gen.stop)


def test_long_history_drops_the_oldest_turns_first(tokenizers):
    """Pins: a too-long multi-turn prompt was cut with `ids[-max_source_length:]`, so it began mid-question and the
    schema (and the BOS and system prompt) were gone. The oldest turns must go first; the template's start, the
    schema and the current question stay."""
    tok, _ = tokenizers["llama3"]
    template = get_template("auto", tok)
    history = [[f"###Input:\nQuestion number {i} about the singers and their concerts?\n\n###Response:",
                f"SELECT Name FROM singer WHERE Singer_ID = {i}"] for i in range(12)]
    record = dict(RECORD, history=history)
    full, _ = encode_prompt(tok, template, record, 100_000)
    alone, _ = encode_prompt(tok, template, dict(record, history=[]), 100_000)
    limit = (len(full) + len(alone)) // 2
    ids, cut = encode_prompt(tok, template, record, limit)
    text = tok.decode(ids)
    start = template.render(tok, [], "")[:60]
    assert cut and len(ids) <= limit
    assert text.startswith(start) and SYSTEM in text
    assert SCHEMA.strip() in text and RECORD["input"] in text
    assert "Question number 0 " not in text and "Question number 11 " in text  # oldest gone, newest kept
    ex = encode_example(tok, template, record, limit, 64)
    assert ex["input_ids"][:len(ids)] == ids and tok.decode(ex["labels"][len(ids):]) == RECORD["output"] + "<|eot_id|>"


def test_no_history_left_then_the_schema_is_cut_from_its_end(tokenizers):
    """With every history turn gone and the prompt still too long, the schema is cut from its end (as for
    single-turn records): the start of the schema, the template's start and the question stay."""
    tok, _ = tokenizers["llama3"]
    template = get_template("auto", tok)
    alone, _ = encode_prompt(tok, template, dict(RECORD, history=[]), 100_000)
    limit = len(alone) - 15
    ids, cut = encode_prompt(tok, template, RECORD, limit)
    text = tok.decode(ids)
    assert cut and len(ids) <= limit
    assert text.startswith(template.render(tok, [], "")[:60]) and RECORD["input"] in text
    assert SCHEMA[:40] in text and SCHEMA.strip() not in text and "How many singers" not in text


def test_template_mismatches_are_one_line(tokenizers):
    tok, _ = tokenizers["chatml"]
    for name, words in [("llama3", "no <|start_header_id|> token"), ("gemma", "no <start_of_turn> token"),
                        ("llama2", "bos token"), ("nope", "unknown template")]:
        with pytest.raises(SqltuneError, match=words):
            get_template(name, tok)
    refusing = build_chat_tokenizer("gemma", CORPUS)[0]
    refusing.chat_template = "{{ raise_exception('no way') }}"
    with pytest.raises(SqltuneError, match="chat template refused the conversation: no way"):
        encode_prompt(refusing, get_template("auto", refusing), RECORD, 512)
