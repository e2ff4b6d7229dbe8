"""Sampling: prompts in, images out.

Owns: the samplers (DDPM, DDIM, Euler, Heun, DPM-Solver++) over a denoiser (``samplers``), and the
one generate path every caller uses: prompt encoding, classifier-free guidance, seeds, grids
(``generate``).

May import: the foundation (errors, config, artifacts), ``diffusion.data``, ``diffusion.models``.
"""
