"""The OpenAPI schema is what Postman and generated clients see: every operation has a summary,
its error shape, and every request body an example."""

from typing import Any

from service.main import create_app


def test_every_operation_is_documented_with_examples() -> None:
    schema = create_app().openapi()
    components = schema["components"]["schemas"]

    def has_example(media: dict[str, Any]) -> bool:
        if "example" in media or "examples" in media:
            return True
        ref = media.get("schema", {}).get("$ref", "")
        target = components.get(ref.rsplit("/", 1)[-1], {})
        return "example" in target or "examples" in target

    problems = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            if not operation.get("summary"):
                problems.append(f"{where}: no summary")
            if path.startswith("/v1/") and "404" not in operation["responses"]:
                problems.append(f"{where}: error responses not documented")
            body = operation.get("requestBody", {}).get("content", {})
            problems += [
                f"{where}: no {kind} example" for kind, m in body.items() if not has_example(m)
            ]
    assert problems == []
