"""Text conditioning: the open_clip text tower and the table of precomputed caption embeddings.

``load_text_encoder(model, pretrained, ...)`` builds only the text transformer of an open_clip
architecture (never the vision tower). With ``pretrained=None`` its weights are a seeded random
initialisation, which needs no download; a pretrained tag (resolved through open_clip's registry
and cache) or a local weights file goes through the same constructor and then loads the text
weights from the full CLIP checkpoint.

``embed_captions`` runs it once per unique caption and writes an ``EmbeddingTable``: per-token
hidden states (cut to the longest caption, with a padding mask) and pooled embeddings in float16,
the empty caption in row 0 (for classifier-free guidance), and a fingerprint of everything that
determines the numbers. Training reads the table and never loads the text encoder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion.artifacts import sha256_file
from diffusion.errors import MissingInputError, T2IError
from diffusion.data.shards import caption_id

EMPTY_CAPTION = ""
TABLE_FILES = ("embeddings.safetensors", "captions.parquet", "fingerprint.json")
WORD_VECTORS = "token_embedding"  # embed.layer: each word's vector (after ln_final), pooled = their mean


def model_config(model: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = open_clip.list_models()
        close = [m for m in known if m.lower().startswith(model.lower()[:5])][:5] or known[:5]
        raise T2IError(f"unknown open_clip model {model!r} (e.g. {', '.join(close)}; see open_clip.list_models())")
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise T2IError(
            f"open_clip model {model!r} uses a Hugging Face text tower, which needs a download; "
            "choose a model with a CLIP text transformer (e.g. ViT-B-32, ViT-S-32-alt)"
        )
    return cfg


def _resolve_weights(model: str, pretrained: str) -> tuple[Path, str]:
    """A pretrained tag or a local file -> (path of the checkpoint file, fingerprint id)."""
    import open_clip

    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, f"file:sha256:{sha256_file(path)}"
    if "/" in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors")):
        raise T2IError(f"embed.pretrained: weights file not found: {pretrained}")
    pcfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise T2IError(
            f"embed.pretrained: unknown tag {pretrained!r} for {model} "
            f"(known: {', '.join(tags) or 'none'}; or give a local weights file)"
        )
    try:
        file = open_clip.download_pretrained(pcfg)
    except Exception as e:  # network or hub errors: say what to do instead
        raise T2IError(
            f"could not fetch pretrained weights {model}/{pretrained} ({type(e).__name__}); "
            "without internet, download the checkpoint elsewhere and set embed.pretrained to its path"
        ) from None
    if not file:
        raise T2IError(f"could not fetch pretrained weights {model}/{pretrained}")
    return Path(file), f"tag:{pretrained}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint without unpickling code (safetensors or torch weights_only)."""
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise T2IError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise T2IError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _text_state(sd: dict[str, torch.Tensor], wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """Pick the text-tower weights out of a full CLIP state dict.

    CLIP keeps its text transformer at the top level (token_embedding, transformer, ln_final,
    text_projection, ...); CustomTextCLIP nests it under ``text.``.
    """
    wanted = set(wanted)
    if any(k.startswith("text.") for k in sd):
        sd = {k[5:]: v for k, v in sd.items() if k.startswith("text.")}
    picked = {k: v for k, v in sd.items() if k in wanted}
    missing = wanted - set(picked)
    if missing:
        raise T2IError(f"weights file lacks text-tower keys, e.g. {sorted(missing)[:3]} (wrong model?)")
    return picked


@dataclass
class TextEncoder:
    model: torch.nn.Module  # open_clip TextTransformer
    tokenizer: object
    layer: str
    fingerprint: dict
    device: torch.device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> tokens (N, L, D) float32, mask (N, L) bool, pooled (N, E) float32.

        L is the longest caption's token count (start + words + end); the causal text
        transformer makes states up to a caption's end token independent of the padding after it.
        With ``layer == "token_embedding"`` the tokens are the tower's word vectors (after
        ln_final), each word's the same wherever it stands, and pooled is their mean over the caption.
        """
        ids = self.tokenizer(captions).to(self.device)  # (N, context_length)
        lengths = ids.argmax(dim=-1) + 1  # end-of-text has the largest id in CLIP's vocabulary
        length = int(lengths.max())
        mask = torch.arange(length, device=ids.device)[None] < lengths[:, None]
        if self.layer == WORD_VECTORS:
            tokens = self.model.ln_final(self.model.token_embedding(ids[:, :length]))
            pooled = (tokens * mask[..., None]).sum(1) / lengths[:, None]
            return tokens.float(), mask, pooled.float()
        n_layers = len(self.model.transformer.resblocks)
        index = n_layers - 1 if self.layer == "last" else n_layers - 2
        tokens, pooled = _forward(self.model, ids, index, length)
        return tokens[:, :length].float(), mask, pooled.float()


def _forward(tower, ids: torch.Tensor, index: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``index``'s states (after ln_final) and the pooled features of ``ids``, running the
    causal transformer on the first ``length`` positions only: states up to a caption's end token
    do not depend on what follows, so this is the full-context result at a fraction of the cost
    (short captions in a 77-token context). Towers with a padding mask or a class token take
    open_clip's own full-length path."""
    if tower.cls_emb is not None or getattr(tower, "use_pad_mask", False) or tower.attn_mask is None:
        out = tower.forward_intermediates(ids, indices=[index], normalize_intermediates=True, output_fmt="NLC")
        return out["text_intermediates"][0], out["text_features"]
    ids = ids[:, :length]
    x = tower.token_embedding(ids) + tower.positional_embedding[:length]
    x, inter = tower.transformer.forward_intermediates(x, attn_mask=tower.attn_mask[:length, :length],
                                                       indices=[index])
    pooled = tower.ln_final(x)[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
    if tower.text_projection is not None:
        pooled = tower.text_projection(pooled) if isinstance(tower.text_projection, torch.nn.Linear) \
            else pooled @ tower.text_projection
    return tower.ln_final(inter[0]), pooled


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise T2IError("device: cuda was requested but no CUDA GPU is available (use auto or cpu)")
    return torch.device(device)


def resolve_layer(layer: str, pretrained: str | None) -> str:
    """``auto``: the last layer of pretrained weights, the word vectors of a random tower.

    A randomly initialised transformer knows nothing about language: its blocks only mix each
    word's vector with the words before it in a random way, so the same word looks different in
    every sentence frame and a denoiser trained on some frames misreads others. Its word vectors
    (``token_embedding``) are the same wherever a word stands. Trained weights make the last
    layer's states carry meaning in context, which is what a pretrained tower is for."""
    if layer == "auto":
        return WORD_VECTORS if pretrained is None else "last"
    return layer


def load_text_encoder(model: str, pretrained: str | None = None, seed: int = 0, layer: str = "auto",
                      device: str = "cpu", fingerprint: dict | None = None) -> TextEncoder:
    """The text tower of ``model`` (an open_clip architecture name).

    ``pretrained``: None for the seeded random initialisation, an open_clip tag, or a weights file
    (a full CLIP checkpoint or a saved text tower). ``layer``: which states condition the model
    (``resolve_layer``). ``fingerprint`` keeps the identity of an encoder whose weights were saved
    and are now reloaded from a file (the registered MLflow model).
    """
    layer = resolve_layer(layer, pretrained)
    import open_clip
    from open_clip.model import _build_text_tower

    cfg = model_config(model)
    if pretrained is None:
        weights, fp_weights = None, f"random:seed={seed}:torch={torch.__version__}"
    else:
        weights, fp_weights = _resolve_weights(model, pretrained)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the random initialisation is a pure function of the seed
    try:
        tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    finally:
        torch.random.set_rng_state(gen_state)
    if weights is not None:
        tower.load_state_dict(_text_state(_read_state_dict(weights), tower.state_dict().keys()))
    dev = pick_device(device)
    tower = tower.to(dev).eval()
    fingerprint = fingerprint or {
        "model": model,
        "weights": fp_weights,
        "layer": layer,
        "context_length": tower.context_length,
        "width": tower.width,
        "embed_dim": tower.output_dim,
        "dtype": "float16",
        "open_clip": open_clip.__version__,
    }
    return TextEncoder(tower, open_clip.get_tokenizer(model), layer, fingerprint, dev)


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The embedding table


@dataclass
class EmbeddingTable:
    """Per-token states, masks and pooled vectors for a set of unique captions (row 0 = "")."""

    tokens: torch.Tensor  # (N, L, D) float16
    mask: torch.Tensor  # (N, L) bool
    pooled: torch.Tensor  # (N, E) float16
    rows: dict[str, int]  # caption -> row
    fingerprint: dict

    @property
    def empty_row(self) -> int:
        return self.rows[EMPTY_CAPTION]

    def row(self, caption: str) -> int:
        try:
            return self.rows[caption]
        except KeyError:
            raise T2IError(f"caption has no embedding (re-run embed): {caption[:80]!r}") from None

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": self.tokens.contiguous(), "mask": self.mask.to(torch.uint8).contiguous(),
                   "pooled": self.pooled.contiguous()}, str(out / "embeddings.safetensors"),
                  metadata={"fingerprint": fingerprint_id(self.fingerprint)})
        captions = sorted(self.rows, key=self.rows.get)
        pq.write_table(pa.table({"row": [self.rows[c] for c in captions], "caption": captions,
                                 "caption_id": [caption_id(c) for c in captions]}), out / "captions.parquet")
        (out / "fingerprint.json").write_text(
            json.dumps({**self.fingerprint, "id": fingerprint_id(self.fingerprint)}, indent=2) + "\n"
        )

    @classmethod
    def load(cls, directory: str | Path) -> "EmbeddingTable":
        d = Path(directory)
        for f in TABLE_FILES:
            if not (d / f).is_file():
                raise MissingInputError(f"embeddings not found: {d / f} (run the embed stage first)")
        t = load_file(str(d / "embeddings.safetensors"))
        cap = pq.read_table(d / "captions.parquet").to_pydict()
        fp = json.loads((d / "fingerprint.json").read_text())
        fp.pop("id", None)
        return cls(t["tokens"], t["mask"].bool(), t["pooled"], dict(zip(cap["caption"], cap["row"])), fp)


def embed_captions(encoder: TextEncoder, captions: Iterable[str], batch_size: int = 256,
                   progress: bool = True) -> EmbeddingTable:
    """Encode each unique caption once (plus the empty caption as row 0). Says so, in one line
    each, where the captions cannot teach prompts (``caption_warnings``)."""
    captions = list(captions)
    for line in caption_warnings(encoder, captions):
        print(line)
    # by length, so a batch runs the transformer on about as many positions as its captions have
    unique = [EMPTY_CAPTION] + sorted(set(captions) - {EMPTY_CAPTION}, key=lambda c: (len(c), c))
    toks, masks, pooled = [], [], []
    for i in tqdm(range(0, len(unique), batch_size), desc="embed", unit="batch", mininterval=1.0,
                  disable=not progress):
        t, m, p = encoder.encode(unique[i:i + batch_size])
        toks.append(t.cpu())
        masks.append(m.cpu())
        pooled.append(p.cpu())
    length = max(t.shape[1] for t in toks)
    tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in toks])
    mask = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks])
    tokens = tokens * mask[..., None]  # zero the padding so stored values do not depend on batching
    return EmbeddingTable(tokens.half(), mask, torch.cat(pooled).half(),
                          {c: i for i, c in enumerate(unique)}, dict(encoder.fingerprint))


UNKNOWN_SHARE = 0.5  # warn when more of the caption tokens than this are byte pieces
_RATE_CAPTIONS = 2000  # the unique captions the unknown-token share is measured on (the first, sorted)


def caption_warnings(encoder: TextEncoder, captions: list[str]) -> list[str]:
    """One line per reason the captions cannot teach the model to follow prompts: every caption
    the same, or most tokens byte pieces of characters the tokenizer has no token for."""
    lines = []
    unique = sorted(set(captions) - {EMPTY_CAPTION})
    if len(captions) > 1 and len(unique) == 1:
        lines.append(f"embed: every one of the {len(captions)} captions is {unique[0][:60]!r}: the model cannot "
                     "learn to follow prompts from this data, only to draw its images")
    share = unknown_token_share(encoder.tokenizer, unique[:_RATE_CAPTIONS])
    if share is not None and share > UNKNOWN_SHARE:
        lines.append(f"embed: {share:.0%} of the caption tokens are byte pieces of characters that the "
                     f"{encoder.fingerprint.get('model')} tokenizer has no token for (a script or emoji it "
                     "barely knows): the text tower reads such captions poorly; caption in a language it "
                     "knows, or use a tower trained on this script")
    return lines


def unknown_token_share(tokenizer, captions: list[str]) -> float | None:
    """The share of the captions' tokens that are not a whole character or word: open_clip's
    byte-level BPE has no unknown token, it spells a character it has no token for in pieces of
    its UTF-8 bytes, each meaningless alone. None for a tokenizer without a byte-level vocabulary."""
    decoder, byte_decoder = getattr(tokenizer, "decoder", None), getattr(tokenizer, "byte_decoder", None)
    if decoder is None or byte_decoder is None or not hasattr(tokenizer, "encode"):
        return None
    pieces = unknown = 0
    for caption in captions:
        for i in tokenizer.encode(caption):
            raw = bytes(byte_decoder[c] for c in decoder[i].removesuffix("</w>"))
            pieces += 1
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                unknown += 1
    return unknown / pieces if pieces else None


def captions_from_index(shard_root: str | Path) -> list[str]:
    """All captions of all splits, read from the parquet indexes that ingest wrote."""
    from diffusion.artifacts import index_files

    captions: list[str] = []
    for path in index_files(shard_root):
        captions.extend(pq.read_table(path, columns=["caption"]).column("caption").to_pylist())
    return captions
