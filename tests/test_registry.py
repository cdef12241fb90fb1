"""The method registry and what is derived from it: every method class in the package is registered, every
registered method has a cpu-small recipe and tiny configurations that build, and every recipe names a method whose
view rule its ``data.views`` satisfies. Nothing here lists a method by hand."""

from __future__ import annotations

import gc
import importlib
import inspect
import pkgutil

import pytest
import yaml
from method_cases import method_cases, views_per_image

import selfsup.methods
from selfsup.methods import Method, available_methods, get_method, register_method
from selfsup.recipes import RECIPES_DIR, available_recipes


def _package_method_classes() -> dict[str, type]:
    """Every concrete Method subclass defined in a module of ``selfsup.methods``."""
    found = {}
    for info in pkgutil.iter_modules(selfsup.methods.__path__):
        module = importlib.import_module(f"selfsup.methods.{info.name}")
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Method)
                and obj is not Method
                and obj.__module__ == module.__name__
            ):
                found[name] = obj
    return found


def _recipe_methods() -> dict[str, str]:
    """recipe name -> method class name (as the recipe's ``class_path`` resolves)."""
    out = {}
    for name in available_recipes():
        cfg = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
        out[name] = get_method(cfg["method"]["class_path"]).__name__
    return out


def test_every_method_class_of_the_package_is_registered():
    classes = _package_method_classes()
    assert classes, "no Method subclass found in selfsup.methods"
    missing = sorted(set(classes) - set(available_methods()))
    assert not missing, f"Method subclasses without @register_method (selfsup/methods/*.py): {missing}"
    for name, cls in classes.items():
        assert get_method(name) is cls


def test_every_registered_method_ships_a_cpu_small_recipe_and_tiny_configs():
    recipes = _recipe_methods()
    for name in available_methods():
        cls = get_method(name)
        small = [r for r, m in recipes.items() if m == name and r.endswith("cpu-small")]
        assert small, (
            f"{name} has no cpu-small recipe: add selfsup/recipes/{name.lower()}-cpu-small.yaml "
            "(see docs/adding-a-method.md)"
        )
        assert cls.tiny, f"{name}.tiny is empty: declare the init_args of its smallest configuration"
        assert cls.__doc__ and cls.__module__.startswith("selfsup.methods."), name


@pytest.mark.parametrize("case", method_cases(), ids=lambda c: c.id)
def test_tiny_configs_build_small_models(case):
    method = case.build()
    n = sum(p.numel() for p in method.parameters())
    assert n < 500_000, f"{case.id}.tiny builds {n:,} parameters; tests need a tiny model"
    assert views_per_image(case.cls) >= case.cls.min_views


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_views_fit_its_method(recipe):
    cfg = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    cls = get_method(cfg["method"]["class_path"])
    views = cfg["data"].get("views", 2)
    if cls.num_views is not None:
        assert views == cls.num_views, f"{recipe}: {cls.__name__} takes exactly {cls.num_views} views"
    assert views >= cls.min_views, f"{recipe}: {cls.__name__} needs >= {cls.min_views} views"


def test_get_method_by_name_or_import_path_and_errors():
    assert get_method("MMCR") is selfsup.methods.MMCR
    assert get_method("selfsup.methods.mmcr.MMCR") is selfsup.methods.MMCR
    with pytest.raises(ValueError, match="unknown method 'MMRC'; registered: BYOL"):
        get_method("MMRC")
    with pytest.raises(ValueError, match="cannot import method 'nowhere.Thing'"):
        get_method("nowhere.Thing")
    with pytest.raises(ValueError, match="not a selfsup Method"):
        get_method("torch.nn.Linear")
    with pytest.raises(TypeError, match="expects a Method subclass"):
        register_method(dict)


def test_a_second_class_of_the_same_name_is_refused():
    cls = type("MMCR", (Method,), {"__module__": "elsewhere"})
    try:
        with pytest.raises(ValueError, match="a method named 'MMCR' is already registered"):
            register_method(cls)
    finally:
        # a live second Method subclass named MMCR makes jsonargparse's "--method MMCR" ambiguous for every later
        # test (CI failed on it when the garbage collector had not yet run): drop it now
        del cls
        gc.collect()
    assert [c for c in Method.__subclasses__() if c.__module__ == "elsewhere"] == []
