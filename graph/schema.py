"""The Strawberry schema: `schema` is the export target; `build_schema` adds the limits."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import strawberry
from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema, parse, validate
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.graphql import OperationType

from db.settings import Settings
from graph.resolvers.account import AccountMutation, AccountQuery
from graph.resolvers.auth import AuthMutation, AuthQuery
from graph.resolvers.events import EventsQuery
from graph.resolvers.identities import IdentityMutation, IdentityQuery
from graph.resolvers.lifecycle import LifecycleMutation, LifecycleQuery
from graph.resolvers.mfa import MfaMutation
from graph.resolvers.passkeys import PasskeyMutation
from graph.resolvers.stepup import StepUpMutation
from graph.validation import SafeExecutor, replace_rules

# Distinct documents kept parsed and validated. Bounded, so that a stream of unique
# query texts cannot grow memory.
CACHE_SIZE = 256


@lru_cache(maxsize=CACHE_SIZE)
def _parse(query: str, max_tokens: int) -> DocumentNode:
    return parse(query, max_tokens=max_tokens)


# The rules Strawberry's own validate_document adds; called directly here because it does
# not pass graphql-core's hide_suggestions on.
_STRAWBERRY_RULES = (MaybeNullValidationRule, OneOfInputValidationRule)


@lru_cache(maxsize=CACHE_SIZE)
def _validate(
    schema: GraphQLSchema,
    query: str,
    max_tokens: int,
    rules: tuple[type[ASTValidationRule], ...],
    hide_suggestions: bool,
) -> list[GraphQLError]:
    """The errors of a query that parses. Keyed by the query's text, like _parse: a
    string's hash is computed once and kept, a document's is a walk of its whole tree on
    every lookup."""
    return validate(
        schema,
        _parse(query, max_tokens),
        (*rules, *_STRAWBERRY_RULES),
        hide_suggestions=hide_suggestions,
    )


@strawberry.type
class Query(AuthQuery, AccountQuery, EventsQuery, LifecycleQuery, IdentityQuery):
    pass


@strawberry.type
class Mutation(
    AuthMutation,
    MfaMutation,
    AccountMutation,
    LifecycleMutation,
    StepUpMutation,
    PasskeyMutation,
    IdentityMutation,
):
    pass


class StrawgateSchema(strawberry.Schema):
    """The served schema: documents are parsed and validated through shared LRU caches,
    under the size, token, depth and alias limits (and, where configured, without
    introspection or "Did you mean ...?" suggestions, which name fields and types).

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
        max_query_bytes: int,
        rules: tuple[type[ASTValidationRule], ...],
        hide_suggestions: bool = False,
        config: StrawberryConfig | None = None,
    ) -> None:
        super().__init__(
            query=query, mutation=mutation, config=config, execution_context_class=SafeExecutor
        )
        self._max_tokens = max_tokens
        self._max_query_bytes = max_query_bytes
        self._rules = rules
        self._hide_suggestions = hide_suggestions

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        # Refused before it is parsed (or looked up in the caches): the token limit stops
        # the parser early, but a long string or comment is a single token.
        if query is not None and _utf8_size_over(query, self._max_query_bytes):
            error = GraphQLError(
                f"The query document is larger than {self._max_query_bytes} bytes.",
                extensions={"code": "QUERY_TOO_LARGE"},
            )
            return ExecutionResult(data=None, errors=[error])
        return await super().execute(
            query,
            variable_values,
            context_value,
            root_value,
            operation_name,
            allowed_operation_types,
            operation_extensions,
        )

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
            self._schema,
            query,
            self._max_tokens,
            (*replace_rules(context.validation_rules), *self._rules),
            self._hide_suggestions,
        )
        return context

    def _get_custom_context_kwargs(
        self, operation_extensions: dict[str, Any] | None = None, *, sync: bool = False
    ) -> dict[str, Any]:
        kwargs = super()._get_custom_context_kwargs(operation_extensions, sync=sync)
        # Variable values are checked as execution starts; their errors suggest too.
        kwargs["hide_suggestions"] = self._hide_suggestions
        return kwargs

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
    # "Did you mean ...?" names fields, arguments, types and enum values: introspection
    # by another route. Off in production, and wherever introspection is off.
    hide_suggestions = settings.is_production or not settings.introspection_enabled
    config = StrawberryConfig(
        disable_field_suggestions=hide_suggestions,
        # The view refuses a larger batch, and any batch with batching off, as a 400.
        batching_config={"max_operations": settings.max_batch_size} if settings.batching else None,
    )
    return StrawgateSchema(
        query=Query,
        mutation=Mutation,
        max_tokens=settings.max_query_tokens,
        max_query_bytes=settings.max_query_bytes,
        rules=tuple(rules),
        hide_suggestions=hide_suggestions,
        config=config,
    )


def _utf8_size_over(text: str, limit: int) -> bool:
    # A character is one to four bytes in UTF-8: most texts are decided without encoding.
    if len(text) > limit:
        return True
    if len(text) * 4 <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def _export_schema() -> strawberry.Schema:
    return strawberry.Schema(query=Query, mutation=Mutation)


schema = _export_schema()


def schema_sdl(target: Any = None) -> str:
    """The text of schema.graphql."""
    return (target or schema).as_str() + "\n"
