"""Tiny, fully local model fixtures for tests.

Everything here is built from scratch in-process: a byte-level BPE tokenizer is
trained on a corpus that ships in this file, and model weights are randomly
initialised from hand-written configs.  Nothing is ever fetched from a model hub.

Random tiny transformers tend to produce nearly uniform logits, which makes
greedy decoding fragile (argmax ties flip under tiny numerical differences such
as batching or padding) and tend to loop on one token.  The builders therefore
re-initialise the weights (see ``_init_weights``) so that logits have a standard
deviation of ``LOGIT_STD`` (top-1/top-2 gaps of ~2 on average) and outputs
depend on the context, giving robust, varied greedy continuations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "BOS_ID",
    "CAUSAL_ARCHS",
    "CORPUS",
    "EOS_ID",
    "PAD_ID",
    "SEQ2SEQ_ARCHS",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "build_tiny_causal_lm",
    "build_tiny_seq2seq_lm",
    "reference_greedy",
    "train_tiny_tokenizer",
]

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<s>", "<unk>")

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 256
LOGIT_STD = 10.0  # std of the logits over the vocabulary at init

CORPUS = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk. He \
carried a brass lantern, a notebook full of tide tables, and a thermos of \
strong black tea. From the gallery he could see the fishing boats returning \
to the harbour, their hulls painted red, green, and a faded shade of blue.

On Tuesdays the market square filled with stalls selling apples, pears, \
cheese, bread, honey, and hand-knitted scarves. Children chased pigeons \
between the fountains while their parents argued cheerfully about prices. \
"Twelve coins for a jar of honey?" one woman asked. "That's robbery!"

A server receives a request, tokenizes the prompt, and schedules it into a \
batch. Each step of decoding produces one new token per sequence; the loop \
stops when a stop condition is met, such as an end-of-sequence token, a \
maximum length of 128 or 2048 tokens, or a user-supplied stop string.

def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

Numbers and symbols matter too: 3.14159, 2.71828, 42, 1024, 65536, 1e-5, \
100%, $19.99, #hashtag, @mention, [brackets], {braces}, <angles>, a|b, \
x^2 + y^2 = z^2, and the path /usr/local/bin/python3.

Le café était fermé, alors nous avons marché jusqu'à la crêperie près de \
l'église. Über den Wolken muss die Freiheit wohl grenzenlos sein. El niño \
comió piñata y jalapeños en la mañana. São Paulo é uma cidade enorme. \
Dziękuję bardzo, Ålesund og Tromsø ligger i Norge.

東京は日本の首都です。今日はいい天気ですね。我喜欢学习新的语言。\
北京的秋天很美丽。서울은 한국의 수도입니다. Привет, как дела? \
สวัสดีชาวโลก. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया।

Emoji appear in chat logs all the time 😀 🎉 🚀 ❤️ 👍🏽 🧪 🐍 and \
sometimes in long runs like 🌧️🌦️🌤️☀️. Mathematical symbols such as \
∑, ∫, √, ≤, ≥, ≠, ∞, and π show up in technical writing as well.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen \
liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, \
judge my vow. The five boxing wizards jump quickly.

Once upon a time, in a valley surrounded by tall mountains, there lived an \
old clockmaker who repaired watches for the whole village. Every clock in \
his workshop ticked at a slightly different pace, and he liked it that way; \
he said the room sounded like rain on a tin roof.
"""


@functools.cache
def _train_bpe(vocab_size: int) -> Tokenizer:
    """Train (once per process and vocab size) the raw byte-level BPE backend."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = backend.token_to_id(token)
        if actual_id != expected_id:
            raise RuntimeError(f"{token!r} got id {actual_id}, expected {expected_id}")
    return backend


def train_tiny_tokenizer(vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """Return a byte-level BPE tokenizer trained on :data:`CORPUS`.

    Special tokens are ``<pad>``=0, ``</s>``=1 (eos), ``<s>``=2 (bos) and
    ``<unk>``=3.  No post-processor is installed, so encoding never adds
    bos/eos.  Training is cached per ``vocab_size``; every call returns a fresh
    wrapper, so callers may mutate it (e.g. ``padding_side``) freely.
    """
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size),  # deep-copied by the wrapper
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@dataclasses.dataclass(frozen=True)
class _ArchSpec:
    """How to build one tiny architecture."""

    config_cls: type[transformers.PretrainedConfig]
    config_kwargs: dict[str, Any]
    # Std multiplier for linear weights: > 1 strengthens context mixing (less
    # looping) for pre-norm models; post-norm BART degenerates unless < 1.
    linear_gain: float = 2.0


_FFN = 4 * HIDDEN_SIZE

# LLaMA's configuration keys, which Mistral and Qwen2 share.
_LLAMA_LAYOUT = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": _FFN,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
}

_CAUSAL_SPECS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(transformers.LlamaConfig, _LLAMA_LAYOUT),
    # LLaMA's layout with sliding-window attention (pass ``sliding_window``), and Qwen2's, whose
    # ``layer_types`` mix sliding-window and full-attention layers.
    "mistral": _ArchSpec(transformers.MistralConfig, _LLAMA_LAYOUT),
    "qwen2": _ArchSpec(transformers.Qwen2Config, _LLAMA_LAYOUT),
    "gpt2": _ArchSpec(
        transformers.GPT2Config,
        {
            "n_embd": HIDDEN_SIZE,
            "n_layer": NUM_LAYERS,
            "n_head": NUM_HEADS,
            "n_positions": MAX_POSITIONS,
        },
    ),
    "bloom": _ArchSpec(
        transformers.BloomConfig,
        {"hidden_size": HIDDEN_SIZE, "n_layer": NUM_LAYERS, "n_head": NUM_HEADS},
    ),
    "falcon": _ArchSpec(
        transformers.FalconConfig,
        {
            "hidden_size": HIDDEN_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "gpt_neox": _ArchSpec(
        transformers.GPTNeoXConfig,
        {
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": _FFN,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "opt": _ArchSpec(
        transformers.OPTConfig,
        {
            "hidden_size": HIDDEN_SIZE,
            "word_embed_proj_dim": HIDDEN_SIZE,
            "ffn_dim": _FFN,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
}

_SEQ2SEQ_SPECS: dict[str, _ArchSpec] = {
    "t5": _ArchSpec(
        transformers.T5Config,
        {
            "d_model": HIDDEN_SIZE,
            "d_kv": HIDDEN_SIZE // NUM_HEADS,
            "d_ff": _FFN,
            "num_layers": NUM_LAYERS,
            "num_decoder_layers": NUM_LAYERS,
            "num_heads": NUM_HEADS,
        },
    ),
    "bart": _ArchSpec(
        transformers.BartConfig,
        {
            "d_model": HIDDEN_SIZE,
            "encoder_layers": NUM_LAYERS,
            "decoder_layers": NUM_LAYERS,
            "encoder_attention_heads": NUM_HEADS,
            "decoder_attention_heads": NUM_HEADS,
            "encoder_ffn_dim": _FFN,
            "decoder_ffn_dim": _FFN,
            "max_position_embeddings": MAX_POSITIONS,
            "forced_eos_token_id": None,
        },
        linear_gain=0.5,
    ),
}

CAUSAL_ARCHS: tuple[str, ...] = tuple(_CAUSAL_SPECS)
SEQ2SEQ_ARCHS: tuple[str, ...] = tuple(_SEQ2SEQ_SPECS)


def _final_norm(model: transformers.PreTrainedModel) -> nn.Module:
    """Return the last normalisation module run in a forward pass (feeds lm_head)."""
    executed: list[nn.Module] = []
    hooks = [
        module.register_forward_hook(lambda mod, _args, _out: executed.append(mod))
        for module in model.modules()
        if "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter)
    ]
    try:
        model(**_dummy_inputs(model))
    finally:
        for hook in hooks:
            hook.remove()
    if not executed:
        raise RuntimeError(f"no normalisation layer found in {type(model).__name__}")
    return executed[-1]


def _dummy_inputs(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    ids = torch.arange(4, 36).reshape(2, 16)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    return inputs


@torch.no_grad()
def _init_weights(model: transformers.PreTrainedModel, linear_gain: float, logit_std: float) -> None:
    """Re-initialise weights so greedy decoding is robust and varied.

    * Linear-style weights get std ``linear_gain/sqrt(fan_in)`` and embedding
      tables std 1, so the blocks contribute to the residual stream at least as
      much as the token embedding (outputs depend on context, not only on the
      last token).
    * The rows of pad/bos/unk in the output embeddings are zeroed, so those
      tokens are (practically) never generated; eos stays an ordinary token.
    * The final norm's weight is drawn from a zero-mean normal and rescaled so
      logits have std ``logit_std``.  Zero mean decorrelates the final hidden
      state from the current token's (tied) embedding, which otherwise makes
      tied-embedding models repeat the input token forever; the large std makes
      argmax margins big enough to survive batching/padding numerics.
    """
    output = model.get_output_embeddings()
    for module in model.modules():
        if module is output:
            continue  # may share its weight with the input embeddings; see below
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, linear_gain / math.sqrt(module.in_features))
        elif isinstance(module, Conv1D):  # GPT-2 style, weight is (in, out)
            module.weight.normal_(0.0, linear_gain / math.sqrt(module.weight.shape[0]))
    output.weight.normal_(0.0, 1.0)
    output.weight[[PAD_ID, BOS_ID, UNK_ID]] = 0.0

    final_norm = _final_norm(model)
    final_norm.weight.normal_(0.0, 1.0)
    if getattr(final_norm, "bias", None) is not None:
        final_norm.bias.zero_()
    logits = model(**_dummy_inputs(model)).logits
    final_norm.weight.mul_(logit_std / logits.std().item())


def _auto_class(seq2seq: bool) -> type:
    if seq2seq:
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def _build(
    dest: pathlib.Path,
    spec: _ArchSpec,
    seq2seq: bool,
    seed: int,
    logit_std: float,
    overrides: dict[str, Any],
) -> pathlib.Path:
    tokenizer = train_tiny_tokenizer()
    kwargs: dict[str, Any] = {
        **spec.config_kwargs,
        "vocab_size": len(tokenizer),
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    if seq2seq:
        kwargs["decoder_start_token_id"] = PAD_ID
    kwargs.update(overrides)
    config = spec.config_cls(**kwargs)

    torch.manual_seed(seed)
    model = _auto_class(seq2seq).from_config(config, dtype=torch.float32)
    model.eval()  # no dropout in the calibration forward passes
    _init_weights(model, spec.linear_gain, logit_std)
    # Pin the generation defaults instead of inheriting arch-specific ones
    # (e.g. BART's forced_eos_token_id) so greedy decoding is plain argmax.
    model.generation_config = transformers.GenerationConfig(
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        decoder_start_token_id=getattr(config, "decoder_start_token_id", None),
    )

    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (`safe_serialization` is gone).
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if not (dest / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained did not write {dest / 'model.safetensors'}")
    return dest


def _spec(arch: str, specs: dict[str, _ArchSpec]) -> _ArchSpec:
    try:
        return specs[arch]
    except KeyError:
        raise ValueError(f"unsupported arch {arch!r}; choose from {sorted(specs)}") from None


def build_tiny_causal_lm(
    dest: pathlib.Path,
    arch: str = "llama",
    seed: int = 0,
    logit_std: float = LOGIT_STD,
    **config_overrides: Any,
) -> pathlib.Path:
    """Build and save a tiny random decoder-only LM (plus tokenizer) into ``dest``.

    ``arch`` is one of :data:`CAUSAL_ARCHS`.  ``config_overrides`` are passed to
    the config constructor (after the tiny defaults).  Returns ``dest``.
    """
    spec = _spec(arch, _CAUSAL_SPECS)
    return _build(dest, spec, False, seed, logit_std, config_overrides)


def build_tiny_seq2seq_lm(
    dest: pathlib.Path,
    arch: str = "t5",
    seed: int = 0,
    logit_std: float = LOGIT_STD,
    **config_overrides: Any,
) -> pathlib.Path:
    """Build and save a tiny random encoder-decoder LM (plus tokenizer) into ``dest``.

    ``arch`` is one of :data:`SEQ2SEQ_ARCHS`; ``decoder_start_token_id`` is the
    pad id (0).  Returns ``dest``.
    """
    spec = _spec(arch, _SEQ2SEQ_SPECS)
    return _build(dest, spec, True, seed, logit_std, config_overrides)


def _is_encoder_decoder(model_dir: pathlib.Path) -> bool:
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    return bool(config.get("is_encoder_decoder", False))


@torch.no_grad()
def reference_greedy(
    model_dir: pathlib.Path,
    prompts: list[str],
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy-decode each prompt on its own with ``transformers`` ``generate``.

    Each prompt is run as a batch of one without padding.  Only the newly
    generated ids are returned (for seq2seq models the decoder start token is
    dropped); an eos token, if produced, is included and ends the sequence.
    """
    seq2seq = _is_encoder_decoder(model_dir)
    model = _auto_class(seq2seq).from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    results: list[list[int]] = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
        prefix = 1 if seq2seq else input_ids.shape[1]
        results.append(output[0, prefix:].tolist())
    return results


def reference_texts(model_dir: pathlib.Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The text of each prompt's :func:`reference_greedy` tokens, as the server answers it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        for ids in reference_greedy(model_dir, prompts, max_new_tokens)
    ]
