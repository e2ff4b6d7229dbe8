import json

import open_clip
import pytest
import torch

from diffusion.errors import T2IError
from diffusion.data.text import EmbeddingTable, embed_captions, fingerprint_id, load_text_encoder, model_config

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


def test_layer_choice_changes_tokens_and_fingerprint():
    last, pen = load_text_encoder(MODEL, layer="last"), load_text_encoder(MODEL, layer="penultimate")
    a, b = last.encode(["a red circle"]), pen.encode(["a red circle"])
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])  # pooled output does not depend on the token layer
    assert fingerprint_id(last.fingerprint) != fingerprint_id(pen.fingerprint)


def test_word_vectors_are_the_same_in_every_sentence_and_auto_picks_them_for_a_random_tower(tmp_path):
    words = load_text_encoder(MODEL, layer="token_embedding")
    assert load_text_encoder(MODEL).layer == "token_embedding"  # auto, random weights
    tokens, mask, pooled = words.encode(["a red circle", "on the left there is a big red circle"])
    red = [tokens[0, 2], tokens[1, 8]]  # "red" in both (start token first)
    torch.testing.assert_close(red[0], red[1])
    torch.testing.assert_close(pooled[0], tokens[0, :5].mean(0))  # the mean over start, words and end
    last = load_text_encoder(MODEL, layer="last").encode(["a red circle", "on the left there is a big red circle"])[0]
    assert not torch.allclose(last[0, 2], last[1, 8], atol=1e-2)  # the blocks mix in the words before
    path = tmp_path / "clip.pt"
    torch.save(load_text_encoder(MODEL).model.state_dict(), path)
    assert load_text_encoder(MODEL, pretrained=str(path)).layer == "last"  # auto, given weights


def test_encoding_only_the_caption_positions_equals_the_full_context():
    """encode runs the causal tower on as many positions as the longest caption has; every state
    it keeps, and the pooled vector, equal open_clip's full 77-position pass."""
    captions = ["a", "a large red circle on the left side of a very plain picture", ""]
    for layer, back in (("last", 1), ("penultimate", 2)):
        enc = load_text_encoder(MODEL, layer=layer)
        tokens, mask, pooled = enc.encode(captions)
        ids = enc.tokenizer(captions)
        with torch.no_grad():
            full = enc.model.forward_intermediates(ids, indices=[len(enc.model.transformer.resblocks) - back],
                                                   normalize_intermediates=True, output_fmt="NLC")
        assert tokens.shape[1] == int(mask.sum(1).max()) < ids.shape[1]
        kept = full["text_intermediates"][0][:, : tokens.shape[1]]
        torch.testing.assert_close(tokens[mask], kept[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled, full["text_features"], rtol=1e-5, atol=1e-5)


def test_captions_that_cannot_teach_prompts_are_named_in_one_line_each(text_encoder, capsys):
    """Every caption the same, or captions in a script the byte-level BPE spells in pieces (CJK,
    emoji): embed says so, one line per reason, and still embeds them; English captions pass quietly."""
    from diffusion.data.text import caption_warnings, embed_captions, unknown_token_share

    english = ["a red circle on the left", "a big blue square", "a small green triangle at the top"]
    cjk = ["赤い円が左にある", "大きな青い四角", "小さな緑の三角形が上にある", "🦩🧋🫠"]
    tok = text_encoder.tokenizer
    assert unknown_token_share(tok, english) == 0.0 and unknown_token_share(tok, cjk) > 0.8
    assert caption_warnings(text_encoder, english * 2) == []
    [same] = caption_warnings(text_encoder, ["a photo"] * 5 + [""])
    assert same.startswith("embed: every one of the 6 captions is 'a photo'") and "\n" not in same
    table = embed_captions(text_encoder, cjk, progress=False)
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("embed:")]
    assert "byte pieces of characters" in line and set(cjk) <= set(table.rows)
