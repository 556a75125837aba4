"""Text prompts -> open_clip embeddings -> text_embeddings.npz, all offline.

No weights can be downloaded here, so the model is a seeded random init of ViT-B-32; the
numbers are meaningless but the plumbing (shapes, norms, determinism, checkpoint loading,
error messages) is the same as with real weights.
"""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from fastsam2.export.text import (  # noqa: E402
    TextEncoderSpec,
    compute_text_embeddings,
    load_text_embeddings,
    load_text_encoder,
    parse_prompts,
    save_text_embeddings,
)
from fastsam2.runtime.errors import BundleError, InputError  # noqa: E402

PROMPTS = ["cyclist", "red soccer ball", "dog"]
RANDOM0 = TextEncoderSpec(model="ViT-B-32", pretrained="random", seed=0)


@pytest.fixture(scope="module")
def encoder():
    # One model for the module: building ViT-B-32 (both towers) costs ~2 s on CPU.
    with pytest.warns(UserWarning, match="not meaningful"):
        return load_text_encoder(RANDOM0)


@pytest.fixture(scope="module")
def embeddings(encoder):
    return encoder.encode(PROMPTS)


# -- embeddings ---------------------------------------------------------------------------

def test_embeddings_are_unit_float32_vectors_of_dim_512(encoder, embeddings):
    assert list(embeddings) == PROMPTS
    for e in embeddings.values():
        assert e.shape == (512,) and e.dtype == np.float32
        assert abs(np.linalg.norm(e) - 1.0) < 1e-5
    assert encoder.info["dim"] == 512


def test_info_says_random_and_records_the_model(encoder):
    info = encoder.info
    assert info["random"] is True and info["pretrained"] is None
    assert info["model"] == "ViT-B-32" and info["checkpoint_sha256"] is None
    assert info["open_clip_version"] == open_clip.__version__


def test_different_prompts_give_different_embeddings(embeddings):
    a, b, c = (embeddings[p] for p in PROMPTS)
    assert not np.allclose(a, b) and not np.allclose(b, c) and not np.allclose(a, c)


def test_same_seed_gives_the_same_embeddings(embeddings):
    with pytest.warns(UserWarning, match="not meaningful"):
        again, info = compute_text_embeddings(PROMPTS, RANDOM0)
    for p in PROMPTS:
        np.testing.assert_array_equal(again[p], embeddings[p])
    assert info["random"] is True and info["dim"] == 512


def test_different_seed_gives_different_embeddings(embeddings):
    with pytest.warns(UserWarning):
        other, _ = compute_text_embeddings(PROMPTS, TextEncoderSpec(pretrained="random", seed=1))
    assert not np.allclose(other["cyclist"], embeddings["cyclist"])


def test_random_init_leaves_the_global_torch_rng_alone(encoder):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    encoder.encode(["cyclist"])  # encode draws no randomness either
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_importing_the_module_does_not_import_torch():
    # The runtime reuses load_text_embeddings on devices without torch.
    code = ("import sys, fastsam2.export.text as t; "
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- npz ----------------------------------------------------------------------------------

def test_npz_round_trip_is_exact(tmp_path, embeddings):
    path = tmp_path / "text_embeddings.npz"
    save_text_embeddings(path, embeddings)
    back = load_text_embeddings(path)
    assert list(back) == PROMPTS
    for p in PROMPTS:
        assert back[p].dtype == np.float32
        np.testing.assert_array_equal(back[p], embeddings[p])


def test_npz_is_written_at_exactly_the_given_path(tmp_path, embeddings):
    path = tmp_path / "emb.bin"
    save_text_embeddings(path, embeddings)
    assert path.is_file() and not (tmp_path / "emb.bin.npz").exists()


def test_loading_a_broken_npz_is_a_bundle_error(tmp_path):
    bad = tmp_path / "text_embeddings.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="text_embeddings.npz"):
        load_text_embeddings(bad)
    np.savez(bad, prompts=np.array(["a"]))
    with pytest.raises(BundleError):
        load_text_embeddings(bad)


# -- parse_prompts ------------------------------------------------------------------------

def test_comma_separated_prompts_are_stripped():
    assert parse_prompts(" cyclist , red soccer ball,dog ") == PROMPTS


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# what to track\ncyclist\n\n   \n  red soccer ball  \n# dog\n")
    assert parse_prompts(None, f) == ["cyclist", "red soccer ball"]


def test_duplicates_are_dropped_keeping_first_order(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("dog\ncyclist\n")
    assert parse_prompts("cyclist, dog, cyclist", f) == ["cyclist", "dog"]


@pytest.mark.parametrize("prompts", ["", "   ", "cyclist,,dog", "cyclist, "])
def test_empty_prompt_is_an_input_error(prompts):
    with pytest.raises(InputError):
        parse_prompts(prompts)


def test_no_prompts_at_all_is_an_input_error(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="no text prompts"):
        parse_prompts(None, f)
    with pytest.raises(InputError, match="no text prompts"):
        parse_prompts(None, None)
    with pytest.raises(InputError, match="cannot read"):
        parse_prompts(None, tmp_path / "missing.txt")


def test_compute_rejects_empty_prompts():
    with pytest.raises(InputError):
        compute_text_embeddings(["cyclist", "  "], RANDOM0)
    with pytest.raises(InputError):
        compute_text_embeddings("cyclist", RANDOM0)


# -- model selection errors ---------------------------------------------------------------

def test_unknown_model_lists_valid_names():
    with pytest.raises(InputError, match="ViT-B-32") as e:
        compute_text_embeddings(["dog"], TextEncoderSpec(model="ViT-B-33", pretrained="random"))
    assert "\n" not in str(e.value)


def test_unknown_tag_is_an_input_error():
    with pytest.raises(InputError, match="laion2b_s34b_b79k"):
        compute_text_embeddings(["dog"], TextEncoderSpec(pretrained="no_such_tag"))


def test_unfetchable_tag_fails_fast_and_points_to_text_checkpoint(monkeypatch, tmp_path):
    """Offline and not cached: refused before any network probe or model build (what keeps it
    fast: the hub's retries take ~46 s), with a way out in the message."""
    import socket

    import huggingface_hub.constants as hf

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well as
    # the env; an empty cache makes sure a locally cached copy cannot satisfy the request.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network offline"))
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("built a model offline"))
    with pytest.raises(InputError, match="--text-checkpoint") as e:
        compute_text_embeddings(["dog"], TextEncoderSpec("ViT-B-32", "laion2b_s34b_b79k"))
    msg = str(e.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in msg and "HF_HUB_OFFLINE is set" in msg and "\n" not in msg


def test_unreachable_hub_fails_before_any_download(monkeypatch, tmp_path):
    """Online mode, but the weights' host does not answer: one TCP probe decides, open_clip's
    download (and the hub's retries) never starts."""
    import socket

    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    probed = []

    def refuse(addr, timeout=None):
        probed.append(addr)
        raise OSError(101, "Network is unreachable")

    def no_download(*a, **k):
        raise AssertionError("open_clip.create_model must not be called")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(open_clip, "create_model", no_download)
    with pytest.raises(InputError) as e:
        compute_text_embeddings(["dog"], TextEncoderSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert probed == [("huggingface.co", 443)]
    assert "huggingface.co is unreachable: Network is unreachable" in str(e.value)
    assert "--text-pretrained random" in str(e.value)


def test_cached_weights_skip_the_probe(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as hf

    (tmp_path / "hf" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K").mkdir(parents=True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed despite the cache"))
    called = []

    def fake_create(*a, **k):
        called.append(k.get("pretrained"))
        raise RuntimeError("stand-in for a load from the cache")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    with pytest.raises(InputError, match="could not fetch open_clip weights"):
        compute_text_embeddings(["dog"], TextEncoderSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert called == ["laion2b_s34b_b79k"]


# -- local checkpoints --------------------------------------------------------------------

@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "wrapped"])
def test_checkpoint_round_trip_gives_the_same_embeddings(tmp_path, encoder, embeddings, wrapped):
    path = tmp_path / "clip.pt"
    sd = encoder.model.state_dict()
    torch.save({"state_dict": sd, "epoch": 3} if wrapped else sd, path)
    # A checkpoint wins over the default tag: nothing is downloaded.
    spec = TextEncoderSpec(model="ViT-B-32", checkpoint=path)
    loaded, info = compute_text_embeddings(PROMPTS, spec)
    for p in PROMPTS:
        np.testing.assert_array_equal(loaded[p], embeddings[p])
    assert info["random"] is False and info["pretrained"] is None
    assert len(info["checkpoint_sha256"]) == 64


def test_corrupt_or_missing_checkpoint_is_an_input_error(tmp_path):
    bad = tmp_path / "clip.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match="clip.pt") as e:
        compute_text_embeddings(["dog"], TextEncoderSpec(checkpoint=bad))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not found"):
        compute_text_embeddings(["dog"], TextEncoderSpec(checkpoint=tmp_path / "missing.pt"))


def test_checkpoint_for_another_architecture_is_an_input_error(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"text_projection": torch.zeros(3, 3)}, path)
    with pytest.raises(InputError, match="wrong.pt"):
        compute_text_embeddings(["dog"], TextEncoderSpec(checkpoint=path))
