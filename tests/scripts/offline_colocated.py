"""Run by tests/test_engine_modes.py: an offline LLM following a store through LocalHotSwap."""

import json
import sys

if __name__ == "__main__":
    model, root, second_adapter, out, prompt = sys.argv[1:6]
    from vllm import LLM, SamplingParams

    from vllm_lora_hotswap.engine.offline import LocalHotSwap
    from vllm_lora_hotswap.store import CheckpointStore

    llm = LLM(
        model=model,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=2,
        max_cpu_loras=4,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
    )
    hotswap = LocalHotSwap(llm)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def generate(name: str) -> list:
        request = hotswap.lora_request(name)
        (output,) = llm.generate([prompt], params, lora_request=request, use_tqdm=False)
        return [request.lora_name, list(output.outputs[0].token_ids)]

    results = {"first_sync": [r.result for r in hotswap.sync()]}
    results["v1"] = generate("lora1")
    v2 = CheckpointStore(root).publish("lora1", second_adapter)
    results["second_sync"] = [r.result for r in hotswap.sync()]
    results["v2"] = generate("lora1")
    v1 = results["v1"][0].split("@", 1)[1]
    results["pinned_v1"] = generate(f"lora1@{v1}")
    results["v2_name"] = v2
    with open(out, "w") as handle:
        json.dump(results, handle)
