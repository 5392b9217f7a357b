"""Request models of the native routes: `/generate`, `/v1/tokenize`, `/v1/detokenize`, `/abort_request`.

`GenerateRequest` and `SamplingParamsModel` are built from the `GenerateReqInput` and
`SamplingParams` dataclasses (one field list, not two), in pydantic's strict mode: a JSON string
is not a number and `"yes"` is not a boolean. They type-check bodies and publish the schema in
/openapi.json; value ranges stay with `SamplingParams.verify` and the TokenizerManager so the
Engine and every route reject the same values with the same words.
`parse_generate_body` runs the field policy (request_fields.py) and returns the dataclass the
TokenizerManager takes.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model

from sglang.srt.entrypoints.openai.protocol import format_validation_error
from sglang.srt.entrypoints.request_fields import policy_for, screen_fields
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams, check_sampling_keys

_STRICT = ConfigDict(strict=True, extra="forbid")


def _model_of(cls: type, name: str, config: ConfigDict, **overrides: Any) -> type[BaseModel]:
    hints = typing.get_type_hints(cls)
    specs = {
        f.name: (overrides.get(f.name, hints[f.name]), f.default) for f in fields(cls) if f.init
    }
    return create_model(name, __config__=config, __doc__=cls.__doc__, **specs)


SamplingParamsModel = _model_of(SamplingParams, "SamplingParams", _STRICT)
GenerateRequest = _model_of(
    GenerateReqInput,
    "GenerateReqInput",
    ConfigDict(strict=True, extra="ignore"),
    sampling_params=Optional[Union[SamplingParamsModel, list[SamplingParamsModel]]],
)


def parse_generate_body(body: dict[str, Any]) -> GenerateReqInput:
    """The `GenerateReqInput` of a `/generate` body; ValueError (HTTP 400) naming the field."""
    kept = screen_fields(body, policy_for("/generate"))
    sps = kept.get("sampling_params")
    for sp in sps if isinstance(sps, list) else [sps]:
        if isinstance(sp, dict):
            check_sampling_keys(sp)
    try:
        validated = GenerateRequest.model_validate(kept)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None
    return GenerateReqInput(**validated.model_dump(exclude_unset=True))


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    prompt: Union[str, list[str]] = Field(validation_alias=AliasChoices("prompt", "text"))
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    tokens: Union[list[int], list[list[int]]]


class AbortRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    rid: str = ""
    abort_all: bool = False
