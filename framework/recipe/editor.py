"""The recipe's JSON Schema as an editor (or `check-jsonschema`) sees recipe files: as people write them.

pydantic's schema describes a complete, merged recipe. A file on disk may `extends:` another and give only what it
changes (no section is required, and inside a section only the keys it sets), and its unions must not match two
branches: a csv source also fits the open plugin-source branch, and an optimizer without its `name` (adamw is the
default) fits both optimizers. So: `extends` is allowed, `required` is dropped, `oneOf` becomes `anyOf` (each branch
still forbids unknown keys, so a misspelt key is still an error), and the plugin source's `type` excludes the
built-in reader names.
"""
from __future__ import annotations

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def editor_schema() -> dict:
    from framework.recipe.schema import Recipe
    from framework.registry import READERS

    schema = _relaxed(Recipe.model_json_schema())
    schema["$schema"] = DRAFT
    schema["title"] = "recipe file (recipe framework)"
    schema["properties"]["extends"] = {
        "description": "Base recipe(s) this file changes, relative to this file; mappings merge, lists replace.",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    builtin = [e.name for e in READERS.entries() if e.origin == "built-in"]
    plugin = schema["$defs"]["PluginSource"]["properties"]["type"]
    plugin["not"] = {"enum": builtin}  # a built-in type is described by its own branch
    detector = schema["$defs"]["TransformsSection"]["properties"]["face_detector"]
    schema["$defs"]["TransformsSection"]["properties"]["face_detector"] = {  # `face_detector: mtcnn` is short for
        "description": detector.get("description", ""),                     # {name: mtcnn}
        "anyOf": [{"type": "string"}, {k: v for k, v in detector.items() if k != "description"}]}
    return schema


def _relaxed(node):
    """A copy without `required`, with `oneOf` as `anyOf` (recursively)."""
    if isinstance(node, list):
        return [_relaxed(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "required" and isinstance(value, list):
            continue
        if key == "discriminator":  # an OpenAPI keyword: meaningless to JSON Schema validators
            continue
        out["anyOf" if key == "oneOf" else key] = _relaxed(value)
    return out
