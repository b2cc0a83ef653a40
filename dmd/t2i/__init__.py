"""Latent text-to-image distillation: Stable Diffusion (1.5 / XL) teachers and their pieces.

- :mod:`dmd.t2i.text`: tokenizers + text encoders -> the UNet's condition (and the null one).
- :mod:`dmd.t2i.teacher`: a diffusers pipeline folder (or hub id) as a latent :class:`Teacher`.
- :mod:`dmd.t2i.tiny`: tiny random SD1.5-like / SDXL-like pipelines for tests and ``t2i_tiny``.
- :mod:`dmd.t2i.lora`: LoRA adapters (peft) on the generator, saved as diffusers loads them.
"""
