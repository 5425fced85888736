"""The vLLM compatibility check: every private vLLM symbol the plugin relies on
(:mod:`.vllm_symbols`), checked against the installed vLLM at start-up or against any
release's source without importing it (:mod:`.release_check`, ``make compat``)."""
