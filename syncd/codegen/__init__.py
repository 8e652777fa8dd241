"""Code generators: typed client bindings from a module's schema.

`typescript.generate` turns the JSON of `GET /v1/schema` into TypeScript for `@syncd/client`.
Generators are pure (a schema in, a list of `OutputFile` out); `syncd.codegen.cli` reads the
schema (a module file or a running server) and writes the files.
"""

from __future__ import annotations

from syncd.codegen.typescript import OutputFile, describe_public, generate, generate_from_schema

__all__ = ["OutputFile", "describe_public", "generate", "generate_from_schema"]
