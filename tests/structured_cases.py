"""Seeded random tools and JSON schemas for the structured-output tests: nested objects, arrays, enums,
bounded numbers, required and optional keys, all with additionalProperties false and short strings, so the
shortest valid answer is a few tokens and a random-weight model under the grammar finishes within a small
max_tokens."""
from __future__ import annotations

import random

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["integer", "number", "boolean", "enum", "string"])
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 99)}
    if kind == "number":
        # multipleOf bounds the decimals too (a random model left free writes digits without end)
        return {"type": "number", "minimum": -1, "maximum": rng.choice([1, 10, 100]), "multipleOf": 0.25}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    return {"type": "string", "maxLength": rng.randint(0, 4)}


def schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema of 1-3 properties; below the top, nested objects and arrays of leaves or objects."""
    props = {}
    for name in rng.sample(WORDS, rng.randint(1, 3)):
        r = rng.random()
        if depth < 2 and r < 0.25:
            props[name] = schema(rng, depth + 1)
        elif depth < 2 and r < 0.45:
            item = schema(rng, depth + 1) if rng.random() < 0.3 else _leaf(rng)
            props[name] = {"type": "array", "items": item, "maxItems": rng.randint(0, 2)}
        else:
            props[name] = _leaf(rng)
    required = [k for k in props if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def tools(rng: random.Random) -> list[dict]:
    out = []
    for i in range(rng.randint(1, 3)):
        out.append({"type": "function", "function": {
            "name": f"{rng.choice(WORDS)}_{i}", "description": f"tool number {i}",
            "parameters": schema(rng)}})
    return out
