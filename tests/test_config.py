from pathlib import Path

import pytest
import yaml

from diffusion.config import Params, load_params, parse_params
from diffusion.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load_and_spell_out_every_key():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    # the shipped file lists every key, so DVC tracks each one: parsing it equals the defaults only
    # where the file agrees, and no section is missing from the file
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(data) == set(Params.__dataclass_fields__)
    assert set(data["train"]) | {"unet"} == set(Params().train.__dataclass_fields__)
    for section in ("sample", "evaluate", "sweep", "promote", "batch"):
        assert set(data[section]) == set(getattr(Params(), section).__dataclass_fields__), section


@pytest.mark.parametrize("preset", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_spell_out_what_params_yaml_does_and_fit_their_data(preset):
    """A preset replaces params.yaml (cp preset params.yaml): every key DVC tracks must be there."""
    from diffusion.config import check_fits
    from diffusion.models.unet import UNet, count_params

    p = load_params(preset)
    data, shipped = yaml.safe_load(preset.read_text()), yaml.safe_load((ROOT / "params.yaml").read_text())

    def keys(d, prefix=""):
        return {f"{prefix}{k}" for k, v in d.items()} | {x for k, v in d.items() if isinstance(v, dict)
                                                      and k not in ("colors", "sizes", "positions", "caption_omit")
                                                      for x in keys(v, f"{prefix}{k}.")}
    assert keys(data) == keys(shipped)
    if preset.name == "photos-256.yaml":  # SD VAE: 8x downsampling, 4 latent channels
        assert p.latents.vae and p.ingest.image_size == 256 and p.embed.pretrained
        check_fits(p.train, p.ingest.image_size // 8, "latent size")
        params = count_params(UNet(p.train.unet, text_dim=512, pooled_dim=512, in_channels=4))
        assert 80e6 < params < 200e6  # a model for one GPU


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number, got 'fast'"),
        ({"train": {"steps": 1.5}}, "train.steps must be an integer"),
        ({"train": {"unet": {"channels": "x"}}}, "train.unet.channels must be an integer"),
        ({"train": {"unseen_words": 1.5}}, "train.unseen_words must be in [0, 1], got 1.5"),
        ({"train": {"unseen_words_max": 0}}, "train.unseen_words_max must be >= 1, got 0"),
        ({"train": {"sample_every": -5}}, "train.sample_every must be >= 0 (0: off), got -5"),
        ({"train": {"unet": {"ctx_dim": 0}}}, "train.unet.ctx_dim must be >= 1 (or null), got 0"),
        ({"train": {"unet": {"heads": 0}}}, "train.unet.heads must be >= 1, got 0"),
        ({"train": {"unet": {"patch": 0}}}, "train.unet.patch must be >= 1, got 0"),
        ({"train": {"dit": {"heads": 0}}}, "train.dit.heads must be >= 1, got 0"),
        ({"sample": {"sampler": "plms"}}, "sample.sampler must be one of ddpm, ddim, euler"),
            ({"sample": {"guidance_interval": [5.0, 1.0]}}, "sample.guidance_interval must be"),
            ({"sample": {"spacing": "leading"}}, "sample.spacing must be one of uniform"),
        ({"dataset": {"holdout": [{"color": "pink", "shape": "circle"}]}}, "dataset.holdout[0]: color 'pink'"),
        ({"train": 3}, "train must be a mapping"),
        ({"bogus": {}}, "unknown key bogus"),
    ],
)
def test_bad_keys_give_one_line_naming_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, data))
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert str(tmp_path / "params.yaml") in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_missing_keys_take_defaults_and_overrides_apply(tmp_path):
    p = load_params(write(tmp_path, {"train": {"lr": 0.01}}), overrides=["train.steps=7", "sample.guidance_scale=2"])
    assert p.train.lr == 0.01 and p.train.steps == 7 and p.sample.guidance_scale == 2.0
    assert p.dataset == Params().dataset
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(write(tmp_path, {}), overrides=["steps=3"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="sample.steps"):
        parse_params({"sample": {"steps": 2000}})
    with pytest.raises(ConfigError, match="attn_levels"):
        parse_params({"train": {"unet": {"attn_levels": [5]}}})
    with pytest.raises(ConfigError, match="up_blocks must be 1..blocks_per_level"):
        parse_params({"train": {"unet": {"up_blocks": 3, "blocks_per_level": 1}}})
    with pytest.raises(ConfigError, match="train.unet.upsample must be one of"):
        parse_params({"train": {"unet": {"upsample": "bilinear"}}})
    with pytest.raises(ConfigError, match="every combination"):
        parse_params({"dataset": {"holdout": [{"size": "small"}, {"size": "large"}]}})


@pytest.mark.parametrize("size, low, high", [("tiny", 3e6, 7e6), ("small", 25e6, 35e6), ("base", 100e6, 130e6)])
@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_size_presets_have_their_size_and_fit_every_resolution(size, low, high, denoiser):
    import torch

    from diffusion.models.store import build_denoiser
    from diffusion.config import check_fits
    from diffusion.models.unet import Cond, count_params

    p = load_params(ROOT / "params.yaml", [f"train.size={size}", f"train.denoiser={denoiser}"])
    with torch.device("meta"):  # counted without allocating the weights
        den = build_denoiser(p.train, 384, 384)
    assert low < count_params(den.net) < high
    for side in (16, 32, 64, 128):
        check_fits(p.train, side, "image size")
    if size == "tiny":  # and it runs at a resolution other than the default
        den = build_denoiser(p.train, 384, 384)
        cond = Cond(torch.zeros(2, 5, 384), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 384))
        assert den(torch.randn(2, 3, 32, 32), torch.tensor([1.0, 5.0]), cond).shape == (2, 3, 32, 32)


def test_learning_rate_null_follows_the_size_and_a_number_overrides_it():
    from diffusion.config import CUSTOM_DIT_LR, SIZE_LR, TrainConfig

    # params.yaml leaves it null: the default (custom: a 32-wide UNet) trains at 2e-3, a custom DiT
    # at 1e-3
    assert load_params(ROOT / "params.yaml").train.lr == 2e-3
    assert load_params(ROOT / "params.yaml", ["train.denoiser=dit"]).train.lr == CUSTOM_DIT_LR == 1e-3
    assert load_params(ROOT / "params.yaml", ["train.denoiser=dit", "train.size=small"]).train.lr == SIZE_LR["small"]
    for size in ("tiny", "small", "base"):
        assert load_params(ROOT / "params.yaml", [f"train.size={size}"]).train.lr == SIZE_LR[size]
    assert SIZE_LR["base"] < SIZE_LR["small"] < SIZE_LR["tiny"]  # bigger networks, smaller steps
    assert load_params(ROOT / "params.yaml", ["train.size=base", "train.lr=0.0003"]).train.lr == 3e-4
    assert TrainConfig(size="base").lr == SIZE_LR["base"] and TrainConfig(lr=0.01).lr == 0.01
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_params(ROOT / "params.yaml", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        load_params(ROOT / "params.yaml", ["train.lr=0"])


def test_each_section_checks_itself_with_the_key_it_is_given():
    """The section's own checks run wherever it is parsed; the dotted key is the caller's."""
    from diffusion.config import DiTConfig, TrainConfig, UNetConfig, parse_section

    with pytest.raises(ConfigError, match=r"^train\.unet\.ctx_dim must be >= 1 \(or null\), got 0$"):
        parse_section(UNetConfig, {"ctx_dim": 0}, "train.unet")
    with pytest.raises(ConfigError, match=r"^m\.json: train\.dit: width must divide by heads"):
        parse_section(TrainConfig, {"dit": {"width": 100, "heads": 3}}, "train", source="m.json")
    assert parse_section(DiTConfig, None, "train.dit") == DiTConfig()


def tiny_model(tmp_path, train: dict) -> Path:
    """A model folder as the train stage writes it: an 8-wide UNet's weights and its model.json."""
    from diffusion.config import TrainConfig, UNetConfig, to_dict
    from diffusion.models.store import build_denoiser, save_model

    cfg = TrainConfig(unet=UNetConfig(channels=8, channel_mult=[1, 2], attn_levels=[1], heads=2))
    save_model(build_denoiser(cfg, 16, 16), tmp_path, {"train": {**to_dict(cfg), **train}, "text_dim": 16,
                                                       "pooled_dim": 16})
    return tmp_path


def test_model_json_loads_through_the_params_parser_and_old_files_take_the_defaults(tmp_path):
    import json

    from diffusion.artifacts import MODEL_CONFIG
    from diffusion.models.store import load_model

    d = tiny_model(tmp_path, {"prediction": "v"})
    meta = json.loads((d / MODEL_CONFIG).read_text())
    for newer in ("dit", "sample_every", "unseen_words", "unseen_words_max", "size", "data_workers"):
        del meta["train"][newer]  # keys a model written before they existed lacks
    del meta["train"]["unet"]["ctx_dim"]
    (d / MODEL_CONFIG).write_text(json.dumps(meta))
    den, _ = load_model(d)  # the weights load strictly: the network is the one written
    assert den.prediction == "v" and den.net.cfg.channels == 8 and den.net.cfg.ctx_dim is None


def test_a_garbage_key_in_model_json_is_one_line_naming_it(tmp_path):
    """Unknown keys were a TypeError from TrainConfig(**saved); no train key was ever removed, so no
    model written by this project carries one."""
    from diffusion.models.store import load_model

    for train, message in [({"lrr": 0.1}, "unknown key train.lrr"),
                           ({"unet": {"chanels": 8}}, "unknown key train.unet.chanels"),
                           ({"precision": "fp8"}, "train.precision must be one of auto"),
                           ({"steps": "many"}, "train.steps must be an integer")]:
        (tmp_path / next(iter(train))).mkdir()
        d = tiny_model(tmp_path / next(iter(train)), train)
        with pytest.raises(ConfigError) as err:
            load_model(d)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert str(d / "model.json") in str(err.value)
