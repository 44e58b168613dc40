"""Test-only ComfyUI nodes: tiny models and random conditioning as graph nodes, plus object hand-off.

Why: a prompt is JSON, so a graph cannot receive a Python object directly. These nodes build the
seeded tiny models of ``tiny_models`` inside the graph (``TestTinyModel`` / ``TestTinyVAE`` /
``TestRandomConditioning``), pass objects a test built itself (``put_object`` + ``TestObject<TYPE>``),
and hand any output back to the test (``TestCapture`` → ``CAPTURED``).

They build outside ``torch.inference_mode`` (the executor runs every node inside it): a parameter made
there is an inference tensor, and a training node downstream could then never backpropagate into it.

Import only after ``comfy_host.boot``; register with ``register_test_nodes(TEST_NODES)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .tiny_models import FAMILIES, TinyFamily, tiny_vae

CATEGORY = "_tests"
OBJECT_TYPES = ("MODEL", "VAE", "CLIP", "CONDITIONING", "LATENT", "IMAGE", "MASK", "LORA2_ADAPTER", "LORA2_HISTORY")
OBJECTS: dict[str, Any] = {}
CAPTURED: dict[str, Any] = {}


class AnyType(str):
    """A socket type that matches every other type (ComfyUI compares types with ``!=``)."""

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


def put_object(key: str, value: Any) -> str:
    """Store ``value`` for a ``TestObject<TYPE>`` node whose ``key`` input is ``key``; returns the key."""
    OBJECTS[key] = value
    return key


class _FamilyNode:
    """A node that builds one seeded object for a tiny family: ``make(family, seed, **extra inputs)``."""

    __test__ = False  # not a pytest test class despite the name
    CATEGORY = CATEGORY
    FUNCTION = "build"
    EXTRA_INPUTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        seed = ("INT", {"default": 0, "min": 0, "max": 2**31})
        return {"required": {"family": (list(FAMILIES),), "seed": seed, **cls.EXTRA_INPUTS}}

    def build(self, family: str, seed: int, **extra: Any) -> tuple[Any]:
        with torch.inference_mode(False):
            return (self.make(FAMILIES[family], seed, **extra),)

    @staticmethod
    def make(family: TinyFamily, seed: int, **extra: Any) -> Any:
        raise NotImplementedError


class TestTinyModel(_FamilyNode):
    """MODEL: a seeded tiny SD1.5 / SDXL / Flux model (see ``tiny_models`` for the shapes)."""

    RETURN_TYPES = ("MODEL",)

    @staticmethod
    def make(family: TinyFamily, seed: int) -> Any:
        return family.model(seed)


class TestTinyVAE(_FamilyNode):
    """VAE: a seeded random TAESD for the family's latent channels (4, or 16 for Flux)."""

    RETURN_TYPES = ("VAE",)

    @staticmethod
    def make(family: TinyFamily, seed: int) -> Any:
        return tiny_vae(family.latent_channels, seed)


class TestRandomConditioning(_FamilyNode):
    """CONDITIONING: random embeddings with the extras the family needs (pooled output, guidance)."""

    RETURN_TYPES = ("CONDITIONING",)
    EXTRA_INPUTS: ClassVar[dict[str, Any]] = {"batch": ("INT", {"default": 1, "min": 1, "max": 64})}

    @staticmethod
    def make(family: TinyFamily, seed: int, batch: int) -> Any:
        return family.conditioning(seed=seed, batch=batch)


class TestCapture:
    """Output node that stores whatever reaches it in ``CAPTURED[key]``; its UI reports tensor shapes."""

    __test__ = False  # not a pytest test class despite the name
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": (ANY,), "key": ("STRING", {"default": "out"})}}

    def capture(self, value: Any, key: str) -> dict[str, Any]:
        CAPTURED[key] = value
        shape = list(value.shape) if isinstance(value, torch.Tensor) else None
        return {"ui": {"captured": [key], "shape": [shape]}}


def _object_node(type_name: str) -> type:
    """A node class returning ``OBJECTS[key]`` as a ``type_name`` output."""

    class TestObject:
        __test__ = False  # not a pytest test class despite the name
        CATEGORY = CATEGORY
        RETURN_TYPES: ClassVar[tuple[str, ...]] = (type_name,)
        FUNCTION = "get"
        __doc__ = f"{type_name} handed in by a test through put_object(key, value)."

        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:
            return {"required": {"key": ("STRING", {"default": ""})}}

        @classmethod
        def IS_CHANGED(cls, key: str) -> float:
            return float("nan")  # never reuse a cached output: the stored object may have changed

        def get(self, key: str) -> tuple[Any]:
            if key not in OBJECTS:
                raise KeyError(f"no test object {key!r}; call put_object({key!r}, value) first")
            return (OBJECTS[key],)

    TestObject.__name__ = TestObject.__qualname__ = f"TestObject{type_name.title()}"
    return TestObject


TEST_NODES: dict[str, type] = {
    "TestTinyModel": TestTinyModel,
    "TestTinyVAE": TestTinyVAE,
    "TestRandomConditioning": TestRandomConditioning,
    "TestCapture": TestCapture,
    **{f"TestObject{t}": _object_node(t) for t in OBJECT_TYPES},
}
