"""The demo model's pieces that need no trained weights: the build script runs and writes a model that
loads like any diffusers folder, the tokenizer reads grammar words whole, the classifier reads the
pictures it is meant to judge."""
import numpy as np

from trainer.demo.classify import classify, score
from trainer.demo.shapes import WORDS, random_scene, varied_caption
from trainer.models.load import load_base
from trainer.sampling import generate


def test_the_classifier_reads_every_drawn_picture_right():
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng) for _ in range(200)]
    assert score([(classify(img), want) for img, _, want in scenes]) == {"background": 1.0, "color": 1.0, "shape": 1.0}


def test_grammar_words_are_one_token_and_a_trigger_still_tokenizes():
    from trainer.models.tiny import word_tokenizer

    tok = word_tokenizer(WORDS)
    ids = tok("lablora, a red circle on a white background", add_special_tokens=False).input_ids
    names = tok.convert_ids_to_tokens(ids)
    assert names[-7:] == ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "white</w>", "background</w>"]
    assert "".join(names[:-7]).replace("</w>", "") == "lablora,"
    captions = {varied_caption("circle", "red", "white", np.random.default_rng(i)) for i in range(40)}
    assert "a red circle on a white background" in captions and "a circle on a white background" in captions
    assert any(c.endswith(", a red circle on a white background") for c in captions)


def test_the_build_script_writes_a_model_that_loads_and_draws(tmp_path):
    from trainer.demo.build import Recipe, build

    r = Recipe(vae_steps=2, vae_batch=2, pool=64, steps=2, batch=4, warmup=1)
    out = build(tmp_path / "rebuilt", r, log=lambda msg: None)
    m = load_base(str(out))
    assert m.family == "sd15" and m.default_resolution == 64
    assert len(m.tokenizers[0]("a red circle").input_ids) == 5  # start, three whole words, end
    assert generate(m, ["a red circle on a white background"], steps=2)[0].size == (64, 64)
