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
from flaxdiff.interop.text_encoders import clip, openclip, t5, weights  # noqa: E402

TOL = 1e-5
_LOADED: dict = {}


def _load(directory, **kwargs):
    """load_text_encoder, cached per (directory, options) for the module: tests share compiled encoders."""
    key = (str(directory), tuple(sorted(kwargs.items())))
    if key not in _LOADED:
        _LOADED[key] = load_text_encoder(directory, **kwargs)
    return _LOADED[key]


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().numpy().astype(np.float64))))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The references are tiny: one torch thread avoids spinning thread pools on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model_dirs(root, write_model, variants):
    """``{name: (directory, torch reference)}``: one directory per variant holding the tiny CLIP tokenizer files and
    ``write_model(directory, vocab, **kwargs)``."""
    vocab = tm.write_clip_tokenizer(root / "tokenizer")
    out = {}
    for name, kwargs in variants.items():
        directory = root / name
        shutil.copytree(root / "tokenizer", directory)
        out[name] = (directory, write_model(directory, vocab, **kwargs))
    return out


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """Tokenizer files + three tiny CLIP text models: plain (quick_gelu), with projection (gelu), legacy eos=2."""
    return _model_dirs(tmp_path_factory.mktemp("clip"), tm.write_clip_model, {
        "plain": dict(projection=False), "proj": dict(projection=True, hidden_act="gelu"),
        "legacy": dict(projection=False, legacy_eos=True)})


@pytest.mark.parametrize("name", ["plain", "proj", "legacy"])
def test_clip_matches_transformers(clip_dirs, name):
    directory, model = clip_dirs[name]
    encoder = _load(directory)
    ids, mask = encoder.tokenize(tm.PROMPTS[:12])
    assert ids.shape == (12, tm.CLIP_TINY["max_position_embeddings"])
    ours = encoder.outputs(ids)
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
    if name == "plain":
        with torch.no_grad():  # with the padding mask as well as the causal mask
            masked = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)))
        ours_masked = encoder.outputs(ids, mask)
        assert _max_diff(ours_masked["last_hidden_state"], masked.last_hidden_state) <= TOL

    cond = encoder.encode(tm.PROMPTS[:12])
    assert set(cond) == {"text", "text_mask", "pooled"}
    assert _max_diff(cond["text"], ref.last_hidden_state) <= TOL
    assert np.asarray(cond["text_mask"]).all()  # CLIP default: every token visible (SD convention)
    pooled_ref = ref.text_embeds if name == "proj" else ref.pooler_output
    assert _max_diff(cond["pooled"], pooled_ref) <= TOL
    if name == "proj":
        penultimate = _load(directory, layer="penultimate").encode(tm.PROMPTS[:12])
        assert _max_diff(penultimate["text"], ref.hidden_states[-2]) <= TOL


def test_clip_pooling_rule_follows_eos_config(clip_dirs):
    """eos_token_id == 2 (legacy configs): the position of the largest id; otherwise the first EOS (position 0 when
    a row has none). A row without EOS whose largest id is at position 1 tells the two rules apart."""
    length = tm.CLIP_TINY["max_position_embeddings"]
    ids = np.full((12, length), 7, np.int32)  # 12 rows: the shape the parity test compiled
    ids[:, 1] = 300
    ids[1:, 4] = _load(clip_dirs["plain"][0]).text_tokenizer.eos_id
    expected = {"plain": [0, 4], "legacy": [1, 4]}
    for name in ("plain", "legacy"):
        directory, model = clip_dirs[name]
        encoder = _load(directory)
        with torch.no_grad():
            ref = model(torch.tensor(ids, dtype=torch.long))
        ours = encoder.outputs(ids)
        assert _max_diff(ours["pooler_output"], ref.pooler_output) <= TOL
        for row, position in enumerate(expected[name]):
            np.testing.assert_array_equal(ours["pooler_output"][row], ours["last_hidden_state"][row, position])


def test_clip_tokenizer_matches_transformers(clip_dirs, tmp_path):
    from transformers import CLIPTokenizer

    directory, _ = clip_dirs["plain"]
    length = tm.CLIP_TINY["max_position_embeddings"]
    reference = CLIPTokenizer.from_pretrained(str(directory))
    expected = reference(tm.PROMPTS, padding="max_length", truncation=True, max_length=length)
    ids, mask = _load(directory).tokenize(tm.PROMPTS)
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
    tokenizer = _load(directory).tokenizer()
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


def test_reference_save_survives_moving_the_run_with_its_encoder(clip_dirs, tmp_path):
    """save(copy_weights=False) writes only the options and the source path relative to the save dir (tried first)
    and absolute; moving both together keeps it loadable, a missing source is a clear error."""
    directory, _ = clip_dirs["plain"]
    shutil.copytree(directory, tmp_path / "old" / "encoders" / "clip")
    encoder = load_text_encoder(tmp_path / "old" / "encoders" / "clip", layer="penultimate")
    saved = Path(encoder.save(tmp_path / "old" / "run" / "text_encoder", copy_weights=False))
    assert sorted(p.name for p in saved.iterdir()) == ["flaxdiff_text_encoder.json"]
    (tmp_path / "old").rename(tmp_path / "new")
    moved = load_text_encoder(tmp_path / "new" / "run" / "text_encoder")
    assert moved.path == str((tmp_path / "new" / "encoders" / "clip").resolve())
    assert moved.options == encoder.options
    reference = _load(directory, layer="penultimate").encode(tm.PROMPTS[:12])
    for key, value in moved.encode(tm.PROMPTS[:12]).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(reference[key]))
    shutil.rmtree(tmp_path / "new" / "encoders")
    with pytest.raises(ValueError, match="references the text encoder at '../../encoders/clip'"):
        load_text_encoder(tmp_path / "new" / "run" / "text_encoder")


def test_clip_full_size_layout_matches_clip_l14():
    """CLIP ViT-L/14 text tower (SD 1.x text_encoder/): our key map and shapes equal transformers' state dict, and one
    forward with random full-size weights agrees to 1e-5."""
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
    # one full-size forward with random weights: last and penultimate hidden states and the projection
    torch.manual_seed(0)
    reference = CLIPTextModelWithProjection(CLIPTextConfig(**values)).eval()
    config = clip.config_from_hf({**values, "model_type": "clip_text_model",
                                  "architectures": ["CLIPTextModelWithProjection"]})
    params = clip.from_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, config)
    ids = np.asarray([[49406] + list(range(320, 340)) + [49407] * 56], np.int32)
    ours = jax.jit(clip.CLIPTextTransformer(config).apply)({"params": params}, ids)
    with torch.no_grad():
        ref = reference(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    assert _max_diff(ours["last_hidden_state"], ref.last_hidden_state) <= TOL
    assert _max_diff(ours["hidden_states"][-2], ref.hidden_states[-2]) <= TOL
    assert _max_diff(ours["text_embeds"], ref.text_embeds) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# T5


T5_LENGTH = 40


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """A sentencepiece tokenizer and two tiny T5EncoderModels: T5 v1.1 / Flan (gated-gelu) and original T5 (relu)."""
    from transformers import T5Tokenizer

    root = tmp_path_factory.mktemp("t5")
    tm.write_t5_tokenizer(root / "tokenizer")
    reference = T5Tokenizer.from_pretrained(str(root / "tokenizer"))
    out = {"tokenizer": (root / "tokenizer", reference)}
    for proj in ("gated-gelu", "relu"):
        directory = root / proj
        shutil.copytree(root / "tokenizer", directory)
        out[proj] = (directory, tm.write_t5_model(directory, len(reference), proj))
    return out


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(t5_dirs, proj):
    directory, model = t5_dirs[proj]
    encoder = _load(directory, max_length=T5_LENGTH)
    assert encoder.config.is_gated_act == (proj == "gated-gelu")
    assert encoder.config.dense_act_fn == ("gelu_new" if proj == "gated-gelu" else "relu")
    ids, mask = encoder.tokenize(tm.PROMPTS[:12])
    for attention in (mask, None):  # PixArt-style masked, and SD3 / Flux-style unmasked
        with torch.no_grad():
            ref = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True,
                        attention_mask=None if attention is None else torch.tensor(attention.astype(np.int64)))
        ours = encoder.outputs(ids, attention)
        assert len(ours["hidden_states"]) == len(ref.hidden_states) == tm.T5_TINY["num_layers"] + 1
        for mine, theirs in zip(ours["hidden_states"], ref.hidden_states):
            assert _max_diff(mine, theirs) <= TOL
        assert _max_diff(ours["last_hidden_state"], ref.last_hidden_state) <= TOL
    cond = encoder.encode(tm.PROMPTS[:12])
    np.testing.assert_array_equal(cond["text_mask"], mask)  # T5 default: padding masked, in and out
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)))
    assert _max_diff(cond["text"], ref.last_hidden_state) <= TOL
    weights_ = torch.tensor(mask, dtype=torch.float32)[..., None]
    mean = (ref.last_hidden_state * weights_).sum(1) / weights_.sum(1)
    assert _max_diff(cond["pooled"], mean) <= TOL


def test_t5_relative_buckets_equal_transformers_at_full_size():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in ((32, 128), (8, 20)):
        position = torch.arange(300)
        expected = T5Attention._relative_position_bucket(position[None, :] - position[:, None], True, buckets,
                                                         distance)
        np.testing.assert_array_equal(t5.relative_position_buckets(300, buckets, distance), expected.numpy())


def test_t5_tokenizer_matches_transformers(t5_dirs, tmp_path):
    directory, reference = t5_dirs["tokenizer"]
    expected = reference(tm.PROMPTS, padding="max_length", truncation=True, max_length=T5_LENGTH)
    tokenizer = text_encoders.tokenizers.SentencePieceTokenizer.from_dir(directory, T5_LENGTH)
    ids, mask = tokenizer(tm.PROMPTS)
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"], bool))
    assert any(len(reference(p)["input_ids"]) > T5_LENGTH for p in tm.PROMPTS)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer))(tm.PROMPTS)[0], ids)
    reference.save_pretrained(str(tmp_path))  # a tokenizer.json alone (no spiece.model) gives the same ids
    (tmp_path / "spiece.model").unlink(missing_ok=True)
    from_json = text_encoders.tokenizers.load_tokenizer(tmp_path, "t5", T5_LENGTH)
    np.testing.assert_array_equal(from_json(tm.PROMPTS)[0], ids)


def test_t5_xxl_layout_matches_transformers():
    """T5 v1.1 XXL (SD3 text_encoder_3, Flux text_encoder_2, PixArt): key map and shapes equal transformers'."""
    from transformers import T5Config, T5EncoderModel

    values = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        reference = T5EncoderModel(T5Config(**values))
    state = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    config = t5.config_from_hf({**values, "model_type": "t5"})
    mapping, shapes = t5.key_map(config), t5.param_shapes(config)
    assert sorted(torch_key for torch_key, _ in mapping.values()) == sorted(state)
    for flax_path, (torch_key, kind) in mapping.items():
        assert shapes[flax_path] == (state[torch_key][::-1] if kind == "dense" else state[torch_key]), flax_path


# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP


@pytest.fixture(scope="module")
def openclip_dirs(tmp_path_factory):
    return _model_dirs(tmp_path_factory.mktemp("openclip"), tm.write_openclip, {
        "plain": {}, "quick_ls": dict(quick_gelu=True, ls_init_value=0.5),
        "bidirectional": dict(no_causal_mask=True, pool_type="last", proj_bias=True)})


@pytest.mark.parametrize("name", ["plain", "quick_ls", "bidirectional"])
def test_openclip_matches_open_clip(openclip_dirs, name):
    """Standard towers (exact / quick GELU, layer scale) and a SigLIP-style one (no causal mask, last-token pooling,
    projection with bias)."""
    directory, tower = openclip_dirs[name]
    encoder = _load(directory)
    assert encoder.kind == "openclip" and encoder.config.quick_gelu == (name == "quick_ls")
    assert encoder.config.causal == (name != "bidirectional")
    ids, _ = encoder.tokenize(tm.PROMPTS[:12])
    assert (ids[0, np.argmax(ids[0]) + 1:] == 0).all()  # OpenCLIP pads with 0 after the EOT
    with torch.no_grad():
        tower.output_tokens = True
        pooled, tokens = tower(torch.tensor(ids, dtype=torch.long))
        tower.output_tokens = False
    ours = encoder.outputs(ids)
    assert _max_diff(ours["last_hidden_state"], tokens) <= TOL
    assert _max_diff(ours["text_embeds"], pooled) <= TOL
    cond = encoder.encode(tm.PROMPTS[:12])
    assert _max_diff(cond["pooled"], pooled) <= TOL and _max_diff(cond["text"], tokens) <= TOL
    with torch.no_grad():  # penultimate layer (SD 2.x): open_clip's own blocks but the last
        block_input = tower.token_embedding(torch.tensor(ids, dtype=torch.long)) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            block_input = block(block_input, attn_mask=tower.attn_mask)
    if name == "plain":
        penultimate = _load(directory, layer="penultimate").encode(tm.PROMPTS[:12])
        assert _max_diff(penultimate["text"], block_input) <= TOL


def test_openclip_tokenizer_matches_open_clip(openclip_dirs):
    simple = sys.modules["open_clip.tokenizer"].SimpleTokenizer
    directory, _ = openclip_dirs["plain"]
    length = tm.OPENCLIP_TINY["context_length"]
    reference = simple(bpe_path=str(directory / "bpe_simple_vocab.txt.gz"), context_length=length)
    ours = _load(directory).tokenize(tm.PROMPTS)[0]
    np.testing.assert_array_equal(ours, reference(tm.PROMPTS, context_length=length).numpy())


def test_openclip_tokenizer_from_merge_files(openclip_dirs, tmp_path):
    """Without tokenizer.json / vocab.json, open_clip's gzip merge file is read: the tiny one of the checkpoint dir,
    and the real 49408-token CLIP vocabulary bundled in the installed open_clip package (which transformers'
    CLIPTokenizer, given the same vocabulary as vocab.json + merges.txt, also reproduces)."""
    from transformers import CLIPTokenizer

    simple = sys.modules["open_clip.tokenizer"].SimpleTokenizer
    directory, _ = openclip_dirs["plain"]
    shutil.copytree(directory, tmp_path / "gz", ignore=shutil.ignore_patterns("vocab.json", "merges.txt"))
    length = tm.OPENCLIP_TINY["context_length"]
    reference = simple(bpe_path=str(directory / "bpe_simple_vocab.txt.gz"), context_length=length)
    np.testing.assert_array_equal(load_text_encoder(tmp_path / "gz").tokenize(tm.PROMPTS)[0],
                                  reference(tm.PROMPTS, context_length=length).numpy())

    bundled = text_encoders.tokenizers.openclip_default_bpe()
    vocab, merges = text_encoders.tokenizers.openclip_vocab(bundled)
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    ours = text_encoders.tokenizers.load_tokenizer(tmp_path / "missing", "openclip", 77, pad_id=0)
    np.testing.assert_array_equal(ours(tm.PROMPTS)[0], simple(context_length=77)(tm.PROMPTS).numpy())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges),
                                                encoding="utf-8")
    hf = CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    clip_tokenizer = text_encoders.tokenizers.load_tokenizer(tmp_path / "hf", "clip", 77)
    expected = hf(tm.PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"]
    np.testing.assert_array_equal(clip_tokenizer(tm.PROMPTS)[0], np.asarray(expected))


@pytest.mark.parametrize("size", ["ViT-H-14", "ViT-bigG-14"])
def test_openclip_full_size_layout(size):
    """The text towers of OpenCLIP ViT-H/14 (SD 2.x, MicroDiT's DFN5B-CLIP-ViT-H-14-378) and ViT-bigG/14 (SDXL)."""
    transformer = tm.import_openclip_transformer()
    width, heads, layers, embed = {"ViT-H-14": (1024, 16, 24, 1024), "ViT-bigG-14": (1280, 20, 32, 1280)}[size]
    with torch.device("meta"):
        tower = transformer.TextTransformer(width=width, heads=heads, layers=layers, output_dim=embed)
    state = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    config = openclip.config_from_openclip({"embed_dim": embed, "text_cfg": dict(width=width, heads=heads,
                                                                                 layers=layers)})
    mapping, shapes = openclip.key_map(config), openclip.param_shapes(config)
    assert sorted(torch_key for torch_key, _ in mapping.values()) == sorted(state)
    for flax_path, (torch_key, kind) in mapping.items():
        assert shapes[flax_path] == (state[torch_key][::-1] if kind == "dense" else state[torch_key]), flax_path


# ----------------------------------------------------------------------------------------------------------------
# Loaders: diffusers layout, pickles, errors, dtypes


def test_diffusers_pipeline_layout(tmp_path, clip_dirs, t5_dirs):
    """SD3-style root: text_encoder (CLIP), text_encoder_2 (CLIP with projection), text_encoder_3 (T5), each with
    its tokenizer*/ sibling; the root alone loads text_encoder/."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    for index, (source, suffix) in enumerate(((clip_dirs["plain"][0], ""), (clip_dirs["proj"][0], "_2"),
                                              (t5_dirs["gated-gelu"][0], "_3"))):
        shutil.copytree(source, tmp_path / f"tokenizer{suffix}",
                        ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
        shutil.copytree(source, tmp_path / f"text_encoder{suffix}", ignore=shutil.ignore_patterns(
            "vocab.json", "merges.txt", "spiece.model", "*.gz"))
    prompts = tm.PROMPTS[:12]
    for kwargs, source, kind in ((dict(path=tmp_path), clip_dirs["plain"][0], "clip"),
                                 (dict(path=tmp_path, subfolder="text_encoder_2"), clip_dirs["proj"][0], "clip"),
                                 (dict(path=tmp_path / "text_encoder_3", max_length=T5_LENGTH),
                                  t5_dirs["gated-gelu"][0], "t5")):
        encoder = load_text_encoder(**kwargs)
        assert encoder.kind == kind
        expected = _load(source, **({"max_length": T5_LENGTH} if kind == "t5" else {})).encode(prompts)
        for key, value in encoder.encode(prompts).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[key]))
    with pytest.raises(ValueError, match="text_encoder_4 does not exist"):
        load_text_encoder(tmp_path, subfolder="text_encoder_4")


def test_full_clip_model_dir_loads_its_text_tower(tmp_path, clip_dirs):
    """A CLIPModel repo (e.g. openai/clip-vit-large-patch14): text tower + text_projection, vision keys ignored."""
    from transformers import CLIPConfig, CLIPModel

    directory, _ = clip_dirs["plain"]
    vocab = json.loads((directory / "vocab.json").read_text())
    text_config = {key: value for key, value in tm.CLIP_TINY.items() if key != "projection_dim"}
    text_config.update(vocab_size=len(vocab), eos_token_id=vocab["<|endoftext|>"],
                       bos_token_id=vocab["<|startoftext|>"])
    torch.manual_seed(3)
    model = CLIPModel(CLIPConfig(text_config=text_config, projection_dim=tm.CLIP_TINY["projection_dim"],
                                 vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=8, patch_size=4))).eval()
    model.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(directory / name, tmp_path / name)
    encoder = load_text_encoder(tmp_path)
    ids, _ = encoder.tokenize(tm.PROMPTS[:12])
    with torch.no_grad():
        expected = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long))
    expected = getattr(expected, "pooler_output", expected)
    assert _max_diff(encoder.encode(tm.PROMPTS[:12])["pooled"], expected) <= TOL


def test_pickle_weights_load_and_malicious_pickles_are_refused(tmp_path, clip_dirs, monkeypatch):
    directory, model = clip_dirs["plain"]
    shutil.copytree(directory, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = load_text_encoder(tmp_path / "bin")
    reference = _load(directory)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(from_bin.params),
                            jax.tree_util.tree_leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil"
    shutil.copytree(tmp_path / "bin", evil)
    torch.save({**model.state_dict(), "extra": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused by torch.load\\(weights_only=True\\)"):
        load_text_encoder(evil)
    assert not marker.exists()
    with open(evil / "pytorch_model.bin", "wb") as handle:  # a bare (non-zip) pickle too
        pickle.dump({"weight": Payload()}, handle)
    with pytest.raises(ValueError, match="refused"):
        weights.read_state_dict(evil / "pytorch_model.bin")
    assert not marker.exists()
    with open(evil / "pytorch_model.bin", "rb") as handle:  # the payload is real: plain unpickling runs it
        pickle.load(handle)
    assert marker.exists()

    monkeypatch.setitem(sys.modules, "torch", None)  # without torch: refused with the conversion one-liner
    with pytest.raises(ValueError, match="torch is not installed.*save_file"):
        weights.read_state_dict(tmp_path / "bin" / "pytorch_model.bin")


def test_key_errors_name_the_key_and_shape(tmp_path, clip_dirs):
    from safetensors.numpy import load_file, save_file

    directory, _ = clip_dirs["plain"]
    state = load_file(str(directory / "model.safetensors"))
    for case, changed, pattern in (
            ("missing", {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc1.weight"},
             r"missing key 'encoder.layers.1.mlp.fc1.weight' \(expected shape \(48, 32\)\)"),
            ("unexpected", {**state, "encoder.layers.9.extra.weight": np.zeros((3, 4), np.float32)},
             r"unexpected key 'encoder.layers.9.extra.weight' with shape \(3, 4\)"),
            ("shape", {**state, "final_layer_norm.weight": np.zeros((31,), np.float32)},
             r"key 'final_layer_norm.weight' has shape \(31,\); final_layer_norm/scale needs \(32,\)")):
        target = tmp_path / case
        shutil.copytree(directory, target, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(changed, str(target / "model.safetensors"))
        with pytest.raises(ValueError, match=pattern):
            load_text_encoder(target)
    with pytest.raises(ValueError, match="not a text encoder directory"):
        load_text_encoder(tmp_path)
    with pytest.raises(ValueError, match="layer='middle'; accepted: last, penultimate or an integer"):
        load_text_encoder(directory, layer="middle")


def test_bfloat16_weights_and_compute(tmp_path, clip_dirs):
    from transformers import CLIPTextModel

    directory, model = clip_dirs["plain"]
    shutil.copytree(directory, tmp_path / "bf16", ignore=shutil.ignore_patterns("*.safetensors"))
    CLIPTextModel.from_pretrained(str(directory), dtype=torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    encoder = load_text_encoder(tmp_path / "bf16", dtype="bfloat16")
    leaf = encoder.params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert leaf.dtype == jax.numpy.bfloat16
    expected = model.encoder.layers[0].mlp.fc1.weight.detach().to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), expected)
    ours = encoder.encode(tm.PROMPTS[:12])
    full = _load(directory).encode(tm.PROMPTS[:12])
    assert ours["text"].dtype == jax.numpy.float32
    scale = float(np.max(np.abs(full["text"])))
    assert float(np.max(np.abs(np.asarray(ours["text"]) - np.asarray(full["text"])))) <= 0.05 * scale


# ----------------------------------------------------------------------------------------------------------------
# Conditioning: TextConditioner, sharding, training and sampling


def test_text_conditioner_create_accepts_encoder_dirs(clip_dirs, tmp_path):
    directory, _ = clip_dirs["plain"]
    text = captions.TextConditioner.create(str(directory))
    assert isinstance(text, captions.TextConditioner) and text.kind == "clip"
    assert text.width == tm.CLIP_TINY["hidden_size"] and text.max_len == tm.CLIP_TINY["max_position_embeddings"]
    tokenize = pickle.loads(pickle.dumps(text.tokenizer()))  # grain workers receive a pickled tokenizer
    ids = np.stack([tokenize(p) for p in tm.PROMPTS[:5]])
    from_ids, encoded = text.from_ids(ids), text.encode(tm.PROMPTS[:5])
    for key in encoded:
        np.testing.assert_array_equal(np.asarray(from_ids[key]), np.asarray(encoded[key]))
    with pytest.raises(ValueError, match="expects a list of prompts"):
        text.encode("a cat")


def test_encoding_shards_rows_over_the_mesh(clip_dirs, tmp_path):
    """Two forced host devices in a subprocess: rows are split over the ("data", "fsdp") mesh (3 rows padded to 4)
    and equal the single-device result (to float32 rounding: the per-device batch differs)."""
    import subprocess

    directory, _ = clip_dirs["proj"]
    from helpers.text_sharding import PROMPTS

    helpers = Path(__file__).resolve().parent / "helpers"

    np.savez(tmp_path / "expected.npz", **{k: np.asarray(v) for k, v in _load(directory).encode(PROMPTS).items()})
    from conftest import host_devices_env

    env = host_devices_env(2)
    result = subprocess.run([sys.executable, str(helpers / "text_sharding.py"), str(directory),
                             str(tmp_path / "expected.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["text_sharding_devices"] == 2
    assert report["rows"] == 3 and report["max_diff"] <= TOL


def test_caption_run_with_a_pretrained_clip_trains_and_samples(clip_dirs, tmp_path, capsys):
    """training.py --captions mnist --text-encoder DIR (a tiny random CLIPTextModel; DiT-tiny with cross-attention to
    its tokens and its pooled vector), then flaxdiff sample --prompts."""
    from conftest import TINY_TRAINING_ARGS

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import training
    from flaxdiff import cli
    from flaxdiff.pipeline import Pipeline

    directory, model = clip_dirs["plain"]
    workdir = tmp_path / "run"
    assert training.main([*TINY_TRAINING_ARGS, "--image-size", "8", "--model", "dit-tiny", "--model-config",
                          '{"input_size": 8, "patch_size": 2, "depth": 1}', "--captions", "mnist", "--text-encoder",
                          str(directory), "--workdir", str(workdir)]) == 0
    pipe = Pipeline.from_pretrained(workdir)
    assert pipe.text.kind == "clip"  # the run's copy of the encoder, loaded back frozen
    cond = pipe.text.encode(["the number 3"])
    ids, _ = pipe.text.tokenize(["the number 3"])
    with torch.no_grad():
        reference = model(torch.tensor(ids, dtype=torch.long)).last_hidden_state
    assert _max_diff(cond["text"], reference) <= TOL
    out = tmp_path / "grid.png"
    capsys.readouterr()
    code = cli.main(["sample", str(workdir), "--prompts", "the number 3", "a handwritten digit five",
                     "--per-class", "1", "--steps", "2", "--sampler", "euler", "--out", str(out)])
    assert code == 0 and out.is_file()
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and result["rows"] == 2
