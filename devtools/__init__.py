"""Developer tooling shared by the tests, the demo and the scripts; never imported by the pack at run time.

What lives here: the pinned host's layout (``layout``), ComfyUI booted in-process (``comfy_host``) and the
real server as a subprocess (``comfy_server``, launched through ``comfy_main``), the import-only
torchvision stub (``stubs/``), seeded tiny models and checkpoints (``tiny_models``, ``tiny_eval_models``,
``tiny_checkpoint``), a generated subject (``subject``), random adapters (``adapters``), API-prompt
building blocks (``prompts``), the test-only graph nodes (``tiny_nodes``) and the example-workflow builder
(``build_workflows`` with the frontend driver in ``browser/``).

Why a package of its own: the demo and the workflow builder need the same server launcher and tiny models
the tests use, and product code must not reach into ``tests/``. Modules that import ComfyUI say so and
are imported only once a host is booted; ``tests/test_package.py`` checks that the pack's runtime
(``__init__``, ``lora2/``, ``nodes/``) never imports this package.
"""
