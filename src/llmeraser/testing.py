"""Tiny models, tokenizers and data built offline, for tests and the quick demo (nothing is downloaded)."""

from __future__ import annotations

import random
import types

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llmeraser.data import Example

COLORS = ["red", "blue", "green", "black", "white", "gold"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"]


# ChatML, with the {% generation %} marks that let transformers return assistant-token masks (TRL's
# assistant_only_loss needs them)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300, *,
                   chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on `corpus` (default: the fact templates below); with `chat`, ChatML
    special tokens and `CHAT_TEMPLATE`."""
    corpus = corpus or [f"The {a} likes {c}. Does the {a} like {c}? Yes No" for a in ANIMALS for c in COLORS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", *(["<|im_start|>", "<|im_end|>"] if chat else [])]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """n synthetic chat records {id, messages: [system?, user, assistant]} about the animals' colours."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, c = rng.choice(ANIMALS), rng.choice(COLORS)
        messages = ([{"role": "system", "content": "Answer briefly."}] if i % 2 else []) + [
            {"role": "user", "content": f"Which colour does the {a} like?"},
            {"role": "assistant", "content": f"The {a} likes {c}."}]
        out.append({"id": f"chat{i}", "messages": messages})
    return out


def _eager_attention_exact(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention without its float32 softmax, so float64 tests are exact to ~1e-15."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, q, k)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("eager_exact", _eager_attention_exact)
AttentionMaskInterface.register("eager_exact", eager_mask)  # an explicit causal mask, never skipped


def _rms_norm_exact(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm in the input's dtype (transformers computes it in float32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def tiny_llama(vocab_size: int, *, hidden: int = 16, layers: int = 1, seed: int = 0,
               dtype: torch.dtype = torch.float64, init_std: float = 0.02) -> LlamaForCausalLM:
    """A random Llama small enough for dense Hessians of its LoRA parameters (eager attention)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, initializer_range=init_std)
    model = LlamaForCausalLM(config).to(dtype)
    if dtype == torch.float64:  # transformers computes softmax and RMSNorm in float32; keep float64 exact
        model.config._attn_implementation = "eager_exact"
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.forward = types.MethodType(_rms_norm_exact, module)
    else:
        model.config._attn_implementation = "eager"
    return model.eval()


def tiny_lora(model: torch.nn.Module, *, r: int = 1, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0):
    """Wrap with LoRA (dropout 0) and give B a small random init so the adapter is not at the A·B = 0 saddle."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                  target_modules=list(targets), init_lora_weights=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return peft_model.eval()


def fact_examples(n: int, seed: int = 0) -> list[Example]:
    """n short prompt/response facts ("Does the fox like red?" → " Yes"/" No")."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, c = rng.choice(ANIMALS), rng.choice(COLORS)
        out.append(Example(id=f"ex{i}", prompt=f"Does the {a} like {c}?", response=rng.choice([" Yes", " No"])))
    return out
