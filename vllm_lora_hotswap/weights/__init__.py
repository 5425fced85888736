"""Base-weight updates (full fine-tuning): a trainer pushes new weights into running engines.

One concern per module, so the trainer side never imports the engine side:

- :mod:`.trainer`: the trainer-side client (``WeightSync``, ``FleetWeightSyncClient``);
  imports nothing from :mod:`vllm_lora_hotswap.engine`.
- :mod:`.gloo`: the ``gloo`` weight-transfer backend (CPU), both halves; vLLM loads it by
  the module path ``vllm_lora_hotswap.weights.gloo`` (registered in ``engine.install_hooks``).
- :mod:`.packing`: the bucketed, allocation-free packing the transport sends.
- :mod:`.reload`: vLLM's reload lifecycle and the memory check before any layer is replaced.
- :mod:`.spec`: the engine's parameter spec and the check of an update against it.
- :mod:`.routes`: the API server's weight-update HTTP routes and the API-key check.

Importing this package imports none of them (nor vLLM, nor torch).
"""
