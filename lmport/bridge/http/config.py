"""`lmport serve` settings from three sources: command-line flags > `LMPORT_*` environment variables > a YAML file.

Server settings (`ServeConfig`) and every engine option (`lmport.engine.config.EngineConfig`, through its schema) share one
naming scheme: the flag `--max-num-seqs`, the variable `LMPORT_MAX_NUM_SEQS`, the YAML key `max_num_seqs` (or
`max-num-seqs`). Flags, variables and keys are all derived from the two dataclasses, so none is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmport.engine.config import EngineConfig, check_field, field_schema, option_schema, reject_unknown_keys
from lmport.engine.errors import InvalidParams

ENV_PREFIX = "LMPORT_"
# engine options the server takes several of (`--model a --model b`, a YAML list, comma-separated in the
# environment): each value is one served model with the other engine settings
MULTI_VALUED = ("model",)


def _opt(default: Any, doc: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **extra})
    return field(default=default, metadata={"doc": doc, **extra})


@dataclass(slots=True)
class ServeConfig:
    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(8000, "TCP port to listen on (0 picks a free one).", min=0, max=65535)
    served_model_name: list[str] = _opt([], "Names the API answers to (the `model` field); default: the model "
                                        "argument. The first is reported in responses. With several models, one "
                                        "name per model, in their order.")
    lora_modules: list[str] = _opt([], "LoRA adapters to serve, each `name=path` to a PEFT adapter directory "
                                   "(vLLM's --lora-modules); a request's `model` may name one. Needs enable_lora.")
    api_key: list[str] = _opt([], "Accepted Bearer keys for /v1/*, /tokenize, /detokenize and lmport's own "
                              "endpoints (several allowed; "
                              "comma-separated in LMPORT_API_KEY). None: no authentication.")
    allowed_origins: list[str] = _opt(["*"], "CORS allowed origins.")
    allowed_methods: list[str] = _opt(["*"], "CORS allowed methods.")
    allowed_headers: list[str] = _opt(["*"], "CORS allowed headers.")
    allow_credentials: bool = _opt(False, "CORS: allow credentials.")
    rate_limit_rpm: int | None = _opt(None, "Requests per minute per API key (per client address without keys); "
                                      "off when unset.", min=1)
    rate_limit_tpm: int | None = _opt(None, "Tokens (prompt + max_tokens, refunded down to what was generated) per "
                                      "minute per API key or client address; off when unset.", min=1)
    max_body_bytes: int = _opt(16 << 20, "Largest request body accepted; larger ones get 413.", min=1)
    uvicorn_log_level: str = _opt("info", "uvicorn's log level.",
                          choices=["critical", "error", "warning", "info", "debug", "trace"])
    access_log: bool = _opt(False, "Log every HTTP request (uvicorn's access log).")
    memory_budget_gb: float | None = _opt(None, "GiB that the loaded models may hold together (estimated weights "
                                          "+ KV cache); a model that would not fit first unloads idle ones (least "
                                          "recently used first), else its request is refused (503 "
                                          "memory_budget_exceeded, with the numbers). Unset: no budget.", min=0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name), ServeConfig)
        for entry in self.lora_modules:
            name, _, path = entry.partition("=")
            if not name or not path:
                raise InvalidParams("lora_modules", f"expected name=path, got {entry!r}")


@dataclass(slots=True)
class Settings:
    serve: ServeConfig
    engine: dict[str, Any]  # EngineConfig fields that differ from the defaults; validated by EngineConfig
    more_models: list[str] = field(default_factory=list)  # `--model a --model b`: the models after the first

    @property
    def model(self) -> str:
        return self.engine.get("model", EngineConfig.__dataclass_fields__["model"].default)

    @property
    def models(self) -> list[str]:
        return [self.model, *self.more_models]

    @property
    def model_names(self) -> list[str]:
        return self.serve.served_model_name or self.models

    @property
    def served(self) -> list[tuple[list[str], str]]:
        """(the names a request may give, the model argument) per served model: one model answers to every
        served_model_name; several take one name each."""
        if not self.more_models:
            return [(self.model_names, self.model)]
        return [([name], model) for name, model in zip(self.model_names, self.models)]

    def engine_for(self, model: str) -> dict[str, Any]:
        """The engine options of one served model: every model shares the engine settings."""
        return {**self.engine, "model": model}

    @property
    def memory_budget_bytes(self) -> int | None:
        budget = self.serve.memory_budget_gb
        return None if budget is None else int(budget * (1 << 30))

    @property
    def lora_requests(self) -> dict[str, dict[str, Any]]:
        """Served adapter name -> its lora_request (ids 1, 2, ... in the order given)."""
        pairs = [entry.partition("=")[::2] for entry in self.serve.lora_modules]
        return {name: {"lora_name": name, "lora_int_id": i, "lora_path": path}
                for i, (name, path) in enumerate(pairs, 1)}


def _schema() -> dict[str, dict[str, Any]]:
    """name -> {name, type, doc, choices?, min?, max?, default, target}, target being 'serve' or 'engine'."""
    serve = [field_schema(f, ServeConfig) for f in dataclasses.fields(ServeConfig)]
    return {**{e["name"]: {**e, "target": "serve"} for e in serve},
            **{e["name"]: {**e, "target": "engine"} for e in option_schema()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag. Defaults are suppressed so that only flags actually given override env and YAML."""
    parser.add_argument("--config", default=None, help="YAML file of settings (keys as the flag names)")
    group_serve = parser.add_argument_group("server")
    group_engine = parser.add_argument_group("engine options")
    for name, entry in _schema().items():
        group = group_serve if entry["target"] == "serve" else group_engine
        flag = "--" + name.replace("_", "-")
        doc = f"{entry['doc']} [env {ENV_PREFIX}{name.upper()}; default {entry['default']!r}]"
        kinds = entry["type"].split("|")
        if name in MULTI_VALUED:
            group.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS,
                               help=doc + " (repeat to serve several)")
        elif "bool" in kinds:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=doc)
        elif kinds[0].startswith("list"):
            group.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS, help=doc + " (repeatable)")
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=entry.get("choices"),
                               type=_scalar_parser(name, kinds), help=doc)


def load_settings(args: argparse.Namespace | Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Merge YAML < environment < flags and validate; errors name the setting and where it came from."""
    flags = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    environ = os.environ if environ is None else environ
    schema = _schema()
    merged: dict[str, Any] = {}
    config_path = flags.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        merged.update(_read_yaml(Path(config_path), schema))
    for name, entry in schema.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            merged[name] = _parse_text(name, entry, raw, f"${ENV_PREFIX}{name.upper()}")
    for name, value in flags.items():
        if name in schema:
            merged[name] = value
    return _build(merged, schema)


def _build(values: dict[str, Any], schema: dict[str, dict[str, Any]]) -> Settings:
    serve_values = {k: v for k, v in values.items() if schema[k]["target"] == "serve"}
    engine_values = {k: v for k, v in values.items() if schema[k]["target"] == "engine"}
    models = _models(engine_values.get("model"))
    if models:
        engine_values["model"] = models[0]
    serve = ServeConfig(**serve_values)  # both validate types, ranges and choices, naming the setting
    engine = EngineConfig.from_dict(engine_values)
    if serve.lora_modules and not engine.enable_lora:
        raise InvalidParams("lora_modules", "serving LoRA adapters needs enable_lora (--enable-lora)")
    if len(models) > 1 and serve.served_model_name and len(serve.served_model_name) != len(models):
        raise InvalidParams("served_model_name", f"with {len(models)} models give one name each "
                            f"({len(serve.served_model_name)} given: {serve.served_model_name})")
    names = serve.served_model_name or models
    if len(set(names)) != len(names):
        raise InvalidParams("model", f"each served model needs its own name, got {names}")
    return Settings(serve=serve, engine=engine_values, more_models=models[1:])


def _models(value: Any) -> list[str]:
    """`model` as given: one name or path, or a list of them (repeated flag, YAML list, comma-separated)."""
    if value is None:
        return []
    models = _split(value) if isinstance(value, str) and "," in value else value
    models = models if isinstance(models, list) else [models]
    if not models or not all(isinstance(m, str) and m for m in models):
        raise InvalidParams("model", f"expected a model name or path, or a list of them, got {value!r}")
    return models


def _read_yaml(path: Path, schema: dict[str, dict[str, Any]]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InvalidParams("config", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidParams("config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidParams("config", f"{path} must hold a map of settings, got {type(data).__name__}")
    data = {str(key).replace("-", "_"): value for key, value in data.items()}
    reject_unknown_keys(data, schema, f"setting in {path}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        entry = schema[name]
        if entry["type"].startswith("list") and isinstance(value, str):
            value = _split(value)
        if isinstance(value, str) and entry["type"] not in ("str", "str|null"):
            value = _parse_text(name, entry, value, str(path))
        out[name] = value
    return out


def _parse_text(name: str, entry: dict[str, Any], raw: str, source: str) -> Any:
    kinds = entry["type"].split("|")
    if kinds[0].startswith("list"):
        return _split(raw)
    if "bool" in kinds:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise InvalidParams(name, f"{source}: expected a boolean (true/false), got {raw!r}")
    try:
        return _scalar_parser(name, kinds)(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidParams(name, f"{source}: {exc}") from None


def _scalar_parser(name: str, kinds: list[str]) -> Any:
    def parse(raw: str) -> Any:
        if "null" in kinds and raw.strip().lower() in ("none", "null"):
            return None
        if "int" in kinds:
            return int(raw)
        if "float" in kinds:
            return float(raw)
        return raw
    parse.__name__ = kinds[0]  # argparse names the type in its error message
    return parse


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]
