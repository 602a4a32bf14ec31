"""Errors about input values that name the variable, path and expected type, never the value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from graphql import (
    ASTValidationRule,
    DocumentNode,
    EnumValueNode,
    FragmentDefinitionNode,
    GraphQLError,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLSchema,
    ListValueNode,
    Node,
    NullValueNode,
    ObjectValueNode,
    OperationDefinitionNode,
    ValueNode,
    VariableNode,
    assert_leaf_type,
    is_enum_type,
    is_input_object_type,
    is_list_type,
    is_non_null_type,
    is_required_input_field,
)
from graphql.execution import Executor
from graphql.execution.get_variable_signature import get_variable_signature
from graphql.execution.values import input_is_nested_too_deeply
from graphql.language import SKIP, ArgumentNode, VariableDefinitionNode, VisitorAction
from graphql.pyutils import Undefined, did_you_mean, is_iterable, suggestion_list
from graphql.type import GraphQLEnumType, GraphQLScalarType
from graphql.utilities.replace_variables import replace_variables
from graphql.validation import ValuesOfCorrectTypeRule
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

__all__ = ["SafeExecutor", "SafeValuesOfCorrectTypeRule", "replace_rules", "variable_errors"]

MAX_VARIABLE_ERRORS = 50

Path = tuple[str | int, ...]
Report = Callable[[str, Node | None], None]


class _Position:
    """Where a value stands: the variable or argument it belongs to, and its root."""

    def __init__(
        self,
        subject: str,
        root: str,
        report: Report,
        *,
        hide_suggestions: bool,
        noun: str = "value",
    ) -> None:
        self.subject = subject
        self.noun = noun
        self.root = root
        self.report = report
        self.hide_suggestions = hide_suggestions

    def at(self, path: Path) -> str:
        """The path as a client writes it: `$i.password`, `input.codes[0]`."""
        text = self.root
        for key in path:
            text += f"[{key}]" if isinstance(key, int) else f".{key}"
        return text

    def invalid(self, path: Path, reason: str, node: Node | None, suggestion: str = "") -> None:
        where = f" at '{self.at(path)}'" if path else ""
        self.report(
            f"{self.subject} has an invalid {self.noun}{where}: {reason}.{suggestion}", node
        )

    def unknown_field(
        self, path: Path, key: str, type_: GraphQLInputObjectType, node: Node | None
    ) -> None:
        suggestion = (
            "" if self.hide_suggestions else did_you_mean(suggestion_list(key, list(type_.fields)))
        )
        self.report(
            f"{self.subject} has an unknown field '{key}'"
            f" at '{self.at((*path, key))}': Field '{key}' is not defined by type"
            f" '{type_.name}'.{suggestion}",
            node,
        )

    def missing_field(
        self, path: Path, name: str, field_type: GraphQLInputType, node: Node | None
    ) -> None:
        self.invalid(
            (*path, name), f"Field '{name}' of required type '{field_type}' was not provided", node
        )

    def null(self, path: Path, type_: GraphQLInputType, node: Node | None) -> None:
        self.invalid(path, f"a value of non-null type '{type_}' must not be null", node)

    def one_of(self, path: Path, type_: GraphQLInputObjectType, node: Node | None) -> None:
        self.invalid(
            path,
            f"exactly one field of OneOf Input Object type '{type_.name}' must be given,"
            " and its value must not be null",
            node,
        )


def expected(type_: GraphQLInputType) -> str:
    """What a position of this type takes, in words, without the value it got."""
    if is_non_null_type(type_):
        type_ = type_.of_type
    if is_input_object_type(type_):
        return f"an object of type '{type_.name}'"
    if is_enum_type(type_):
        return f"a value of enum '{type_.name}'"
    name = assert_leaf_type(type_).name
    return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


def _enum_suggestion(type_: GraphQLEnumType, value: object, position: _Position) -> str:
    # Only names from the schema are suggested; the value itself is not repeated.
    if position.hide_suggestions or not isinstance(value, str):
        return ""
    return did_you_mean(suggestion_list(value, list(type_.values)), "the enum value")


def _check_value(value: Any, type_: GraphQLInputType, path: Path, position: _Position) -> None:
    if is_non_null_type(type_):
        if value is None or value is Undefined:
            position.null(path, type_, None)
            return
        type_ = type_.of_type
    if value is None or value is Undefined:
        return
    if is_list_type(type_):
        if is_iterable(value):
            for index, item in enumerate(value):
                _check_value(item, type_.of_type, (*path, index), position)
        else:
            _check_value(value, type_.of_type, path, position)
        return
    if is_input_object_type(type_):
        if not isinstance(value, dict):
            position.invalid(path, f"expected {expected(type_)}", None)
            return
        for name, field in type_.fields.items():
            if name in value:
                _check_value(value[name], field.type, (*path, name), position)
            elif is_required_input_field(field):
                position.missing_field(path, name, field.type, None)
        known = []
        for key in value:
            if key in type_.fields:
                known.append(key)
            else:
                position.unknown_field(path, str(key), type_, None)
        if type_.is_one_of and (len(known) != 1 or value[known[0]] is None):
            position.one_of(path, type_, None)
        return
    leaf = assert_leaf_type(type_)
    try:
        if isinstance(leaf, GraphQLEnumType):
            result = leaf.coerce_input_value(value, True)
        else:
            result = leaf.coerce_input_value(value)
    except Exception:  # its message would quote the value
        result = Undefined
    if result is Undefined:
        suggestion = (
            _enum_suggestion(leaf, value, position) if isinstance(leaf, GraphQLEnumType) else ""
        )
        position.invalid(path, f"expected {expected(leaf)}", None, suggestion)


def _check_literal(
    node: ValueNode, type_: GraphQLInputType, path: Path, position: _Position
) -> None:
    if isinstance(node, VariableNode):
        return
    if is_non_null_type(type_):
        if isinstance(node, NullValueNode):
            position.null(path, type_, node)
            return
        type_ = type_.of_type
    if isinstance(node, NullValueNode):
        return
    if is_list_type(type_):
        if isinstance(node, ListValueNode):
            for index, item in enumerate(node.values):
                _check_literal(item, type_.of_type, (*path, index), position)
        else:
            _check_literal(node, type_.of_type, path, position)
        return
    if is_input_object_type(type_):
        if not isinstance(node, ObjectValueNode):
            position.invalid(path, f"expected {expected(type_)}", node)
            return
        given = {field.name.value: field for field in node.fields}
        for name, field in type_.fields.items():
            if name in given:
                _check_literal(given[name].value, field.type, (*path, name), position)
            elif is_required_input_field(field):
                position.missing_field(path, name, field.type, node)
        known = []
        for field_node in node.fields:
            if field_node.name.value in type_.fields:
                known.append(field_node)
            else:
                position.unknown_field(path, field_node.name.value, type_, field_node)
        if type_.is_one_of and (len(known) != 1 or isinstance(known[0].value, NullValueNode)):
            position.one_of(path, type_, node)
        return
    leaf = assert_leaf_type(type_)
    try:
        if isinstance(leaf, GraphQLEnumType):
            result = leaf.coerce_input_literal(replace_variables(node), True)
        elif isinstance(leaf, GraphQLScalarType) and leaf.coerce_input_literal is not None:
            result = leaf.coerce_input_literal(replace_variables(node))
        else:
            result = leaf.parse_literal(node, None)
    except Exception:  # its message would quote the literal
        result = Undefined
    if result is Undefined:
        name = node.value if isinstance(node, EnumValueNode) else None
        suggestion = (
            _enum_suggestion(leaf, name, position) if isinstance(leaf, GraphQLEnumType) else ""
        )
        position.invalid(path, f"expected {expected(leaf)}", node, suggestion)


class SafeValuesOfCorrectTypeRule(ValuesOfCorrectTypeRule):
    """ValuesOfCorrectTypeRule, its messages naming the argument and path, never the literal."""

    _argument: str | None = None
    _variable: str | None = None

    def enter_argument(self, node: ArgumentNode, *_args: Any) -> None:
        self._argument = node.name.value

    def leave_argument(self, *_args: Any) -> None:
        self._argument = None

    def enter_variable_definition(self, node: VariableDefinitionNode, *_args: Any) -> None:
        self._variable = node.variable.name.value

    def leave_variable_definition(self, *_args: Any) -> None:
        self._variable = None

    def is_valid_value_node(
        self, node: ValueNode, input_type: GraphQLInputType | None
    ) -> VisitorAction:
        """Called for each top-level value of the document."""
        if input_type is None:
            return SKIP
        noun = "value"
        if self._argument is not None:
            subject, root = f"Argument '{self._argument}'", self._argument
        elif self._variable is not None:
            subject, root, noun = (
                f"Variable '${self._variable}'",
                f"${self._variable}",
                "default value",
            )
        else:
            subject, root = "A value", "value"

        def report(message: str, at: Node | None) -> None:
            self.report_error(GraphQLError(message, at or node))

        position = _Position(
            subject, root, report, hide_suggestions=self.context.hide_suggestions, noun=noun
        )
        _check_literal(node, input_type, (), position)
        return SKIP


def variable_errors(
    schema: GraphQLSchema,
    operation: OperationDefinitionNode,
    inputs: dict[str, Any],
    *,
    hide_suggestions: bool,
) -> list[GraphQLError]:
    """What graphql-core's variable coercion rejects, named by variable and path, never value."""
    errors: list[GraphQLError] = []

    for definition in operation.variable_definitions or ():
        signature = get_variable_signature(schema, definition)
        if isinstance(signature, GraphQLError):
            errors.append(signature)
            continue
        name, type_ = signature.name, signature.type
        value = inputs.get(name, Undefined)

        def report(message: str, _at: Node | None, node: Node = definition) -> None:
            if len(errors) >= MAX_VARIABLE_ERRORS:
                raise GraphQLError(
                    "Too many errors processing variables, error limit reached. Execution aborted."
                )
            errors.append(GraphQLError(message, node))

        try:
            if value is Undefined:
                if definition.default_value is None and is_non_null_type(type_):
                    report(f"Variable '${name}' of required type '{type_}' was not provided.", None)
                continue  # a default is the document's, checked as it was validated
            if value is None and is_non_null_type(type_):
                report(f"Variable '${name}' of non-null type '{type_}' must not be null.", None)
                continue
            if input_is_nested_too_deeply(value, type_):
                report(f"Variable '${name}' is nested too deeply.", None)
                continue
            position = _Position(
                f"Variable '${name}'",
                f"${name}",
                report,
                hide_suggestions=hide_suggestions,
            )
            _check_value(value, type_, (), position)
        except GraphQLError as error:
            errors.append(error)
            break
        except RecursionError:
            errors.append(GraphQLError("Variable values are nested too deeply."))
            break
    return errors


def _operation(
    document: DocumentNode, operation_name: str | None
) -> OperationDefinitionNode | None:
    """The operation graphql-core runs, found as it finds it; None where it finds none."""
    found: OperationDefinitionNode | None = None
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            if operation_name is None:
                if found is not None:
                    return None
                found = definition
            elif definition.name and definition.name.value == operation_name:
                found = definition
    return found


def _fragment_signatures_fail(schema: GraphQLSchema, document: DocumentNode) -> bool:
    return any(
        isinstance(get_variable_signature(schema, variable), GraphQLError)
        for definition in document.definitions
        if isinstance(definition, FragmentDefinitionNode)
        for variable in definition.variable_definitions or ()
    )


class SafeExecutor(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's executor, with variables that do not coerce reported by variable_errors."""

    @classmethod
    def build(
        cls,
        schema: GraphQLSchema,
        document: DocumentNode,
        root_value: Any = None,
        context_value: Any = None,
        raw_variable_values: dict[str, Any] | None = None,
        operation_name: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> list[GraphQLError] | Executor[Any]:
        built = super().build(
            schema,
            document,
            root_value,
            context_value,
            raw_variable_values,
            operation_name,
            *args,
            **kwargs,
        )
        if not isinstance(built, list):
            return built
        operation = _operation(document, operation_name)
        if operation is None or _fragment_signatures_fail(schema, document):
            return built  # no operation to run: these errors quote no variable
        # Anything else that stopped the build was the variables: graphql-core's own
        # errors about them are dropped unread, as they quote the values.
        errors = variable_errors(
            schema,
            operation,
            raw_variable_values or {},
            hide_suggestions=bool(kwargs.get("hide_suggestions", True)),
        )
        return errors or [GraphQLError("The variable values are invalid.")]


def replace_rules(
    rules: Sequence[type[ASTValidationRule]],
) -> tuple[type[ASTValidationRule], ...]:
    """The rules with ValuesOfCorrectTypeRule replaced by its safe twin."""
    return tuple(
        SafeValuesOfCorrectTypeRule if rule is ValuesOfCorrectTypeRule else rule for rule in rules
    )
