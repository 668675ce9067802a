"""The memory budget's one decision, as Ollama makes it: a model that does not fit beside the loaded ones first
unloads idle models, least recently used first, and is refused (with the numbers) when even that cannot make room.
Models serving a call are never unloaded for another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmport.bridge.footprint import Footprint, describe
from lmport.bridge.protocol import BridgeError


@dataclass(frozen=True, slots=True)
class Resident:
    """A loaded engine as the budget sees it."""
    engine: Any  # the service's entry, handed back in the eviction list
    model: str
    nbytes: int
    busy: bool  # a call is in flight or a transport holds it
    idle_since: float  # monotonic


def evictions(model: str, need: Footprint, budget: int, loaded: list[Resident]) -> list[Resident]:
    """The idle engines to unload, oldest first, so that `need` fits within `budget` beside what stays loaded;
    raises memory_budget_exceeded when unloading every idle one would not be enough (then nothing is unloaded)."""
    in_use = sum(r.nbytes for r in loaded)
    idle = sorted((r for r in loaded if not r.busy), key=lambda r: r.idle_since)
    if need.total <= budget - in_use:
        return []
    if need.total > budget - in_use + sum(r.nbytes for r in idle):
        raise budget_exceeded(model, need, budget, loaded)
    chosen, freed = [], 0
    for resident in idle:
        chosen.append(resident)
        freed += resident.nbytes
        if need.total <= budget - in_use + freed:
            break
    return chosen


def budget_exceeded(model: str, need: Footprint, budget: int, loaded: list[Resident]) -> BridgeError:
    in_use = sum(r.nbytes for r in loaded)
    busy = [r for r in loaded if r.busy]
    held = ", ".join(f"{r.model} {describe(r.nbytes)}{' (busy)' if r.busy else ''}" for r in loaded) or "none"
    message = (f"loading {model} needs an estimated {describe(need.total)} (weights {describe(need.weights_bytes)} "
               f"+ KV cache {describe(need.kv_cache_bytes)}), but loaded models hold {describe(in_use)} of the "
               f"memory budget of {describe(budget)} (loaded: {held}); ")
    if need.total > budget:
        message += "it cannot fit even alone: raise the memory budget, or lower kv_cache_memory_bytes or the dtype"
    else:
        message += f"{len(busy)} of them are serving calls and cannot be unloaded; retry once they are idle"
    details = {**need.to_dict(), "required_bytes": need.total, "in_use_bytes": in_use, "budget_bytes": budget,
               "loaded": [{"model": r.model, "bytes": r.nbytes, "busy": r.busy} for r in loaded]}
    return BridgeError("memory_budget_exceeded", message, details, retryable=need.total <= budget)
