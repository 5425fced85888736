"""The one place that touches vLLM internals: worker RPCs, API-server hooks,
version routing and the gloo weight-transfer backend. A vLLM upgrade is edited here;
:mod:`.vllm_symbols` lists every private symbol used and checks them."""


def install_hooks() -> None:
    """Everything the plugin adds to vLLM; cheap, and safe in every process vLLM starts."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from .endpoints import enable_endpoint_plugin
    from .lora_metrics import count_requests_by_adapter
    from .rpc import install_worker_rpcs
    from .weight_spec import install_recorder

    install_worker_rpcs()
    install_recorder()
    enable_endpoint_plugin()
    count_requests_by_adapter()
    # Lazy registration by module path: gloo_transfer is imported only where used.
    for factory, class_name in (
        (WeightTransferEngineFactory, "GlooWeightTransferEngine"),
        (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine"),
    ):
        if "gloo" not in factory._registry:
            factory.register_engine("gloo", "vllm_lora_hotswap.engine.gloo_transfer", class_name)
