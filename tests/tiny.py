"""Tiny random models and a tokenizer, built offline and saved to disk so
they load through the same from_pretrained path as real checkpoints."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Gradients measure how strongly each dimension of a representation affects the loss.",
    "Sparse autoencoders decompose activations into many interpretable features.",
    "A language model predicts the next token from the tokens that came before it.",
]

SAMPLE_TEXTS = [
    "The model reads a sentence and predicts each following word in turn, one token at a time.",
    "Short text here, but longer than fifty characters so it is kept by the filter.",
    "Layers near the output often matter more for the loss than layers near the input embedding.",
    "A fox and a dog.",  # shorter than 50 characters: filtered out of datasets
    "Each worker loads the model once and then processes many shards of samples without reloading.",
    "Padding positions are masked so they never count as targets nor as aggregated positions at all.",
    "Merging partial sums is elementwise addition, so the order of shards does not change the result.",
]


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s> prepended to every text, as Llama tokenizers do."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    wrapped.save_pretrained(directory)
    return wrapped


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "gemma", "gemma2", "gemma3_text",
            "gpt_neox", "gpt2", "phi3")

_SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_FAMILY_OVERRIDES = {
    "qwen3": dict(head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=24, decoder_sparse_step=1),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
    "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
}


def model_config(family: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    if family == "gpt2":
        options = dict(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=256, **_SPECIAL_IDS)
    elif family == "gpt_neox":
        options = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                       **_SPECIAL_IDS)
    else:
        options = dict(vocab_size=vocab_size, **_DECODER, **_SPECIAL_IDS, **_FAMILY_OVERRIDES.get(family, {}))
    options.update(overrides)
    return AutoConfig.for_model(family, **options)


def build_model_dir(directory: Path, family: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, len(tokenizer)))
    model.save_pretrained(directory)
    return directory
