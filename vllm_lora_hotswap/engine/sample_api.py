"""``POST /api/v1/sample``: the sampling route of the ``vllm_backend``-compatible client API, answered by this engine.

Request::

    {"prompts": ["Once upon a time", [1, 415, 2936]],      # text or token ids
     "model_id": "lora1@2025-08-18T10-00-00Z",              # or "lora1", or omitted: the base model
     "sampling_params": {"max_tokens": 50, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "logprobs": true}}

Response: one sample per prompt, in order, each naming the version that generated it::

    {"model_id": "lora1@2025-08-18T10-00-00Z", "logprobs_mode": "raw_logprobs",
     "samples": [{"text": "...", "prompt_token_ids": [...], "token_ids": [...], "logprobs": [-0.3, ...],
                  "finish_reason": "length", "model": "lora1@2025-08-18T10-00-00Z",
                  "version": "2025-08-18T10-00-00Z"}, ...]}

``model_id="lora1"`` is resolved once, when the request arrives (or, if a new version
of ``lora1`` is being probed then, once the verdict is in): every prompt of the
request runs on that one version, even if a swap happens meanwhile. A request that
pins a version being probed (``lora1@V``, as ``FleetRollout`` sends) starts at once
(its first token may be the probe's evidence), and is answered once the verdict is in: a 409 naming the version
if it failed (the samples are discarded, never returned). ``version`` is
None for the base model and for ``inplace`` mode (where the weights under a name can
change between two steps). ``logprobs`` are the sampled tokens' log-probabilities, as
vLLM's ``--logprobs-mode`` computes them (``raw_logprobs`` by default: before temperature
and top-p/top-k; ``processed_logprobs`` after them). An unknown ``model_id`` is a 404
naming it; an invalid field a 400 naming it. With ``--api-key`` the route needs the key.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..store import split_served_name
from ..weights.routes import require_api_key
from .versions import ensure_version

# vLLM's --api-key middleware guards /v1/* only: this route checks the key itself.
router = APIRouter(dependencies=[Depends(require_api_key)])
# How long answers that ran on a version being probed wait for its verdict: the probe is
# one engine step, so this bounds only an engine that stopped stepping.
VERDICT_WAIT_S = 120.0


class SampleParams(BaseModel):
    """The sampling parameters ``/api/v1/sample`` accepts (any other key is a 400)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1: all tokens
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    logprobs: bool = False  # return each sampled token's log-probability


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str | list[int]] = Field(min_length=1)
    model_id: str | None = None
    sampling_params: SampleParams = Field(default_factory=SampleParams)


def _error(status: HTTPStatus, message: str, param: str | None = None) -> JSONResponse:
    # The shape of vLLM's (OpenAI's) error responses.
    body = {"message": message, "type": status.phrase.replace(" ", ""), "param": param, "code": status.value}
    return JSONResponse({"error": body}, status_code=status.value)


def _parse(body: Any) -> SampleRequest | JSONResponse:
    try:
        request = SampleRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        return _error(HTTPStatus.BAD_REQUEST, f"invalid {field}: {first['msg']}", field)
    for index, prompt in enumerate(request.prompts):
        if not prompt:
            return _error(HTTPStatus.BAD_REQUEST, f"invalid prompts.{index}: empty prompt", f"prompts.{index}")
    return request


async def _resolve(request: Request, model_id: str | None) -> tuple[Any, str | None, Any] | JSONResponse:
    """The LoRARequest (None: the base model) that ``model_id`` routes to now, its version,
    and the sampling gate of a pinned version still being probed (None otherwise)."""
    models = request.app.state.openai_serving_models
    if model_id is None or models.is_base_model(model_id):
        return None, None, None
    engine = request.app.state.lora_hotswap.engine
    if "@" not in model_id:
        await engine.wait_if_held(model_id)
    elif model_id not in models.lora_requests and (gate := _gate(engine, model_id)) is not None:
        return gate.request, split_served_name(model_id)[1], gate
    elif model_id not in models.lora_requests and getattr(engine, "refused_for_sampling", lambda _: False)(model_id):
        return _refused(model_id)  # it failed its probe while a rollout waited for it: the same answer
    elif model_id not in models.lora_requests:
        error = await ensure_version(request.app.state.lora_hotswap, model_id)
        if error is not None:
            status, message = error
            return _error(status, message, "model_id")
    lora = models.lora_requests.get(model_id)
    if lora is None:
        served = sorted(name for name in models.lora_requests if "@" not in name)
        return _error(
            HTTPStatus.NOT_FOUND,
            f"model_id {model_id!r} is not served here (base model {models.base_model_paths[0].name!r}, "
            f"adapters {served})",
            "model_id",
        )
    return lora, split_served_name(lora.lora_name)[1], None


def _gate(engine: Any, model_id: str) -> Any:
    gate = getattr(engine, "sampling_gate", None)  # an offline engine has no sample requests
    return gate(model_id) if gate is not None else None


async def _verdict(gate: Any, model_id: str) -> JSONResponse | None:
    """None once the probe of the pinned version these samples ran on passed; else the error."""
    try:
        passed = await asyncio.wait_for(asyncio.shield(gate.verdict), VERDICT_WAIT_S)
    except TimeoutError:
        return _error(
            HTTPStatus.SERVICE_UNAVAILABLE, f"the probe of {model_id} gave no verdict in {VERDICT_WAIT_S:.0f} s"
        )
    return None if passed else _refused(model_id)


def _refused(model_id: str) -> JSONResponse:
    return _error(
        HTTPStatus.CONFLICT,
        f"{model_id} did not pass its probe (or was superseded before it was served): samples on it "
        "are discarded; sample again from a version this engine serves",
        "model_id",
    )


def _sampled_logprobs(output: Any) -> list[float | None]:
    """The sampled token's log-probability at each step (None where it is not finite)."""
    values = []
    for token, step in zip(output.token_ids, output.logprobs or [], strict=False):
        value = step[token].logprob
        values.append(value if math.isfinite(value) else None)
    return values


@router.post("/api/v1/sample")
async def sample(request: Request) -> JSONResponse:
    """Sample one completion per prompt from ``model_id``; see the module docstring."""
    from vllm.sampling_params import SamplingParams

    try:
        body = await request.json()
    except ValueError:
        return _error(HTTPStatus.BAD_REQUEST, "the body is not JSON", "body")
    parsed = _parse(body)
    if isinstance(parsed, JSONResponse):
        return parsed
    resolved = await _resolve(request, parsed.model_id)
    if isinstance(resolved, JSONResponse):
        return resolved
    lora, version, gate = resolved
    wanted = parsed.sampling_params
    try:
        # On a version still being probed, the sampled token's logprob is always computed: the
        # first one may be the probe's evidence (it is returned only when asked for).
        logprobs = 0 if wanted.logprobs or gate is not None else None
        params = SamplingParams(**wanted.model_dump(exclude={"logprobs"}), logprobs=logprobs)
    except ValueError as exc:  # vLLM's own checks (VLLMValidationError is a ValueError)
        return _error(HTTPStatus.BAD_REQUEST, f"invalid sampling_params: {exc}", getattr(exc, "parameter", None))

    engine = request.app.state.engine_client
    prompts = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in parsed.prompts]
    try:
        rendered = await engine.renderer.render_cmpl_async(prompts)
    except ValueError as exc:  # too long for the model, a token id out of range
        return _error(HTTPStatus.BAD_REQUEST, f"invalid prompts: {exc}", "prompts")
    request_id = f"sample-{uuid.uuid4().hex}"

    async def generate(index: int, prompt: Any) -> Any:
        final, generation_id = None, f"{request_id}-{index}"
        if gate is not None:  # a failed probe aborts it, and it never starts after one
            if gate.verdict.done() and not gate.verdict.result():
                return None
            gate.request_ids.add(generation_id)
            gate.batch_arrived.set()
        try:
            async for output in engine.generate(prompt, params, generation_id, lora_request=lora):
                final = output
                if gate is not None and output.outputs:
                    gate.sampled(output.outputs[0])
        finally:
            if gate is not None:
                gate.ended(generation_id)
        return final

    try:
        finals = await asyncio.gather(*(generate(i, p) for i, p in enumerate(rendered)))
    except ValueError as exc:  # e.g. prompt + max_tokens beyond the model's length
        return _error(HTTPStatus.BAD_REQUEST, str(exc), "sampling_params")
    except Exception as exc:
        # vLLM >= 0.33 refuses new requests while a base-weight update pauses the engine
        # (RetryableRequestError, "Generation is paused…", status 503): the client retries.
        if getattr(exc, "status_code", None) == HTTPStatus.SERVICE_UNAVAILABLE:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        raise
    if gate is not None and (refused := await _verdict(gate, parsed.model_id or "")) is not None:
        return refused
    model = lora.lora_name if lora is not None else request.app.state.openai_serving_models.base_model_paths[0].name
    samples = []
    for final in finals:
        output = final.outputs[0]
        sample_ = {
            "text": output.text,
            "prompt_token_ids": list(final.prompt_token_ids or []),
            "token_ids": list(output.token_ids),
            "finish_reason": output.finish_reason,
            "model": model,
            "version": version,
        }
        if wanted.logprobs:
            sample_["logprobs"] = _sampled_logprobs(output)
        samples.append(sample_)
    logprobs_mode = engine.vllm_config.model_config.logprobs_mode
    return JSONResponse({"model_id": model, "logprobs_mode": logprobs_mode, "samples": samples})
