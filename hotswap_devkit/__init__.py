"""What the tests, the benchmarks and the demo share, in the repository only (not in the wheel):

- :mod:`.toy_models`: tiny random Llama models, tokenizers and PEFT adapters made locally.
- :mod:`.server`: :class:`~.server.VllmServer`, a real vLLM OpenAI server with the plugin as a
  subprocess, and :func:`~.server.start_all`, which starts several side by side.
"""
