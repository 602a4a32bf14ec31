"""Housekeeping's writes, in batches: a backlog of any size is removed in short
transactions of a bounded number of rows each, so that no request waits long for a row
the housekeeper holds, and the progress can be told as it goes.

A batch statement writes at most `:batch` rows, which it picks itself (a LIMIT in a
subquery, FOR UPDATE SKIP LOCKED: rows a request holds are left for the next pass rather
than waited for). Two ways to run one:

- `until_done`: run it in a transaction of its own, again and again, until a run writes
  fewer rows than it may. For statements that find their rows through an index (ordered
  by it, so that each batch starts where the last ended).
- `walk`: on PostgreSQL, for tables without an index on what is pruned. The statement
  also takes a range of the table's heap pages, `:lo` to `:hi` (ctids: `(page, 0)`), and
  picks only rows stored there (a TID range scan); every range, from the table's first
  page to its last as it was when the walk began, is run `until_done` in turn. Each page
  is read once per walk, whatever the backlog; each batch reads at most `pages` pages.
  Elsewhere (SQLite: one process, small tables) a twin without the range runs
  `until_done`.

The batch size adapts to the time a batch takes: it starts small, its rows (and a walk's
pages) halve whenever a batch took longer than `target` seconds and double (up to `rows`
and `pages`) while batches take less than half of it, so that a slow or busy machine
still keeps each transaction short.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Integer,
    Select,
    bindparam,
    cast,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import REGCLASS
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import aliased
from sqlalchemy.sql import ColumnElement, Executable
from sqlalchemy.sql.visitors import InternalTraversal

from db.session import Statements

BATCH_ROWS = 500  # rows a batch may write
BATCH_PAGES = 1000  # heap pages a walk's batch may read (8 MiB)
BATCH_TARGET = 0.05  # seconds a batch should take at most
MIN_ROWS = 10
MIN_PAGES = 16
START_ROWS = 50
START_PAGES = 128


def ctid_of(name: str) -> Any:
    """The row's place in its table (PostgreSQL), for a walk's page range: `name` is the
    table or alias in the statement."""
    return literal_column(f"{name}.ctid")


def chosen(
    model: type[Any],
    where: Callable[[Any], Any],
    *,
    key: str = "id",
    order_by: Callable[[Any], Any] | None = None,
    in_pages: bool = False,
) -> Select[Any]:
    """The keys of a batch's rows: at most :batch rows of `model` that `where` (given the
    table under the name "candidate") holds for, in `order_by`'s order (an index's: each
    batch then starts where the last ended), in heap pages :lo to :hi when `in_pages`;
    locked, skipping rows that others hold (SQLite takes no row locks: nothing to skip)."""
    row = aliased(model, name="candidate")
    conditions = [where(row)]
    if in_pages:
        ctid = ctid_of("candidate")
        conditions += [ctid >= bindparam("lo"), ctid < bindparam("hi")]
    picked = select(getattr(row, key)).where(*conditions)
    if order_by is not None:
        picked = picked.order_by(order_by(row))
    return picked.limit(bindparam("batch")).with_for_update(skip_locked=True)


class AnyOf(ColumnElement[bool]):
    """`column` among the batch's keys (`picked`): on PostgreSQL `column = ANY(ARRAY(...))`,
    which is planned as a look-up of each key by index whatever the planner guesses of the
    LIMIT (as `IN (...)`, a generic plan of a prepared statement guesses a tenth of the
    table and joins it by a sequential scan); elsewhere `column IN (...)`."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True
    _traverse_internals: list[tuple[str, InternalTraversal]] = [  # noqa: RUF012 - as declared
        ("column", InternalTraversal.dp_clauseelement),
        ("picked", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: Any, picked: Select[Any]) -> None:
        # A mapped attribute (User.id) stands for its column.
        clause = getattr(column, "__clause_element__", None)
        self.column: ColumnElement[Any] = clause() if clause is not None else column
        self.picked = picked.scalar_subquery()


@compiles(AnyOf)
def _in_keys(element: AnyOf, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} IN {compiler.process(element.picked, **kw)}"


@compiles(AnyOf, "postgresql")
def _any_of_keys(element: AnyOf, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return f"{column} = ANY(ARRAY{compiler.process(element.picked, **kw)})"


_PAGES = select(
    (
        func.pg_relation_size(cast(bindparam("table"), REGCLASS))
        / cast(func.current_setting("block_size"), Integer)
    ).label("pages")
)


@dataclass
class Progress:
    """What a prune did so far: rows written, batches, time, the longest batch (the
    longest any of its row locks was held), all in seconds."""

    kind: str
    rows: int = 0
    batches: int = 0
    seconds: float = 0.0
    longest: float = 0.0

    def add(self, rows: int, seconds: float) -> None:
        self.rows += rows
        self.batches += 1
        self.seconds += seconds
        self.longest = max(self.longest, seconds)


OnBatch = Callable[[Progress, int], None]  # after each batch: the prune so far, its rows


@dataclass(frozen=True)
class Batching:
    rows: int = BATCH_ROWS
    pages: int = BATCH_PAGES
    # None: every batch may write `rows` (tests: a fixed size); else see the docstring.
    target: float | None = BATCH_TARGET
    on_batch: OnBatch | None = None


class BatchSize:
    """A batch's rows and pages now: from START_ROWS and START_PAGES, halved (down to
    MIN_ROWS and MIN_PAGES) after a batch slower than the target, doubled (up to the
    configured sizes) after one faster than half of it."""

    def __init__(self, batching: Batching) -> None:
        self.batching = batching
        self.rows = max(1, batching.rows)
        self.pages = max(1, batching.pages)
        if batching.target is not None:  # a slow start: the first batch is a small one
            self.rows = min(self.rows, START_ROWS)
            self.pages = min(self.pages, START_PAGES)

    def took(self, seconds: float) -> None:
        target = self.batching.target
        if target is None:
            return
        if seconds > target:
            self.rows = max(min(MIN_ROWS, self.batching.rows), self.rows // 2)
            self.pages = max(min(MIN_PAGES, self.batching.pages), self.pages // 2)
        elif seconds < target / 2:
            self.rows = min(max(1, self.batching.rows), self.rows * 2)
            self.pages = min(max(1, self.batching.pages), self.pages * 2)


async def until_done(
    statements: Statements,
    kind: str,
    statement: Executable,
    params: Mapping[str, Any],
    batching: Batching,
    *,
    progress: Progress | None = None,
    size: BatchSize | None = None,
) -> Progress:
    """Runs `statement` (it writes at most :batch rows) in transactions of its own until a
    run writes fewer rows than it was given.

    On PostgreSQL each run is one statement outside any transaction block (its own
    transaction), which also says how long it ran in the database (timed()): its row locks
    go the moment it ends, however busy this process's event loop is, and that time is
    what the batch size adapts to and what Progress records. Elsewhere (SQLite) each run
    is a transaction of its own, timed here."""
    done = progress if progress is not None else Progress(kind)
    size = size or BatchSize(batching)
    native = statements.engine.dialect.name == "postgresql"
    while True:
        limit = size.rows
        arguments = {**params, "batch": limit}
        if native:
            async with statements.connection() as conn:
                ran = await conn.first(timed(statement), arguments)
            written = int(ran["rows"]) if ran is not None else 0
            took = float(ran["seconds"]) if ran is not None else 0.0
        else:
            started = time.perf_counter()
            async with statements.transaction() as tx:
                written = await tx.execute(statement, arguments)
            took = time.perf_counter() - started
        done.add(written, took)
        size.took(took)
        if batching.on_batch is not None:
            batching.on_batch(done, written)
        if written < limit:
            return done


@functools.cache
def timed(statement: Any) -> Executable:
    """PostgreSQL: `statement` (a DELETE or UPDATE) run as a CTE, answering the rows it
    wrote and the seconds it ran (clock_timestamp() once they are written, less the
    statement's start). Made once per statement: Statements keeps compiled forms per
    statement object."""
    written = statement.returning(literal(1).label("one")).cte("written")
    ran = func.extract("epoch", func.clock_timestamp() - func.statement_timestamp())
    return select(func.count().label("rows"), ran.label("seconds")).select_from(written)


async def walk(
    statements: Statements,
    kind: str,
    table: str,
    in_pages: Executable,
    anywhere: Executable,
    params: Mapping[str, Any],
    batching: Batching,
) -> Progress:
    """PostgreSQL: `in_pages` (rows stored in heap pages :lo to :hi only) over the whole
    of `table`, range by range. Elsewhere: `anywhere` until done."""
    if statements.engine.dialect.name != "postgresql":
        return await until_done(statements, kind, anywhere, params, batching)
    async with statements.connection() as conn:
        found = await conn.first(_PAGES, {"table": table})
    pages = int(found["pages"]) if found is not None else 0
    done = Progress(kind)
    size = BatchSize(batching)
    first = 0
    while first < pages:
        step = size.pages
        ranged = {**params, "lo": (first, 0), "hi": (first + step, 0)}
        await until_done(statements, kind, in_pages, ranged, batching, progress=done, size=size)
        first += step
    return done
