"""Evaluation: how good a model is, measured by the project.

Owns: the sample stage's evaluation images (``sample``), the judge trained on the real built-in
data (``judge``), the image-text retrieval evaluator trained on any data's real pairs
(``retrieval``: R-precision and FD), fidelity and adherence measures (``metrics``), the evaluate stage
(``evaluate``), its readable page (``report``) and the sampler sweep (``sweep``).

May import: the foundation, ``diffusion.data``, ``diffusion.models``, ``diffusion.sampling``.
"""
