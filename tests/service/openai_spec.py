"""OpenAI's published OpenAPI document as JSON-Schema 2020-12 validators, for conformance tests.

The document (`shared/data/openai-openapi/openapi.yaml`, OpenAPI 3.1) still carries OpenAPI 3.0's
`nullable: true` in places, which 2020-12 ignores. `load_spec` rewrites it the way 3.0 meant it:

    {type: T, nullable: true}              -> {type: [T, "null"]}      (and `null` joins an enum)
    {$ref | allOf | anyOf | oneOf, nullable} -> {anyOf: [{...}, {type: "null"}]}
    {nullable: true} alone                   -> dropped (an empty schema already accepts null)

Every `#/components/...` reference becomes absolute (`urn:openai-spec#/...`) so any subschema
validates on its own against the one registry. `undeclared` lists the object keys of an instance
that the schema does not declare (our extensions): the spec leaves most objects open, so those
pass validation, and the tests pin them by name instead.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "openai-openapi" / "openapi.yaml"
)
# components/schemas reachable from the five response schemas we validate, from the same
# openapi.yaml (MIT: tests/data/openai-openapi-LICENSE)
SUBSET_PATH = Path(__file__).resolve().parents[1] / "data" / "openai-openapi-subset.json"
URI = "urn:openai-spec"
COMPOSITIONS = ("$ref", "allOf", "anyOf", "oneOf")


def rewrite(node: Any) -> Any:
    """A copy of `node` with 3.0 `nullable` turned into 2020-12 and local refs made absolute."""
    if isinstance(node, list):
        return [rewrite(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: rewrite(value) for key, value in node.items() if key != "nullable"}
    if isinstance(out.get("$ref"), str) and out["$ref"].startswith("#/"):
        out["$ref"] = URI + out["$ref"]
    if node.get("nullable") is not True:
        return out
    if "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"] if "null" not in types else types
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    elif any(key in out for key in COMPOSITIONS):
        inner = {key: out.pop(key) for key in COMPOSITIONS if key in out}
        out["anyOf"] = [inner, {"type": "null"}]
    return out


class Spec:
    """The rewritten document's schemas, with validators by component name."""

    def __init__(self, document: dict) -> None:
        self.document = rewrite({"components": document["components"]})
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(URI, resource)
        self._resolver = self.registry.resolver()

    def schema(self, name: str) -> dict:
        return self.document["components"]["schemas"][name]

    def validator(self, schema: dict | str) -> Draft202012Validator:
        if isinstance(schema, str):
            schema = {"$ref": f"{URI}#/components/schemas/{schema}"}
        return Draft202012Validator(schema, registry=self.registry)

    def errors(self, name: str, instance: Any) -> list[str]:
        """Every violation of component `name` by `instance`, as `path: message` lines."""
        found = self.validator(name).iter_errors(instance)
        return [f"{e.json_path}: {e.message}" for e in sorted(found, key=lambda e: e.json_path)]

    def resolve(self, ref: str) -> Any:
        return self._resolver.lookup(ref).contents

    def _applicable(self, schema: Any, instance: Any) -> Iterator[dict]:
        """`schema` and every subschema that applies to `instance`: refs followed, allOf parts,
        and the anyOf/oneOf branches `instance` satisfies."""
        if not isinstance(schema, dict):
            return
        yield schema
        if "$ref" in schema:
            yield from self._applicable(self.resolve(schema["$ref"]), instance)
        for part in schema.get("allOf", ()):
            yield from self._applicable(part, instance)
        for key in ("anyOf", "oneOf"):
            for branch in schema.get(key, ()):
                if self.validator(branch).is_valid(instance):
                    yield from self._applicable(branch, instance)

    def undeclared(self, name: str, instance: Any) -> set[str]:
        """Paths (`choices[].message.reasoning`) of keys in `instance` that component `name`
        neither declares in `properties` nor matches by `patternProperties`."""
        return set(self._undeclared({"$ref": f"{URI}#/components/schemas/{name}"}, instance, ""))

    def _undeclared(self, schema: dict, instance: Any, path: str) -> Iterator[str]:
        schemas = list(self._applicable(schema, instance))
        if isinstance(instance, list):
            items = [s["items"] for s in schemas if isinstance(s.get("items"), dict)]
            for item in instance:
                for sub in items:
                    yield from self._undeclared(sub, item, f"{path}[]")
        if not isinstance(instance, dict):
            return
        for key, value in instance.items():
            declared = [s["properties"][key] for s in schemas if key in s.get("properties", {})]
            patterned = any(s.get("patternProperties") for s in schemas)
            if not declared and not patterned:
                yield f"{path}.{key}".lstrip(".")
            for sub in declared:
                yield from self._undeclared(sub, value, f"{path}.{key}")

    def closed_objects(self, name: str) -> set[str]:
        """Pointers of the object schemas reachable from `name` that forbid undeclared keys
        (`additionalProperties: false` or `unevaluatedProperties: false`)."""
        closed: set[str] = set()
        seen: set[str] = set()

        def walk(node: Any, where: str) -> None:
            if isinstance(node, list):
                for i, item in enumerate(node):
                    walk(item, f"{where}/{i}")
                return
            if not isinstance(node, dict):
                return
            if (
                node.get("additionalProperties") is False
                or node.get("unevaluatedProperties") is False
            ):
                closed.add(where)
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                walk(self.resolve(ref), ref.removeprefix(URI))
            for key, value in node.items():
                if key != "$ref":
                    walk(value, f"{where}/{key}")

        walk(self.schema(name), f"#/components/schemas/{name}")
        return closed


@functools.cache
def load_spec() -> Spec | None:
    """The spec, parsed once per process: the whole document when the shared data is next to
    the repository, else `SUBSET_PATH` — its component schemas that our responses are checked
    against, extracted unchanged (a fresh clone in CI has no shared data)."""
    if not SPEC_PATH.is_file():
        import json

        return Spec(json.loads(SUBSET_PATH.read_text())) if SUBSET_PATH.is_file() else None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 1 s instead of 10
    with SPEC_PATH.open() as f:
        return Spec(yaml.load(f, Loader=loader))
