"""``t2i params``: the configuration reference comes from the dataclasses of diffusion.config and the
comment beside each field, so every key is documented once, in the code, and docs/configuration.md
is that text generated (``t2i params --markdown > docs/configuration.md``)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from diffusion.config import Params, comment_docs, params_reference, reference_markdown
from diffusion.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"


def leaf_keys(cls: type, prefix: str = "") -> set[str]:
    """Every dotted params.yaml key of ``cls``, walked from the dataclasses themselves."""
    keys = set()
    for name, tp in typing.get_type_hints(cls).items():
        dotted = f"{prefix}{name}"
        keys |= leaf_keys(tp, dotted + ".") if dataclasses.is_dataclass(tp) else {dotted}
    return keys


def test_every_key_of_every_section_is_there_with_a_meaning():
    sections = params_reference()
    rows = [r for s in sections for r in s.keys]
    assert len(rows) == len({r.key for r in rows})  # each key once
    assert {r.key for r in rows} == leaf_keys(Params)
    assert {s.key for s in sections} >= {"train", "train.unet", "train.dit", "ingest.download"}
    undocumented = [r.key for r in rows if not r.doc]
    assert not undocumented, "give each field a comment in diffusion/config.py: " + ", ".join(undocumented)
    no_docstring = [s.key for s in sections if not s.doc]
    assert not no_docstring, "give each section class a docstring: " + ", ".join(no_docstring)


def test_types_and_defaults_are_as_written_and_as_yaml_shows_them():
    rows = {r.key: r for s in params_reference() for r in s.keys}
    assert (rows["train.unet.channels"].type, rows["train.unet.channels"].default) == ("int", "48")
    assert (rows["train.lr"].type, rows["train.lr"].default) == ("Optional[float]", "null")  # not the resolved rate
    assert rows["dataset.shapes"].default == "[circle, square, triangle]"
    assert rows["train.tf32"].default == "true" and rows["sample.guidance_interval"].default == "null"
    assert rows["train.unet.patch"].doc.startswith("space-to-depth fold")


def test_the_docs_page_is_the_generated_text():
    assert PAGE.read_text() == reference_markdown(params_reference()), (
        "docs/configuration.md is stale: run t2i params --markdown > docs/configuration.md")


def test_a_section_and_the_sections_inside_it():
    assert [s.key for s in params_reference("train")] == ["train", "train.unet", "train.dit", "train.diffusers",
                                                          "train.lora"]
    assert [s.key for s in params_reference("train.unet")] == ["train.unet"]
    with pytest.raises(ConfigError, match="unknown section tran .sections: dataset, ingest"):
        params_reference("tran")


def test_comments_beside_or_right_above_a_field_document_it_and_a_parted_heading_does_not():
    source = '''
class Demo:
    """A demo
    section."""

    a: int = 1  # beside
    # above, first line
    # and second
    b: list[int] = field(
        default_factory=lambda: [1, 2]
    )
    # a heading for what follows

    c: str = "x"
    d: float = 0.5  # beside, with
'''
    doc, fields = comment_docs(source)["Demo"]
    assert doc == "A demo section."
    assert fields == {"a": "beside", "b": "above, first line and second", "c": "", "d": "beside, with"}


def test_cli_prints_the_reference_without_a_params_file(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)  # no params.yaml here: the reference is the code's
    assert main(["params", "train.dit"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train.dit: A transformer denoiser") and "train.dit.mlp_ratio" in out
    assert "train.unet" not in out
    assert main(["params", "--markdown"]) == 0
    assert capsys.readouterr().out == PAGE.read_text()
    assert main(["params", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("t2i: error: unknown section nope")
