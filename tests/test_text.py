import json

import open_clip
import pytest
import torch

from diffusion.errors import T2IError
from diffusion.text import EmbeddingTable, embed_captions, fingerprint_id, load_text_encoder, model_config

MODEL = "ViT-S-32-alt"


def test_random_init_is_a_pure_function_of_the_seed(text_encoder):
    again = load_text_encoder(MODEL, seed=0)
    other = load_text_encoder(MODEL, seed=1)
    a, b, c = (e.encode(["a red circle"])[2] for e in (text_encoder, again, other))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert text_encoder.fingerprint == again.fingerprint != other.fingerprint


def test_local_checkpoint_matches_open_clip_encode_text(tmp_path):
    """A full CLIP checkpoint file loads through the same constructor and gives open_clip's numbers."""
    torch.manual_seed(123)
    clip = open_clip.create_model(MODEL).eval()
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    enc = load_text_encoder(MODEL, pretrained=str(path))
    prompts = ["a large red circle on the left", "two words"]
    ids = open_clip.get_tokenizer(MODEL)(prompts)
    with torch.no_grad():
        expected = clip.encode_text(ids)
    tokens, mask, pooled = enc.encode(prompts)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    assert enc.fingerprint["weights"].startswith("file:sha256:")
    # last-layer tokens are the ln_final output open_clip pools from
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    torch.testing.assert_close(tokens[0, : mask[0].sum()], x[0, : mask[0].sum()], rtol=1e-5, atol=1e-5)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(T2IError, match="unknown open_clip model 'ViT-Q-99'"):
        model_config("ViT-Q-99")
    with pytest.raises(T2IError, match="weights file not found"):
        load_text_encoder(MODEL, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(T2IError, match="unknown tag 'nope'"):
        load_text_encoder(MODEL, pretrained="nope")
    junk = tmp_path / "junk.pt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, junk)
    with pytest.raises(T2IError, match="lacks text-tower keys"):
        load_text_encoder(MODEL, pretrained=str(junk))


def test_table_holds_unique_captions_once_plus_empty_row(text_encoder, tmp_path):
    caps = ["a red circle", "a blue square on the right", "a red circle"]
    table = embed_captions(text_encoder, caps, batch_size=1)
    assert table.rows[""] == 0 and len(table.rows) == 3
    assert table.tokens.dtype == torch.float16 and table.pooled.dtype == torch.float16
    # batching does not change the numbers (the causal tower ignores padding after the end token)
    together = embed_captions(text_encoder, caps, batch_size=8)
    torch.testing.assert_close(table.tokens, together.tokens, rtol=0, atol=2e-3)
    # padding positions are masked and zero
    r = table.rows["a red circle"]
    n = int(table.mask[r].sum())
    assert n == len(text_encoder.tokenizer(["a red circle"])[0].nonzero())
    assert table.tokens[r, n:].abs().sum() == 0
    table.save(tmp_path)
    loaded = EmbeddingTable.load(tmp_path)
    assert loaded.rows == table.rows and torch.equal(loaded.tokens, table.tokens)
    fp = json.loads((tmp_path / "fingerprint.json").read_text())
    assert fp["id"] == fingerprint_id(table.fingerprint)
    assert {"model", "weights", "layer", "context_length", "dtype", "open_clip"} <= set(fp)


def test_layer_choice_changes_tokens_and_fingerprint(text_encoder):
    pen = load_text_encoder(MODEL, layer="penultimate")
    a, b = text_encoder.encode(["a red circle"]), pen.encode(["a red circle"])
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])  # pooled output does not depend on the token layer
    assert fingerprint_id(text_encoder.fingerprint) != fingerprint_id(pen.fingerprint)
