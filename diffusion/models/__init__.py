"""Models: the denoising networks and the diffusion maths around them.

Owns: the UNet (``unet``) and the DiT (``dit``), the noise schedules (``schedules``), the
preconditioning that turns a network into a denoiser (``precond``), the training loss (``loss``),
and building, saving and loading a trained denoiser (``store``).

May import: ``diffusion.errors``, ``diffusion.config``, ``diffusion.artifacts``, ``diffusion.data``.
"""
