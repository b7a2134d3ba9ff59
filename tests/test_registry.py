"""Plug-in registries: registration, lookup by name or import path, checks, params."""

from __future__ import annotations

import importlib
import sys

import pytest

from fedkd.config import ConfigError
from fedkd.registry import Registry, UnknownNameError, bind_params, import_ref


def _fresh(check=None) -> Registry:
    return Registry("widget", check=check)


def test_register_and_get():
    reg = _fresh()

    @reg.register("square")
    def square(x):
        return x * x

    @reg.register()
    def cube(x):  # registered under its __name__
        return x**3

    assert reg.get("square") is square
    assert reg.get("cube") is cube
    assert reg.get("square")(3) == 9
    assert reg.names() == ["cube", "square"]
    assert list(reg) == ["cube", "square"]
    assert "cube" in reg and "sqrt" not in reg


def test_register_returns_the_object_unchanged():
    reg = _fresh()

    class Widget:
        pass

    assert reg.register("w")(Widget) is Widget


def test_duplicate_name_raises():
    reg = _fresh()
    reg.register("f")(len)
    with pytest.raises(ValueError, match="widget 'f' is already registered"):
        reg.register("f")(abs)
    assert reg.get("f") is len  # the first registration stands
    reg.register("f")(len)  # re-registering the same object is harmless
    assert reg.names() == ["f"]


def test_register_needs_a_name():
    reg = _fresh()
    with pytest.raises(ValueError, match="needs a name"):
        reg.register()(object())


def test_unknown_name_lists_known_names():
    reg = _fresh()
    reg.register("alpha")(len)
    reg.register("beta")(abs)
    with pytest.raises(UnknownNameError, match="unknown widget 'gamma'") as err:
        reg.get("gamma")
    assert "known: alpha, beta" in str(err.value)
    assert "package.module:Name" in str(err.value)
    assert isinstance(err.value, KeyError)
    assert not str(err.value).startswith(("'", '"'))  # plain message, not KeyError's repr


@pytest.mark.parametrize("ref", ["", None, 3])
def test_empty_or_non_string_name(ref):
    with pytest.raises(UnknownNameError, match="non-empty name"):
        _fresh().get(ref)


def test_import_path():
    from fedkd.models import MODELS, mlp

    assert MODELS.get("fedkd.models:mlp") is mlp
    assert _fresh().get("fedkd.models:mlp") is mlp  # needs no registration
    assert import_ref("fedkd.registry:Registry") is Registry


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_module_xyz:Thing", "cannot import module"),
        ("fedkd.models:no_such_model", "has no attribute"),
        ("fedkd.models:", "must look like"),
        (":mlp", "must look like"),
    ],
)
def test_bad_import_path(ref, message):
    with pytest.raises(UnknownNameError, match=message):
        _fresh().get(ref)


def test_check_rejects_unfit_registration():
    reg = _fresh(check=callable)
    with pytest.raises(TypeError, match="'five' is not a valid widget"):
        reg.register("five")(5)
    assert "five" not in reg


def test_check_rejects_unfit_import():
    from fedkd.losses import KD_LOSSES

    # a model factory is a function, not an nn.Module class
    with pytest.raises(TypeError, match="is not a valid kd loss"):
        KD_LOSSES.get("fedkd.models:mlp")
    # the same path is fine where any callable is
    reg = _fresh(check=callable)
    assert reg.get("fedkd.models:mlp") is not None


def test_check_accepts_fit_entries():
    reg = _fresh(check=lambda c: isinstance(c, type) and issubclass(c, Exception))
    reg.register("oops")(RuntimeError)
    assert reg.get("oops") is RuntimeError
    assert reg.get("builtins:KeyError") is KeyError
    with pytest.raises(TypeError):
        reg.get("builtins:len")


def test_autoload_registers_builtins_before_first_lookup():
    from fedkd.strategy import SERVER_STRATEGIES

    assert "kd" in SERVER_STRATEGIES.names()
    assert "local" in SERVER_STRATEGIES


def test_autoload_module(tmp_path, monkeypatch):
    plugins, target = "fedkd_test_plugins_xyz", "fedkd_test_registry_xyz"
    (tmp_path / f"{plugins}.py").write_text(
        f"from {target} import REG\n@REG.register('auto')\ndef auto():\n    return 42\n"
    )
    (tmp_path / f"{target}.py").write_text(
        f"from fedkd.registry import Registry\nREG = Registry('thing', autoload={plugins!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reg = importlib.import_module(target).REG
        assert plugins not in sys.modules  # nothing imported until the first lookup
        assert reg.get("auto")() == 42
        assert plugins in sys.modules
        assert reg.names() == ["auto"]
    finally:
        sys.modules.pop(plugins, None)
        sys.modules.pop(target, None)


# --- bind_params ---------------------------------------------------------------------


def _target(input_shape, num_classes, hidden=100, *, layers=2):
    return None


def test_bind_params_accepts_known_params():
    runtime = ("input_shape", "num_classes")
    bind_params(_target, {}, "clients.models[0]", runtime)
    bind_params(_target, {"hidden": 3, "layers": 1}, "clients.models[0]", runtime)


def test_bind_params_rejects_unknown_param_naming_path_dot_param():
    with pytest.raises(ConfigError, match="unknown parameter; valid: hidden, layers") as err:
        bind_params(_target, {"widht": 3}, "server.teacher", ("input_shape", "num_classes"))
    assert err.value.field == "server.teacher.widht"


def test_bind_params_rejects_runtime_params():
    with pytest.raises(ConfigError) as err:
        bind_params(_target, {"num_classes": 3}, "m", ("input_shape", "num_classes"))
    assert err.value.field == "m.num_classes"


def test_bind_params_with_no_params_says_none():
    def bare(seed):
        return None

    with pytest.raises(ConfigError, match=r"valid: \(none\)"):
        bind_params(bare, {"x": 1}, "p", ("seed",))


def test_bind_params_allows_anything_with_var_kwargs():
    def loose(seed, **kwargs):
        return None

    bind_params(loose, {"anything": 1}, "p", ("seed",))


def test_bind_params_on_a_class_uses_its_constructor():
    from fedkd.losses import SoftKL

    bind_params(SoftKL, {"temperature": 2.0}, "loss")
    with pytest.raises(ConfigError) as err:
        bind_params(SoftKL, {"temp": 2.0}, "loss")
    assert err.value.field == "loss.temp"


def test_model_spec_check_names_the_field():
    from fedkd.config import Spec
    from fedkd.models import check_model_spec

    check_model_spec(Spec("mlp", {"hidden": 8}), "clients.models[0]")
    with pytest.raises(ConfigError) as err:
        check_model_spec(Spec("mlp", {"width": 8}), "clients.models[0]")
    assert err.value.field == "clients.models[0].width"
    with pytest.raises(UnknownNameError, match="known: "):
        check_model_spec(Spec("resnet999"), "clients.models[0]")
