"""The Strawberry schema: `schema` is the export target; `build_schema` adds the limits."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import strawberry
from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema, parse
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter
from strawberry.schema.schema import validate_document
from strawberry.types import ExecutionContext

from db.settings import Settings
from graph.resolvers.account import AccountMutation, AccountQuery
from graph.resolvers.auth import AuthMutation, AuthQuery
from graph.resolvers.mfa import MfaMutation

# Distinct documents kept parsed and validated. Bounded, so that a stream of unique
# query texts cannot grow memory.
CACHE_SIZE = 256


@lru_cache(maxsize=CACHE_SIZE)
def _parse(query: str, max_tokens: int) -> DocumentNode:
    return parse(query, max_tokens=max_tokens)


@lru_cache(maxsize=CACHE_SIZE)
def _validate(
    schema: GraphQLSchema, document: DocumentNode, rules: tuple[type[ASTValidationRule], ...]
) -> list[GraphQLError]:
    return validate_document(schema, document, rules)


@strawberry.type
class Query(AuthQuery, AccountQuery):
    pass


@strawberry.type
class Mutation(AuthMutation, MfaMutation, AccountMutation):
    pass


class StrawgateSchema(strawberry.Schema):
    """The served schema: documents are parsed and validated through shared LRU caches,
    under the token, depth and alias limits (and, where configured, without introspection).

    This is what Strawberry's ParserCache, ValidationCache, MaxTokensLimiter,
    QueryDepthLimiter, MaxAliasesLimiter and DisableIntrospection extensions do, with
    their rules, done once as the execution context is made. As six extensions it cost
    more than the cached work itself: Strawberry wraps every hook of every extension in
    fresh context managers on every request (see bench/README.md for the figures). The
    limiter rule classes are built once, so the validation cache keys stay stable.
    """

    def __init__(
        self,
        *,
        query: type,
        mutation: type,
        max_tokens: int,
        rules: tuple[type[ASTValidationRule], ...],
    ) -> None:
        super().__init__(query=query, mutation=mutation)
        self._max_tokens = max_tokens
        self._rules = rules

    def _create_execution_context(  # type: ignore[override]
        self, query: str | None, allowed_operation_types: Any, **kwargs: Any
    ) -> ExecutionContext:
        context = super()._create_execution_context(query, allowed_operation_types, **kwargs)
        # Also what Strawberry's own parse uses when the cached one below fails.
        context.parse_options["max_tokens"] = self._max_tokens
        if query is None:
            return context
        try:
            document = _parse(query, self._max_tokens)
        except GraphQLError:
            return context  # Strawberry parses it again and reports the error its usual way
        context.graphql_document = document
        context.pre_execution_errors = _validate(
            self._schema, document, (*context.validation_rules, *self._rules)
        )
        return context

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Silenced: the view logs unexpected errors once, with the request id, and never
        logs validation messages (they can quote the variables a client sent)."""


def build_schema(settings: Settings) -> StrawgateSchema:
    rules: list[type[ASTValidationRule]] = [
        *QueryDepthLimiter(max_depth=settings.max_query_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    if not settings.introspection_enabled:
        rules.append(NoSchemaIntrospectionCustomRule)
    return StrawgateSchema(
        query=Query, mutation=Mutation, max_tokens=settings.max_query_tokens, rules=tuple(rules)
    )


def _export_schema() -> strawberry.Schema:
    return strawberry.Schema(query=Query, mutation=Mutation)


schema = _export_schema()


def schema_sdl(target: Any = None) -> str:
    """The text of schema.graphql."""
    return (target or schema).as_str() + "\n"
