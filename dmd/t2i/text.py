"""Prompts -> the condition a Stable Diffusion UNet takes, and the null condition of CFG.

SD1.5: ``{"encoder_hidden_states": last hidden state of the CLIP text encoder}``; the null
condition is the empty prompt's embedding. SDXL: the penultimate hidden states of both text
encoders, concatenated, plus ``added_cond_kwargs`` = the second encoder's pooled projection
(``text_embeds``) and the six size/crop ``time_ids``; the null condition is zeros (the
pipelines' ``force_zeros_for_empty_prompt``), with the same time ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from dmd.conditioning import concat_conditions, flatten_condition
from dmd.teachers import weights_digest

log = logging.getLogger(__name__)


class PromptEncoder:
    """Tokenizer(s) + frozen text encoder(s) of a pipeline, answering conditions on the CPU
    (float32) for a list of prompts."""

    def __init__(self, tokenizers, text_encoders, image_size: int, zeros_for_empty_prompt: bool | None = None):
        self.tokenizers, self.text_encoders = list(tokenizers), [e.requires_grad_(False).eval() for e in text_encoders]
        self.xl = len(self.text_encoders) == 2
        self.image_size = image_size
        self.zeros_for_empty_prompt = self.xl if zeros_for_empty_prompt is None else zeros_for_empty_prompt

    @classmethod
    def from_pretrained(cls, path: str, image_size: int, dtype: torch.dtype = torch.float32) -> PromptEncoder:
        """Load ``tokenizer[_2]`` / ``text_encoder[_2]`` of a pipeline folder or hub id."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers, encoders = [], []
        for suffix, model_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
            if suffix and not _has_subfolder(path, "text_encoder_2"):
                break
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer" + suffix))
            encoders.append(model_cls.from_pretrained(path, subfolder="text_encoder" + suffix, dtype=dtype))
        return cls(tokenizers, encoders, image_size)

    @property
    def digest(self) -> str:
        """Identifies the encoders' weights and tokenizers (for caches of embeddings)."""
        h = hashlib.sha256()
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
            h.update(weights_digest(enc).encode())
        h.update(f"{self.image_size}".encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch_size: int = 64) -> dict:
        if isinstance(prompts, str):
            prompts = [prompts]
        return concat_conditions(*(self._encode(prompts[i:i + batch_size])
                                   for i in range(0, len(prompts), batch_size)))

    def _encode(self, prompts: list[str]) -> dict:
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=self.xl)
            hidden.append((out.hidden_states[-2] if self.xl else out.last_hidden_state).float().cpu())
            if self.xl:
                pooled = out.text_embeds.float().cpu() if hasattr(out, "text_embeds") else out.pooler_output.float().cpu()
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if self.xl:
            cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids(len(prompts))}
        return cond

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's (original size, crop top-left, target size) for unconditioned square images."""
        s = float(self.image_size)
        return torch.tensor([[s, s, 0.0, 0.0, s, s]]).expand(n, 6).contiguous()

    def null_condition(self) -> dict:
        """The batch-1 condition CFG subtracts: the empty prompt's embedding, or zeros (SDXL)."""
        cond = self([""])
        if self.zeros_for_empty_prompt:
            cond = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
                    "added_cond_kwargs": {"text_embeds": torch.zeros_like(cond["added_cond_kwargs"]["text_embeds"]),
                                          "time_ids": cond["added_cond_kwargs"]["time_ids"]}}
        return cond


def _has_subfolder(path: str, name: str) -> bool:
    local = Path(path).expanduser()
    if local.is_dir():
        return (local / name).is_dir()
    from huggingface_hub import file_exists, try_to_load_from_cache

    try:
        return file_exists(path, f"{name}/config.json")
    except Exception:  # offline: answer from the local hub cache
        return isinstance(try_to_load_from_cache(path, f"{name}/config.json"), str)


def cache_embeddings(encoder: PromptEncoder, prompts: list[str], cache_dir: str | Path,
                     chunk: int = 1024) -> Path:
    """Folder of ``encoder(prompts)`` (flattened, :func:`dmd.files.save_arrays`), computed once
    per (encoders, prompt list) under ``<cache_dir>/prompt_embeddings/``. Read it memory-mapped
    (:func:`dmd.files.load_arrays`): a LAION-sized prompt list is never held in memory, nor
    copied per rank."""
    from tqdm.auto import tqdm

    from dmd.files import save_arrays

    key = hashlib.sha256((encoder.digest + json.dumps(list(prompts))).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "prompt_embeddings" / key
    if (folder / "arrays.json").is_file():
        log.info("Prompt embeddings: reusing %s", folder)
        return folder
    starts = range(0, len(prompts), chunk)
    save_arrays((flatten_condition(encoder(list(prompts[i:i + chunk])))
                 for i in tqdm(starts, desc="Encoding prompts", unit="chunk", disable=len(starts) < 2)),
                folder, what="prompts")
    log.info("Prompt embeddings: %d prompts encoded and cached at %s", len(prompts), folder)
    return folder
