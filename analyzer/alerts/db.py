"""Opening the control-plane database (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from analyzer.alerts.models import Base
from tailscope.config import ConfigError


def default_url(db_path: str) -> str:
    """``sqlite:///<db>.control.sqlite`` next to the DuckDB file (memory for a memory store)."""
    if db_path in ("", ":memory:"):
        return "sqlite://"
    return "sqlite:///" + str(Path(db_path).resolve()) + ".control.sqlite"


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def open_engine(url: str) -> Engine:
    """Create the engine and the tables (idempotent).

    SQLite gets WAL and a busy timeout because the evaluator, the sender and
    API requests write from different threads; PostgreSQL needs nothing special.

    Raises:
        ConfigError: the URL cannot be parsed, its driver is missing (install
            ``psycopg[binary]`` for ``postgresql+psycopg://``), or the database
            cannot be reached.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"invalid --control-db URL {redact_url(url)!r}: expected e.g. sqlite:///alerts.sqlite or postgresql+psycopg://user@host/db") from None
    # hide_parameters: a failed INSERT of a webhook must not put its secret in an error message or log
    kwargs: dict[str, Any] = {"future": True, "hide_parameters": True}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if parsed.database in (None, "", ":memory:"):
            from sqlalchemy.pool import StaticPool

            kwargs["poolclass"] = StaticPool  # one shared connection, or each thread sees its own empty DB
        else:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_pre_ping"] = True
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise ConfigError(f"cannot use --control-db {redact_url(url)}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_con: Any, _record: Any) -> None:
            cur = dbapi_con.cursor()
            if parsed.database not in (None, "", ":memory:"):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an alert in the outbox must survive a power cut
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    try:
        Base.metadata.create_all(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise ConfigError(f"cannot open the control database {redact_url(url)}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False, future=True)
