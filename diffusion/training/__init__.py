"""Training: the loop that turns shards and embeddings into a denoiser.

Owns: the training loop, checkpoints and exact resume (``train``), the shard reader that feeds it
(``train_data``), and the torchrun launch (``distributed``). Reports through a logger object, so
MLflow is wired in from outside (``diffusion.registry.tracking``).

May import: the foundation (errors, config, artifacts), ``diffusion.data``, ``diffusion.models``.
"""
