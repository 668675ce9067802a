"""The manifest (`describe`'s result), derived from the Python definitions — never written by hand.

Methods come from lmport.bridge.service's @rpc registry (signatures, type hints, docstrings); the option schemas from
lmport.engine.config.option_schema() and lmport.engine.sampling_params.sampling_params_schema(); the result shapes from
lmport.bridge.results; error codes and timeout profiles from lmport.bridge.protocol. `lmport codegen` and the client generators
call build_manifest() in-process.
"""

from __future__ import annotations

from typing import Any

from lmport.bridge.protocol import ERROR_CODES, PROTOCOL_VERSION, SERVER_NAME, TIMEOUT_PROFILES
from lmport.bridge.service import VERSION, method_specs


def build_manifest(timeout_profiles: dict[str, int] | None = None) -> dict[str, Any]:
    """timeout_profiles is the whole table (Service.timeout_profiles, defaults already merged in); None: the
    protocol's defaults."""
    from lmport.bridge.results import results_schema
    from lmport.engine.config import option_schema
    from lmport.engine.sampling_params import sampling_params_schema

    schemas = {"SamplingParams": sampling_params_schema(), "EngineOptions": option_schema()}
    methods = []
    for spec in method_specs().values():
        params = schemas[spec.options] if spec.options else [_param(p) for p in spec.params]
        methods.append({"name": spec.name, "doc": spec.doc, "streaming": spec.streaming,
                        "timeout_profile": spec.timeout_profile, "params": params, "returns": spec.returns})
    return {"protocol": PROTOCOL_VERSION, "server": SERVER_NAME, "version": VERSION, "methods": methods,
            "schemas": schemas,
            "results": results_schema(),
            "error_codes": [{"code": code, "retryable": retryable, "doc": doc}
                            for code, (retryable, doc) in ERROR_CODES.items()],
            "timeout_profiles": dict(TIMEOUT_PROFILES if timeout_profiles is None else timeout_profiles)}


def _param(p: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": p.name, "type": p.type, "required": p.required, "doc": p.doc}
    if not p.required:
        entry["default"] = p.default
    return entry
