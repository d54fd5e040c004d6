import pytest
import torch

import ratelab
from ratelab.core.registry import register_model


def test_list_models_pattern():
    names = ratelab.list_models("crate_*")
    for n in (
        "crate_tiny_patch16_224",
        "crate_small_patch16_224",
        "crate_base_patch16_224",
        "crate_large_patch16_224",
        "crate_base_patch8_224",
    ):
        assert n in names
    assert all(n.startswith("crate_") for n in names)
    assert ratelab.list_models("no_such_*") == []


def test_create_model_runtime_kwargs():
    m = ratelab.create_model("test_crate", num_classes=7, img_size=16, in_chans=1)
    assert m.model_name == "test_crate"
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    m = ratelab.create_model("test_crate", num_classes=None)  # None values are dropped, defaults apply
    assert m.num_classes == 10


def test_unknown_model_error_names_it():
    with pytest.raises(KeyError, match="crate_nope"):
        ratelab.create_model("crate_nope")


def test_unknown_kwarg_is_type_error():
    with pytest.raises(TypeError):
        ratelab.create_model("test_crate", not_an_option=3)


def test_duplicate_registration_is_an_error():
    def test_crate(**kw):  # same name as an existing entry point
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(test_crate)


def test_import_is_quiet_and_light():
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('error'); import ratelab, sys; print('ratelab.models' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr == ""
    assert out.stdout.strip() == "False"  # models are registered lazily, on first lookup


@pytest.mark.parametrize("name", ["crate_tiny_patch16_224", "adventurer_tiny_patch16_224"])
def test_named_patch_size_can_be_overridden(name):
    # The entry point's patch size is a default, not a fixed argument: 224 / 8 = 28 -> 784 patch tokens + 1.
    model = ratelab.create_model(name, patch_size=8, depth=1, num_classes=3)
    logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 3)
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape[1] == 785


def test_unknown_model_suggests_similar_names():
    from ratelab.core.errors import UnknownNameError

    with pytest.raises(UnknownNameError) as info:
        ratelab.create_model("crate_tiny_patch16_244")  # a typo of crate_tiny_patch16_224
    msg = str(info.value)
    assert "did you mean" in msg and "'crate_tiny_patch16_224'" in msg
    # by similarity, not the whole family in registry order
    assert "crate_large_patch8_224" not in msg and msg.count("crate_") <= 6
    with pytest.raises(UnknownNameError, match="did you mean 'test_adventurer'"):
        ratelab.create_model("test_adventurr")


def test_old_import_paths_resolve_to_the_factory():
    from ratelab.core import checkpoint, registry
    from ratelab.models import _factory

    assert registry.create_model is _factory.create_model is ratelab.create_model
    assert registry.list_models is _factory.list_models is ratelab.list_models
    assert checkpoint.load_model is _factory.load_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        registry.nope  # noqa: B018


def test_model_args_round_trip_through_save_and_load(tmp_path):
    # The failing case: an architecture argument outside num_classes/img_size/in_chans.
    from ratelab.core.checkpoint import load_model, save_model

    model = ratelab.create_model("mcr2_mlp_small", hidden=1024).eval()
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    x = torch.randn(3, 1, model.img_size, model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    assert back.model_args["hidden"] == 1024


def test_model_args_follow_a_reset_classifier(tmp_path):
    from ratelab.core.checkpoint import load_model, save_model

    model = ratelab.create_model("test_crate", num_classes=4)
    model.reset_classifier(6)
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").num_classes == 6
