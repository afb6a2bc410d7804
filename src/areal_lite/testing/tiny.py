"""Tiny, self-made models for tests and benchmarks: no hub, no download, seconds to build.

`make_tiny_model_dir(path)` writes a normal Hugging Face checkpoint directory (config,
safetensors, tokenizer with a Qwen-style chat template that knows tools and <think>),
so every loading path the real models use is exercised on it.
"""

from __future__ import annotations

from pathlib import Path

# A Qwen2.5-style ChatML template: system/user/assistant/tool turns, tool schemas in the
# system turn, assistant tool calls rendered as <tool_call>{json}</tool_call>.
CHATML_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call functions. Signatures:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "Reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if not loop.first %}"
    "<|im_start|>system\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "<|im_start|>user\n{{ message['content'] }}<|im_end|>\n"
    "{% elif message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{% for tc in message['tool_calls'] %}"
    "{% if (loop.first and message['content']) or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": "
    "{% if tc['function']['arguments'] is string %}{{ tc['function']['arguments'] }}"
    "{% else %}{{ tc['function']['arguments'] | tojson }}{% endif %}}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added (non-special) tokens that parsers look for; kept whole by the tokenizer.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>",
                 "<tool_response>", "</tool_response>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is \\boxed{42}.",
    "You are a helpful assistant. Please reason step by step.",
    "{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}",
    "Hello there! How are you today? I am fine, thank you.",
    "0123456789 + - * / = ( ) [ ] { } : ; , . ! ? ' \" # $ % & @ _ < > | \\ ~ ^",
    "system user assistant tool function call response think weather city",
]


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and a tools template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.add_tokens(MARKUP_TOKENS)
    fast.chat_template = CHATML_TOOLS_TEMPLATE
    return fast


def make_tiny_model_dir(path: str | Path, *, arch: str = "llama", hidden_size: int = 64,
                        num_layers: int = 2, seed: int = 0) -> Path:
    """Write a random tiny causal LM + tokenizer as a Hugging Face checkpoint directory.

    `arch` is "llama", "qwen2", "qwen3" (Llama-family: the engine's fused forward) or
    "gpt2" (another family: the model's own forward). Returns the directory.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    special = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                   tie_word_embeddings=True)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=hidden_size, n_layer=num_layers, n_head=4,
                            n_positions=1024, **special)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
        config = cls(vocab_size=len(tok), hidden_size=hidden_size,
                     intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                     max_position_embeddings=1024, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger logits than the default init, so sampling is peaky
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
