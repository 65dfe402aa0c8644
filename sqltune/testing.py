"""Small things the tests (and benchmarks' smoke runs) need: a tiny random model with a tokenizer trained on the fly."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_llama(out: str | Path, corpus: list[str], vocab_size: int = 600, hidden: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """A random Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer trained on `corpus`, for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML_TEMPLATE
    save_random_llama(out, tok, hidden, layers, seed)
    tok.save_pretrained(out)
    return out



def save_random_llama(out: Path, tok, hidden: int, layers: int, seed: int) -> None:
    """A seeded random Llama sized for tests (4 heads, 2 KV heads, untied output layer) for the tokenizer `tok`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def build_tiny_llama_like(out: str | Path, tokenizer_dir: str | Path, hidden: int = 64, layers: int = 2,
                          seed: int = 0) -> Path:
    """A random Llama (hidden 64, 2 layers) with a real model's tokenizer files copied as they are: for tools that
    recognise a tokenizer by its behaviour, such as llama.cpp's converter (it refuses a BPE pre-tokenizer it does not
    know, so the BPE trained on the fly by build_tiny_llama cannot go through it)."""
    import shutil

    from transformers import AutoTokenizer

    out, src = Path(out), Path(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    tok = AutoTokenizer.from_pretrained(out)
    save_random_llama(out, tok, hidden, layers, seed)
    return out

# The `chat_template` strings of each family's tokenizer_config.json on the Hugging Face Hub, copied verbatim (the
# jinja source, so `\\n` inside a jinja string literal is jinja's escape for a newline). They are what
# `tokenizer.apply_chat_template` renders for these models; tests compare sqltune's named templates with them.
OFFICIAL_CHAT_TEMPLATES = {
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
        "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
        "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    # mistralai/Mistral-7B-Instruct-v0.2 (and v0.1, Mixtral-8x7B-Instruct-v0.1): the template with an optional
    # system message, which goes before the first user message
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
        "        {%- if loop.first and system_message is defined %}\n"
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"),
    # Qwen/Qwen2.5-7B-Instruct (ChatML)
    "chatml": (
        "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
        "        {{- messages[0]['content'] }}\n    {%- else %}\n"
        "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
        "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
        "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
        "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
        "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
        "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
        "    {%- if messages[0]['role'] == 'system' %}\n"
        "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
        "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
        "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
        "(message.role == \"assistant\" and not message.tool_calls) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
        "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
        "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
        "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
        "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
        "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
        "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
        "    {%- elif message.role == \"tool\" %}\n"
        "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
        "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
        "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
        "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
        "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # google/gemma-2b-it (and gemma-7b-it): no system role
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
    # microsoft/Phi-3-mini-4k-instruct
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}"),
    # deepseek-ai/deepseek-coder-6.7b-instruct
    "deepseek": (
        "{% if not add_generation_prompt is defined %}\n{% set add_generation_prompt = false %}\n{% endif %}\n"
        "{%- set ns = namespace(found=false) -%}\n{%- for message in messages -%}\n"
        "    {%- if message['role'] == 'system' -%}\n        {%- set ns.found = true -%}\n    {%- endif -%}\n"
        "{%- endfor -%}\n{{bos_token}}{%- if not ns.found -%}\n{{'You are an AI programming assistant, utilizing the "
        "Deepseek Coder model, developed by Deepseek Company, and you only answer questions related to computer "
        "science. For politically sensitive questions, security and privacy issues, and other non-computer science "
        "questions, you will refuse to answer\\n'}}\n{%- endif %}\n{%- for message in messages %}\n"
        "    {%- if message['role'] == 'system' %}\n{{ message['content'] }}\n    {%- else %}\n"
        "        {%- if message['role'] == 'user' %}\n{{'### Instruction:\\n' + message['content'] + '\\n'}}\n"
        "        {%- else %}\n{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n"
        "    {%- endif %}\n{%- endfor %}\n{% if add_generation_prompt %}\n{{'### Response:'}}\n{% endif %}"),
}

# Each family's tokenizer shape: (bos, eos, pad, unk, other special tokens, whether tokenizing adds the bos, and the
# tokens its generation_config.json lists as eos (Llama-3.1 lists three, Gemma two)).
FAMILIES = {
    "llama2": ("<s>", "</s>", None, "<unk>", [], True, ["</s>"]),
    "mistral": ("<s>", "</s>", None, "<unk>", [], True, ["</s>"]),
    "chatml": (None, "<|im_end|>", "<|endoftext|>", None, ["<|im_start|>"], False, ["<|im_end|>", "<|endoftext|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", None, None,
               ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"], True,
               ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "gemma": ("<bos>", "<eos>", "<pad>", "<unk>", ["<start_of_turn>", "<end_of_turn>"], True,
              ["<eos>", "<end_of_turn>"]),
    "phi3": ("<s>", "<|endoftext|>", None, "<unk>", ["</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
             False, ["<|endoftext|>", "<|assistant|>", "<|end|>"]),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<|EOT|>", "<｜end▁of▁sentence｜>", None, [], True, ["<|EOT|>"]),
}


def build_chat_tokenizer(family: str, corpus: list[str], vocab_size: int = 400):
    """A small byte-level BPE tokenizer shaped like `family`'s real one: its special tokens, its official chat
    template, a bos added on tokenising when the real one adds it. Returns (tokenizer, generation eos ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk, others, adds_bos, gen_eos = FAMILIES[family]
    specials = [t for t in (unk, bos, eos, pad) if t] + others
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    if adds_bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad or eos,
                                  unk_token=unk, additional_special_tokens=others)
    tok.chat_template = OFFICIAL_CHAT_TEMPLATES[family]
    return tok, [tok.convert_tokens_to_ids(t) for t in gen_eos]


# ------------------------------------------------------------------ processes (the sandbox's tests and benchmark)
def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, resident bytes, state letter) of every process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[21]) * 4096, fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return table


def descendants(pid: int, table: dict | None = None) -> set[int]:
    """Every process below `pid`."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to read its exit, is not)."""
    entry = process_table().get(pid) if Path(f"/proc/{pid}").exists() else None
    return entry is not None and entry[2] != "Z"


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    table = process_table()
    return sum(table[p][1] for p in descendants(pid, table) | {pid} if p in table)
