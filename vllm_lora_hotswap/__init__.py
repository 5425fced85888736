"""vllm-lora-hotswap: vLLM engines that follow a shared store of LoRA adapter versions."""

__version__ = "0.1.0"

# vLLM releases whose internals the engine adapter (vllm_lora_hotswap.engine) was
# written and tested against. The plugin refuses to load on any other.
SUPPORTED_VLLM = (">=0.32.0", "<0.35")
