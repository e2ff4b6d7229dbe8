"""Data: everything a dataset is before a model sees it.

Owns: ingest (any source -> WebDataset shards: ``ingest/``), the shard format (``shards``), the
built-in shapes dataset and its captions (``shapes``, ``captions``), the text tower and the caption
embeddings (``text``), and the optional VAE latents (``latents``).

May import: ``diffusion.errors``, ``diffusion.config``, ``diffusion.artifacts``; nothing above.
"""
