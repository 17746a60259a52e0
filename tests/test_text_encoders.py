"""Pretrained text encoders (flaxdiff.interop.text_encoders) against the torch references, on tiny random models
and locally built tokenizer files (no download): parity <= 1e-5 in float32, tokenizer ids, key maps, loaders."""
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import text_models as tm  # noqa: E402

from flaxdiff.data import captions  # noqa: E402
from flaxdiff.interop import load_text_encoder, text_encoders  # noqa: E402
from flaxdiff.interop.text_encoders import clip, weights  # noqa: E402

TOL = 1e-5


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().numpy().astype(np.float64))))


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """Tokenizer files + three tiny CLIP text models: plain (quick_gelu), with projection (gelu), legacy eos=2."""
    root = tmp_path_factory.mktemp("clip")
    vocab = tm.write_clip_tokenizer(root / "tokenizer")
    out = {}
    for name, kwargs in {"plain": dict(projection=False), "proj": dict(projection=True, hidden_act="gelu"),
                         "legacy": dict(projection=False, legacy_eos=True)}.items():
        directory = root / name
        shutil.copytree(root / "tokenizer", directory)
        out[name] = (directory, tm.write_clip_model(directory, vocab, **kwargs))
    return out


@pytest.mark.parametrize("name", ["plain", "proj", "legacy"])
def test_clip_matches_transformers(clip_dirs, name):
    directory, model = clip_dirs[name]
    encoder = load_text_encoder(directory)
    ids, mask = encoder.tokenize(tm.PROMPTS[:12])
    assert ids.shape == (12, tm.CLIP_TINY["max_position_embeddings"])
    ours = encoder.module.apply({"params": encoder.params}, ids)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == tm.CLIP_TINY["num_hidden_layers"] + 1
    for mine, theirs in zip(ours["hidden_states"], ref.hidden_states):
        assert _max_diff(mine, theirs) <= TOL
    assert _max_diff(ours["last_hidden_state"], ref.last_hidden_state) <= TOL
    if name == "proj":
        assert _max_diff(ours["text_embeds"], ref.text_embeds) <= TOL
        assert encoder.pooled_width == tm.CLIP_TINY["projection_dim"]
    else:
        assert _max_diff(ours["pooler_output"], ref.pooler_output) <= TOL
        assert "text_embeds" not in ours
    with torch.no_grad():  # with the padding mask as well as the causal mask
        masked = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)))
    ours_masked = encoder.module.apply({"params": encoder.params}, ids, mask)
    assert _max_diff(ours_masked["last_hidden_state"], masked.last_hidden_state) <= TOL

    cond = encoder.encode(tm.PROMPTS[:12])
    assert set(cond) == {"text", "text_mask", "pooled"}
    assert _max_diff(cond["text"], ref.last_hidden_state) <= TOL
    assert np.asarray(cond["text_mask"]).all()  # CLIP default: every token visible (SD convention)
    pooled_ref = ref.text_embeds if name == "proj" else ref.pooler_output
    assert _max_diff(cond["pooled"], pooled_ref) <= TOL
    penultimate = load_text_encoder(directory, layer="penultimate").encode(tm.PROMPTS[:12])
    assert _max_diff(penultimate["text"], ref.hidden_states[-2]) <= TOL


def test_clip_pooling_rule_follows_eos_config(clip_dirs):
    """eos_token_id == 2 (legacy configs): the position of the largest id; otherwise the first EOS (position 0 when
    a row has none). A row without EOS whose largest id is at position 1 tells the two rules apart."""
    length = tm.CLIP_TINY["max_position_embeddings"]
    ids = np.full((2, length), 7, np.int32)
    ids[:, 1] = 300
    ids[1, 4] = load_text_encoder(clip_dirs["plain"][0]).text_tokenizer.eos_id
    expected = {"plain": [0, 4], "legacy": [1, 4]}
    for name in ("plain", "legacy"):
        directory, model = clip_dirs[name]
        encoder = load_text_encoder(directory)
        with torch.no_grad():
            ref = model(torch.tensor(ids, dtype=torch.long))
        ours = encoder.module.apply({"params": encoder.params}, ids)
        assert _max_diff(ours["pooler_output"], ref.pooler_output) <= TOL
        for row, position in enumerate(expected[name]):
            np.testing.assert_array_equal(ours["pooler_output"][row], ours["last_hidden_state"][row, position])


def test_clip_tokenizer_matches_transformers(clip_dirs, tmp_path):
    from transformers import CLIPTokenizer

    directory, _ = clip_dirs["plain"]
    length = tm.CLIP_TINY["max_position_embeddings"]
    reference = CLIPTokenizer.from_pretrained(str(directory))
    expected = reference(tm.PROMPTS, padding="max_length", truncation=True, max_length=length)
    ids, mask = load_text_encoder(directory).tokenize(tm.PROMPTS)
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"], bool))
    assert any(len(reference(p)["input_ids"]) > length for p in tm.PROMPTS)  # truncation was exercised
    # The tokenizer.json that transformers writes gives the same ids; an SD 2.x style pad token "!" too.
    reference.save_pretrained(str(tmp_path))
    from_json = text_encoders.tokenizers.BPETokenizer.from_dir(tmp_path, length)
    np.testing.assert_array_equal(from_json(tm.PROMPTS)[0], ids)
    shutil.copy(directory / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(directory / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "tokenizer.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    bang = CLIPTokenizer.from_pretrained(str(tmp_path))
    expected = bang(tm.PROMPTS, padding="max_length", truncation=True, max_length=length)["input_ids"]
    np.testing.assert_array_equal(text_encoders.tokenizers.BPETokenizer.from_dir(tmp_path, length)(tm.PROMPTS)[0],
                                  np.asarray(expected))
    # picklable for grain workers, same ids after the round trip
    tokenizer = load_text_encoder(directory).tokenizer()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer))("a cat!"), tokenizer("a cat!"))


def test_clip_export_round_trip_and_torch_reload(clip_dirs, tmp_path):
    from transformers import CLIPTextModelWithProjection

    directory, model = clip_dirs["proj"]
    encoder = load_text_encoder(directory, layer=-2, final_norm=True)
    saved = Path(encoder.save(tmp_path / "saved"))
    reloaded = CLIPTextModelWithProjection.from_pretrained(str(saved)).eval()
    for (key, value), (key2, value2) in zip(sorted(model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert key == key2 and torch.equal(value, value2), key
    again = load_text_encoder(saved)
    assert again.options == encoder.options  # layer / final_norm travel with the weights
    ids, _ = encoder.tokenize(tm.PROMPTS)
    np.testing.assert_array_equal(again.tokenize(tm.PROMPTS)[0], ids)
    first, second = encoder.from_ids(ids), again.from_ids(ids)
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]))
    with torch.no_grad():  # diffusers clip_skip=1: final_layer_norm(h_{N-1})
        ref = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
        skip = model.text_model.final_layer_norm(ref.hidden_states[-2])
    assert _max_diff(first["text"], skip) <= TOL


def test_clip_full_size_layout_matches_clip_l14():
    """CLIP ViT-L/14 text tower (as in SD 1.x text_encoder/): our key map and shapes equal transformers' state dict."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    values = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    for cls, projection in ((CLIPTextModel, False), (CLIPTextModelWithProjection, True)):
        with torch.device("meta"):
            reference = cls(CLIPTextConfig(**values))
        state = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
        config = clip.config_from_hf({**values, "model_type": "clip_text_model",
                                      "architectures": [cls.__name__]})
        assert (config.projection_dim is not None) == projection
        prefix = "text_model." if projection else ""
        mapping = clip.key_map(config, prefix)
        shapes = clip.param_shapes(config)
        assert sorted(torch_key for torch_key, _ in mapping.values()) == sorted(state)
        for flax_path, (torch_key, kind) in mapping.items():
            assert shapes[flax_path] == (state[torch_key][::-1] if kind == "dense" else state[torch_key]), flax_path
        assert len(mapping) == len(shapes)
