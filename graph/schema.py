"""The Strawberry schema: `schema` is the export target; `build_schema` adds the limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    AddValidationRules,
    DisableIntrospection,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.types import ExecutionContext

from db.settings import Settings
from graph.resolvers.auth import Mutation, Query

CACHE_SIZE = 256


class StrawgateSchema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Silenced: the view logs unexpected errors once, with the request id, and never
        logs validation messages (they can quote the variables a client sent)."""


def build_schema(settings: Settings) -> StrawgateSchema:
    # The depth and alias rules are built once and shared by the per-request extension
    # instances: a rule class made per request would miss the validation cache every time.
    rules = [
        *QueryDepthLimiter(max_depth=settings.max_query_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    extensions: list[Callable[[], SchemaExtension] | type[SchemaExtension]] = [
        lambda: MaxTokensLimiter(max_token_count=settings.max_query_tokens),
        lambda: AddValidationRules(rules),
    ]
    if not settings.introspection_enabled:
        extensions.append(DisableIntrospection)
    extensions += [
        lambda: ParserCache(maxsize=CACHE_SIZE),
        lambda: ValidationCache(maxsize=CACHE_SIZE),
    ]
    return StrawgateSchema(query=Query, mutation=Mutation, extensions=extensions)


def _export_schema() -> strawberry.Schema:
    return strawberry.Schema(query=Query, mutation=Mutation)


schema = _export_schema()


def schema_sdl(target: Any = None) -> str:
    """The text of schema.graphql."""
    return (target or schema).as_str() + "\n"
