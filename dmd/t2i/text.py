"""Prompts -> the condition a text-to-image network takes, and the null condition of CFG.

SD1.5: ``{"encoder_hidden_states": last hidden state of the CLIP text encoder}``; the null
condition is the empty prompt's embedding. SDXL: the penultimate hidden states of both text
encoders, concatenated, plus ``added_cond_kwargs`` = the second encoder's pooled projection
(``text_embeds``) and the six size/crop ``time_ids``; the null condition is zeros (the
pipelines' ``force_zeros_for_empty_prompt``), with the same time ids. SD3 and Flux:
``encoder_hidden_states`` (text token sequence) and ``pooled_projections``, as their pipelines'
``encode_prompt`` builds them; the null condition is the empty prompt's.
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

# The pipelines' default max_sequence_length of T5 (tokens beyond are truncated).
SD3_MAX_SEQUENCE_LENGTH, FLUX_MAX_SEQUENCE_LENGTH = 256, 512


class PromptEncoder:
    """Tokenizer(s) + frozen text encoder(s) of a pipeline, answering conditions on the CPU
    (float32) for a list of prompts, in the keyword arguments of the family's network."""

    def __init__(self, tokenizers, text_encoders, image_size: int, family: str):
        self.tokenizers, self.text_encoders = list(tokenizers), [e.requires_grad_(False).eval() for e in text_encoders]
        self.family, self.image_size = family, image_size

    @classmethod
    def from_pretrained(cls, path: str, image_size: int, dtype: torch.dtype = torch.float32) -> PromptEncoder:
        """Load every ``tokenizer[_k]`` / ``text_encoder[_k]`` of a pipeline folder or hub id."""
        import transformers

        from dmd.t2i.families import family_of

        family = family_of(path)
        tokenizers, encoders = [], []
        for i, (encoder_cls, tokenizer_cls) in enumerate(family.text_encoders):
            suffix = f"_{i + 1}" if i else ""
            tokenizers.append(getattr(transformers, tokenizer_cls).from_pretrained(path, subfolder="tokenizer" + suffix))
            encoders.append(getattr(transformers, encoder_cls).from_pretrained(
                path, subfolder="text_encoder" + suffix, dtype=dtype))
        return cls(tokenizers, encoders, image_size, family.name)

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

    def _run(self, k: int, prompts: list[str], max_length: int | None = None):
        """Encoder k's output for ``prompts`` padded to its tokenizer's length (capped at
        ``max_length``: the pipelines' ``max_sequence_length`` for T5)."""
        tok, enc = self.tokenizers[k], self.text_encoders[k]
        length = min(tok.model_max_length, max_length or tok.model_max_length)
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        return enc(ids, output_hidden_states=True)

    def _encode(self, prompts: list[str]) -> dict:
        if self.family == "sd3":
            return self._encode_sd3(prompts)
        if self.family == "flux":
            return self._encode_flux(prompts)
        xl = self.family == "sdxl"
        outs = [self._run(k, prompts) for k in range(len(self.text_encoders))]
        hidden = [(o.hidden_states[-2] if xl else o.last_hidden_state).float().cpu() for o in outs]
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if xl:
            pooled = outs[-1].text_embeds if hasattr(outs[-1], "text_embeds") else outs[-1].pooler_output
            cond["added_cond_kwargs"] = {"text_embeds": pooled.float().cpu(), "time_ids": self.time_ids(len(prompts))}
        return cond

    def _encode_sd3(self, prompts: list[str]) -> dict:
        """StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states side by side,
        zero-padded to T5's width and followed by T5's sequence; pooled = both projections."""
        clips = [self._run(k, prompts) for k in (0, 1)]
        t5 = self._run(2, prompts, SD3_MAX_SEQUENCE_LENGTH).last_hidden_state.float()
        clip = torch.cat([o.hidden_states[-2].float() for o in clips], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2).cpu(),
                "pooled_projections": torch.cat([o.text_embeds.float() for o in clips], dim=-1).cpu()}

    def _encode_flux(self, prompts: list[str]) -> dict:
        """FluxPipeline.encode_prompt: CLIP's pooled output and T5's sequence."""
        pooled = self._run(0, prompts).pooler_output.float()
        t5 = self._run(1, prompts, FLUX_MAX_SEQUENCE_LENGTH).last_hidden_state.float()
        return {"encoder_hidden_states": t5.cpu(), "pooled_projections": pooled.cpu()}

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's (original size, crop top-left, target size) for unconditioned square images."""
        s = float(self.image_size)
        return torch.tensor([[s, s, 0.0, 0.0, s, s]]).expand(n, 6).contiguous()

    def null_condition(self) -> dict:
        """The batch-1 condition CFG subtracts: the empty prompt's embedding (SD1.5, SD3 and
        Flux encode the empty negative prompt), or zeros (SDXL's force_zeros_for_empty_prompt)."""
        cond = self([""])
        if self.family == "sdxl":
            cond = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
                    "added_cond_kwargs": {"text_embeds": torch.zeros_like(cond["added_cond_kwargs"]["text_embeds"]),
                                          "time_ids": cond["added_cond_kwargs"]["time_ids"]}}
        return cond


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
