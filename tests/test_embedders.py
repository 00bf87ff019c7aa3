"""Condition encoders (class, trainable text, frozen CLIP) and the caption tokenizer."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_clip
from ldm.data.synthetic import ShapesGenerator
from ldm.nets.tokenizer import MIN_VOCAB_SIZE, CaptionTokenizer
from ldm.data.tokenizer import main as tokenizer_main
from ldm.nets.embedders import ClassEmbedder, FrozenCLIPTextEncoder, TransformerTextEncoder
from ldm.utils.checkpoint import CheckpointMismatchError, load_state_dict_file, load_strict, sub_state_dict


@pytest.fixture(scope="module")
def captions() -> list[str]:
    gen = ShapesGenerator(32, seed=0)
    return [gen[i].caption for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer(captions) -> CaptionTokenizer:
    return CaptionTokenizer.train(captions, vocab_size=320)


# ---- class embedder ---------------------------------------------------------------------------

def test_class_embedder_reproduces_reference_context(reference_dir):
    io_ref = torch.load(reference_dir / "txt_crossattn_f4_io.pt", weights_only=True)
    params = io_ref["config"]["cond_stage_config"]["params"]
    embedder = ClassEmbedder(**params)
    state = sub_state_dict(load_state_dict_file(reference_dir / "txt_crossattn_f4.ckpt"), "cond_stage_model.")
    load_strict(embedder, state, "txt_crossattn_f4.ckpt")
    labels = io_ref["unet"]["class_label"]
    context = embedder(labels)
    assert context.shape == (labels.shape[0], 1, params["embed_dim"])
    torch.testing.assert_close(context, io_ref["unet"]["context"], rtol=0, atol=0)
    assert embedder.key == "class_label"
    # A table with a null row no longer fits the reference checkpoint: refused, key named.
    with pytest.raises(CheckpointMismatchError, match="embedding.weight"):
        load_strict(ClassEmbedder(**params, null_class=True), state)


def test_class_embedder_null_class_and_range_errors():
    plain = ClassEmbedder(8, 48)
    assert plain.embedding.num_embeddings == 48
    with pytest.raises(ValueError, match=r"class id 57 out of range \[0, 48\)"):
        plain(torch.tensor([3, 57]))
    with pytest.raises(ValueError, match=r"class id 48 out of range \[0, 48\)"):
        plain(torch.tensor([48]))
    with pytest.raises(ValueError, match=r"class id -1 out of range .*without a \.cls member"):
        plain(torch.tensor([-1]))
    with pytest.raises(ValueError, match="null_class=True"):
        plain.null_condition(2)
    with pytest.raises(TypeError, match="integer"):
        plain(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        plain(torch.tensor([[1]]))

    guided = ClassEmbedder(8, 48, null_class=True)
    assert guided.embedding.num_embeddings == 49
    null = guided.null_condition(3, device="cpu")
    assert null.dtype == torch.long and null.tolist() == [48, 48, 48]
    out = guided(torch.cat([torch.tensor([5]), null]))
    assert out.shape == (4, 1, 8)
    torch.testing.assert_close(out[1:, 0], guided.embedding.weight[48].expand(3, 8))
    assert not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"class id 49 out of range \[0, 49\); 48 is the null class"):
        guided(torch.tensor([49]))


# ---- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_framing(tokenizer, captions):
    assert MIN_VOCAB_SIZE < tokenizer.vocab_size <= 320
    batch = captions[:8]
    ids, mask = tokenizer.encode_batch(batch, max_len=64)
    assert ids.shape == mask.shape == (8, 64) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, caption in enumerate(batch):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # real tokens first, then padding
        assert ids[row, 0] == tokenizer.cls_id and ids[row, n - 1] == tokenizer.sep_id
        assert (ids[row, n:] == tokenizer.pad_id).all()
        assert tokenizer.decode(ids[row]) == caption
    # Merges learnt from the captions: a frequent word is one token, far fewer tokens than bytes.
    assert int(mask[0].sum()) - 2 < len(batch[0]) / 2
    # Unseen words and case are no problem for a byte-level vocabulary (text is lowercased).
    ids, _ = tokenizer.encode_batch(["A Zebra, jumping ÜBER 3 fences!"], max_len=64)
    assert tokenizer.decode(ids[0]) == "a zebra, jumping über 3 fences!"
    # The empty caption (classifier-free guidance's null condition) is [CLS] [SEP].
    ids, mask = tokenizer.encode_batch([""], max_len=6)
    assert ids[0].tolist() == [tokenizer.cls_id, tokenizer.sep_id] + [tokenizer.pad_id] * 4
    assert mask[0].tolist() == [True, True, False, False, False, False]


def test_tokenizer_truncation_keeps_sep(tokenizer, captions):
    full, full_mask = tokenizer.encode_batch([captions[0]], max_len=64)
    short, short_mask = tokenizer.encode_batch([captions[0]], max_len=6)
    assert int(full_mask.sum()) > 6 and short_mask.all()
    assert short[0].tolist() == full[0, :5].tolist() + [tokenizer.sep_id]
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        tokenizer.encode_batch(["a"], max_len=1)
    with pytest.raises(TypeError, match="not one string"):
        tokenizer.encode_batch("a red circle", max_len=8)


def test_tokenizer_training_is_deterministic_and_saves(tokenizer, captions, tmp_path):
    again = CaptionTokenizer.train(iter(captions), vocab_size=320)  # any iterable, read once
    assert again.backend.to_str() == tokenizer.backend.to_str()
    other = CaptionTokenizer.train(captions[:50], vocab_size=300)
    assert other.backend.to_str() != tokenizer.backend.to_str()

    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    loaded = CaptionTokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    for a, b in zip(tokenizer.encode_batch(captions[:5], 40), loaded.encode_batch(captions[:5], 40)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        CaptionTokenizer.train(captions, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="python -m ldm.data.tokenizer"):
        CaptionTokenizer.load(tmp_path / "missing.json")


def _write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tokenizer_cli_reads_shard_captions(captions, tmp_path, capsys):
    for s in range(2):
        _write_shard(tmp_path / f"shard-{s:06d}.tar",
                     {f"{s}{i:04d}.{ext}": (captions[s * 20 + i].encode() if ext == "txt" else b"\x89PNG")
                      for i in range(20) for ext in ("txt", "png")})
    out = tmp_path / "tok" / "tokenizer.json"
    tokenizer_main(["--shards", str(tmp_path / "shard-{000000..000001}.tar"), "--out", str(out), "--vocab-size", "300"])
    assert "trained on 40 captions" in capsys.readouterr().out
    # Same captions in the same order as the library call.
    assert CaptionTokenizer.load(out).backend.to_str() == CaptionTokenizer.train(captions[:40], 300).backend.to_str()

    _write_shard(tmp_path / "nocaps.tar", {"0.png": b"\x89PNG"})
    with pytest.raises(SystemExit, match=r"no \.txt caption members"):
        tokenizer_main(["--shards", str(tmp_path / "nocaps.tar"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="not found"):
        tokenizer_main(["--shards", str(tmp_path / "absent-{0..1}.tar"), "--out", str(tmp_path / "x.json")])


# ---- trainable text encoder ---------------------------------------------------------------------

def _text_encoder(tokenizer, **kwargs) -> TransformerTextEncoder:
    torch.manual_seed(0)
    return TransformerTextEncoder(tokenizer, **{"n_embed": 32, "n_layer": 2, "n_head": 2, "max_seq_len": 24, **kwargs})


def test_text_encoder_shapes_and_gradients(tokenizer, captions):
    enc = _text_encoder(tokenizer)
    layers = enc.transformer.attn_layers.layers  # [norm, attention], [norm, feed-forward] per layer
    assert enc.transformer.token_emb.num_embeddings == tokenizer.vocab_size and len(layers) == 4
    assert not torch.equal(layers[1][1].net[0][0].weight, layers[3][1].net[0][0].weight)  # independent init
    out = enc(captions[:3] + [""])
    assert out.shape == (4, 24, 32) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Different captions give different contexts; one caption gives the same one in any batch.
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[3]).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(enc(captions[1:2])[0], enc([captions[5], captions[1]])[1], rtol=1e-5, atol=1e-6)
    assert enc.null_condition(2) == ["", ""] and enc.key == "caption"


def test_text_encoder_ignores_padding(tokenizer, captions):
    enc = _text_encoder(tokenizer).eval()  # eval also exercises PyTorch's fused inference path
    ids, mask = enc.tokenize([min(captions, key=len)])
    n = int(mask.sum())
    assert 2 < n < 24
    pad_change, position_change = torch.randn(32), torch.randn(24 - n, 32)
    with torch.no_grad():
        before = enc.encode(ids, mask)
        enc.transformer.token_emb.weight[tokenizer.pad_id] += pad_change  # what padding tokens read changes...
        enc.transformer.pos_emb.emb.weight[n:] += position_change
        after = enc.encode(ids, mask)
        train_mode = enc.train().encode(ids, mask)  # dropout is 0: same numbers on the slow path
    torch.testing.assert_close(after[:, :n], before[:, :n], rtol=1e-5, atol=1e-5)  # ...real tokens don't see it
    assert (after[:, n:] - before[:, n:]).abs().max() > 1e-2
    torch.testing.assert_close(train_mode, after, rtol=1e-5, atol=1e-5)
    # Without the key padding mask the same change would reach the caption's tokens.
    with torch.no_grad():
        unmasked = enc.encode(ids, torch.ones_like(mask))
        enc.transformer.token_emb.weight[tokenizer.pad_id] -= pad_change
        enc.transformer.pos_emb.emb.weight[n:] -= position_change
        assert (enc.encode(ids, torch.ones_like(mask))[:, :n] - unmasked[:, :n]).abs().max() > 1e-3


def test_text_encoder_without_layers_is_a_normalised_embedding(tokenizer, captions):
    """n_layer=0 (the quickstart's encoder): each position is the final LayerNorm of its token and
    position embeddings, so a word at a position reads the same in every caption, and both
    tables train."""
    enc = _text_encoder(tokenizer, n_layer=0, max_seq_len=16)
    net = enc.transformer
    assert len(net.attn_layers.layers) == 0
    ids, mask = enc.tokenize(captions[:3])
    out = enc.encode(ids, mask)
    expected = torch.nn.functional.layer_norm(net.token_emb(ids) + net.pos_emb.emb.weight, (32,),
                                              net.norm.weight, net.norm.bias)
    torch.testing.assert_close(out, expected)
    assert out.shape == (3, 16, 32)
    (out * torch.randn_like(out)).sum().backward()  # not out.pow(2): a LayerNorm's output has a fixed norm
    assert net.token_emb.weight.grad.abs().sum() > 0 and net.pos_emb.emb.weight.grad.abs().sum() > 0


def test_text_encoder_from_file_and_pickles(tokenizer, captions, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    enc = _text_encoder(str(path), vocab_size=tokenizer.vocab_size + 8)
    assert enc.transformer.token_emb.num_embeddings == tokenizer.vocab_size + 8
    copy = pickle.loads(pickle.dumps(enc))  # spawned DDP workers receive the module pickled
    with torch.no_grad():
        torch.testing.assert_close(copy(captions[:2]), enc(captions[:2]))
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        _text_encoder(tokenizer, vocab_size=10)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        _text_encoder(tokenizer, n_head=3)
    with pytest.raises(TypeError, match="list of strings"):
        enc("a red circle")
    with pytest.raises(ValueError, match="exceed max_seq_len 24"):
        enc.encode(torch.zeros(1, 30, dtype=torch.long), torch.ones(1, 30, dtype=torch.bool))


def test_text_encoder_names_the_captions_it_truncates(tokenizer, captions):
    enc = _text_encoder(tokenizer, max_seq_len=12)
    long = " ".join(captions[:4])
    kept = enc.truncations([captions[0][:8], long])
    ids, mask = enc.tokenize([long])
    assert kept[0] is None and mask.all()  # the long caption fills every position
    assert kept[1] == tokenizer.decode(ids[0]) and long.lower().startswith(kept[1]) and len(kept[1]) < len(long)


# ---- frozen CLIP --------------------------------------------------------------------------------

CLIP_WORDS = ("red", "blue", "circle", "square")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A tiny random CLIP text model and BPE tokenizer saved as a local pretrained folder."""
    folder = tmp_path_factory.mktemp("clip")
    return folder, make_tiny_clip(folder)


def test_frozen_clip_encoder_from_local_folder(clip_folder, monkeypatch):
    from transformers import CLIPTextModel

    folder, vocab = clip_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = FrozenCLIPTextEncoder(str(folder))
    ids = enc.tokenize(["a red circle", ""])
    assert ids.shape == (2, 77)
    circle = [vocab[c] for c in "circl"] + [vocab["e</w>"]]
    assert ids[0, :10].tolist() == [0, vocab["a</w>"], vocab["red</w>"], *circle, 1]
    assert (ids[0, 10:] == 1).all() and ids[1].tolist() == [0] + [1] * 76  # padded with the end token

    out = enc(["a red circle", "a blue square", ""])
    assert out.shape == (3, 77, 32) and not out.requires_grad
    assert (out[0] - out[1]).abs().max() > 1e-3
    reference = CLIPTextModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(input_ids=enc.tokenize(["a red circle"]), output_hidden_states=True)
    torch.testing.assert_close(out[:1], expected.last_hidden_state)

    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not enc.transformer.training  # stays frozen inside a training module
    assert any(k.startswith("transformer.encoder.layers.0.") for k in enc.state_dict())

    penultimate = FrozenCLIPTextEncoder(str(folder), layer="penultimate")(["a red circle"])
    torch.testing.assert_close(penultimate, expected.hidden_states[-2])
    assert (penultimate - out[:1]).abs().max() > 1e-3
    assert enc.null_condition(2) == ["", ""]


def test_frozen_clip_encoder_errors(clip_folder, tmp_path, monkeypatch):
    folder, _ = clip_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenCLIPTextEncoder(str(folder), layer="middle")
    with pytest.raises(ValueError, match="exceeds the model's 77 positions"):
        FrozenCLIPTextEncoder(str(folder), max_length=100)
    with pytest.raises(OSError, match="save_pretrained"):
        FrozenCLIPTextEncoder(str(tmp_path / "nothing-here"))
    # Shorter contexts are allowed (a model trained with them).
    assert FrozenCLIPTextEncoder(str(folder), max_length=16)(["a red circle"]).shape == (1, 16, 32)


def test_frozen_clip_encoder_names_the_captions_it_truncates(clip_folder, monkeypatch):
    folder, _ = clip_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = FrozenCLIPTextEncoder(str(folder), max_length=8)  # start token, 6 words, end token
    assert enc.truncations(["red blue red", "red blue red blue red blue red"]) == [None, "red blue red blue red blue"]
