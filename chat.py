"""A small real-time chat service: accounts, JWT tokens, message history and a live websocket.

Run it with `uvicorn chat:app`, or mount `chat.app` inside another ASGI app.
Everything is configured through environment variables (see the README).
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import hmac
import http
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import secrets
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import types
import typing
import weakref
from pathlib import Path

import bcrypt
import databases
import jwt
import limits
import limits.aio.storage
import limits.aio.strategies
import prometheus_client
import prometheus_client.multiprocess
import redis.asyncio
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.schemas import SchemaGenerator
from starlette.websockets import WebSocket, WebSocketDisconnect
import uvicorn
import uvicorn.logging
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
import websockets.frames
from websockets.protocol import State as WebSocketState

log = logging.getLogger("chat")
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- configuration

# `token=<value>` in URLs (`access_token=`, `refresh_token=` too, and with any letter of the key
# percent-encoded: the server decodes keys) and `bearer.<token>` or `Bearer <token>` in headers,
# as uvicorn's logs and the websockets library's debug lines show them.
TOKENS_IN_TEXT = re.compile(r"((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)=|\bbearer[.\s]\s*)[^&\s\"',]+", re.IGNORECASE)


def hide_tokens(record):
    """Logging filter: every token in a log line becomes `***`."""
    if record.name == "uvicorn.access":  # its formatter unpacks the arguments: mask each one
        if isinstance(record.args, tuple):
            record.args = tuple(TOKENS_IN_TEXT.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args)
    else:  # uvicorn.asgi logs whole scopes as dicts at trace level: mask the finished line
        record.msg, record.args = TOKENS_IN_TEXT.sub(r"\1***", record.getMessage()), None
    return True


for logger_name in ("uvicorn.access", "uvicorn.error", "uvicorn.asgi", "chat"):
    logging.getLogger(logger_name).addFilter(hide_tokens)


class StartUpError(Exception):
    """Start-up cannot go on; the message says why in one line."""


def config_error(message):
    """Stop start-up with one line that names the variable at fault."""
    sys.exit(f"chat: configuration error: {message}")


def env_int(name, default, minimum, maximum):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not minimum <= int(raw) <= maximum:
        config_error(f"{name} must be a whole number from {minimum} to {maximum}, not {raw!r}")
    return int(raw)


LOG_FORMAT = os.environ.get("LOG_FORMAT", "").strip().lower() or "text"
if LOG_FORMAT not in ("text", "json"):
    config_error(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")


# Logs are set up first, so that what the configuration below logs (the key file) looks like the rest.
class JsonLines(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line, for log shippers."""

    def format(self, record):
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logs():
    """chat's lines go to stderr beside uvicorn's (unless a --log-config routed them already);
    with LOG_FORMAT=json every line, uvicorn's too, is a JSON object."""
    chat_log = logging.getLogger("chat")
    if not chat_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
        chat_log.addHandler(handler)
        chat_log.setLevel(logging.INFO)
        chat_log.propagate = False
    if LOG_FORMAT == "json":
        for name in ("chat", "uvicorn", "uvicorn.error", "uvicorn.access"):
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(JsonLines())


configure_logs()


ALGORITHM = "HS256"
ACCESS_TOKEN_EXPIRE_MINUTES = env_int("ACCESS_TOKEN_EXPIRE_MINUTES", 15, 1, 525_600)
REFRESH_TOKEN_EXPIRE_DAYS = env_int("REFRESH_TOKEN_EXPIRE_DAYS", 7, 1, 3650)
BCRYPT_ROUNDS = env_int("BCRYPT_ROUNDS", 12, 4, 31)


def env_limit(name, default):
    """A rate limit in the `limits` library's notation ("10 per 15 minutes"), or None for "0"/"off"."""
    raw = os.environ.get(name, "").strip() or default
    if raw.lower() in ("0", "off"):
        return None
    try:
        return limits.parse(raw)
    except ValueError:
        config_error(f"{name} must be a limit such as '10 per 15 minutes', or 'off', not {raw!r}")


LOGIN_LIMIT = env_limit("LOGIN_LIMIT", "10 per 15 minutes")  # failed logins per (username, address)
REGISTER_LIMIT = env_limit("REGISTER_LIMIT", "20 per hour")  # registrations per address
MESSAGE_LIMIT = env_limit("MESSAGE_LIMIT", "30 per 10 seconds")  # messages per user, all sockets
MAX_SOCKETS_PER_USER = env_int("MAX_SOCKETS_PER_USER", 10, 0, 1_000_000)  # in one process; 0: no limit
# With Redis, a process's presence counts expire this long after its last renewal (every third of
# it), so the sockets of a process that died stop counting within this time.
PRESENCE_EXPIRY_SECONDS = env_int("PRESENCE_EXPIRY_SECONDS", 60, 3, 3600)

DATABASE_URL = os.environ.get("DATABASE_URL", "").strip() or "sqlite+aiosqlite:///./chat.db"
DATABASE_SCHEMES = {"sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg"}
if DATABASE_URL.partition("://")[0] not in DATABASE_SCHEMES:
    config_error(f"DATABASE_URL must start with one of {sorted(DATABASE_SCHEMES)}, not {DATABASE_URL!r}")
USES_SQLITE = DATABASE_URL.startswith("sqlite")


SEED_PLACEHOLDER_KEY = "your-secret-key-change-this-in-production"


def key_in_file(path):
    """The signing key kept in `path`, made there (mode 0600) if there is none yet. Processes
    starting together agree: the key is written to a file of its own, then linked into place,
    which succeeds for one of them; the others read what it wrote."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_urlsafe(32) + "\n")
        file.flush()
        os.fsync(file.fileno())  # on disk before it is in place: never an empty key after a crash
    try:
        os.link(draft, path)  # fails if another process got there first
        log.warning("SECRET_KEY is not set: made a new signing key in %s (keep it private)", path)
    except FileExistsError:
        pass
    finally:
        os.unlink(draft)
    return path.read_text().strip()


def secret_key():
    """SECRET_KEY if set; else, on SQLite, a key kept in a file beside the database."""
    key = os.environ.get("SECRET_KEY", "").strip()
    if key == SEED_PLACEHOLDER_KEY:
        config_error("SECRET_KEY is the placeholder from the API document; set a real secret")
    if key:
        return key
    if not USES_SQLITE:
        config_error("SECRET_KEY must be set with PostgreSQL: processes on several machines cannot share a key file")
    database_path = DATABASE_URL.partition(":///")[2].partition("?")[0]
    if database_path in ("", ":memory:"):
        log.warning("SECRET_KEY is not set and the database is in memory: tokens die with this process")
        return secrets.token_urlsafe(32)
    path = Path(database_path + ".key").resolve()
    try:
        return key_in_file(path)
    except OSError as error:
        config_error(f"SECRET_KEY is not set and the key file {path} cannot be used ({error.strerror})")


SECRET_KEY = secret_key()

BROADCAST_URL = os.environ.get("BROADCAST_URL", "").strip()
if BROADCAST_URL and BROADCAST_URL.partition("://")[0] not in {"redis", "rediss"}:
    config_error(f"BROADCAST_URL must be a redis:// or rediss:// URL, not {BROADCAST_URL!r}")

CORS_ORIGINS = [o.strip() for o in os.environ.get("CORS_ORIGINS", "*").split(",") if o.strip()]

MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_SECONDS = 10  # a request body must arrive whole within this time
MAX_MESSAGE_CHARS = 1000
# Dropped from messages: C0 controls but tab and newline, DEL, C1 controls, and the invisible
# characters that reorder or hide text (bidirectional embeddings, overrides, isolates and marks;
# zero-width space, word joiner, BOM). Zero-width (non-)joiners stay: emoji and Persian need them.
UNSAFE_CHARACTERS = re.compile("[\x01-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
WS_MAX_FRAME_BYTES = 64 * 1024  # for uvicorn's --ws-max-size: no frame may be bigger than this
LIMIT_CONCURRENCY = 16_384  # for uvicorn's --limit-concurrency: past this many connections, HTTP gets 503
OUTBOX_LIMIT = 256  # frames queued for one websocket before it counts as too slow
# Messages in one write to a socket (stored together, they go out together): a larger write would
# only add to what a socket that has stopped reading holds unsent before it counts as too slow.
BUNDLE_LIMIT = 64
CLOSE_TOO_SLOW = 1013  # "try again later": reconnect with ?after=<last id> to catch up
CLOSE_TOKEN_EXPIRED = 4001  # refresh the access token, then reconnect with ?after=<last id>
CLOSE_TOO_MANY = 4429  # past MESSAGE_LIMIT or MAX_SOCKETS_PER_USER: wait, then reconnect
REPLAY_LIMIT = 10_000  # messages one after= replay sends; past it: 1013, then page with GET /auth/messages
REPLAY_SEND_SECONDS = 10  # a replaying client that takes longer than this for one frame is too slow
CLOSE_SECONDS = 10  # a websocket being closed gets this long to take what is queued and the close
CLOSE_REASONS = {
    CLOSE_TOO_SLOW: "Too far behind: reconnect with after=<last id>",
    CLOSE_TOKEN_EXPIRED: "Token expired",
    CLOSE_TOO_MANY: "Too many messages",
}
BROADCAST_CHANNEL = os.environ.get("BROADCAST_CHANNEL", "").strip() or "chat:messages"

METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "").strip()
METRICS_ON = os.environ.get("METRICS", "on").strip().lower() not in ("0", "off")  # off: for the bench


# ---------------------------------------------------------------- logs and metrics


log_times = {}  # kind -> [when last logged, how many left out since]


def log_now_and_then(kind, level, message, *args):
    """Log at most one line a minute of this kind, saying how many were left out: an attacker
    must not be able to flood the log."""
    last = log_times.setdefault(kind, [-math.inf, 0])
    if time.monotonic() - last[0] < 60:
        last[1] += 1
        return
    if last[1]:
        message += f" (and {last[1]} more like it in the last minute)"
    log.log(level, message, *args)
    log_times[kind] = [time.monotonic(), 0]


def no_traceback_for_bad_text(record):
    """Logging filter: uvicorn logs a text frame that is not UTF-8 (which it closes with 1007)
    as an error with a traceback, one per frame a client sends; it gets a line now and then."""
    if record.msg == "Invalid UTF-8 sequence received from client.":
        log_now_and_then("utf-8", logging.WARNING, "closed a websocket with 1007: a text frame was not UTF-8")
        return False
    return True


logging.getLogger("uvicorn.error").addFilter(no_traceback_for_bad_text)


def metrics_directory():
    """Where the processes of `uvicorn --workers N` pool their metrics (prometheus_client's
    multiprocess mode): PROMETHEUS_MULTIPROC_DIR if set, else a private folder per uvicorn
    supervisor, cleaned of dead processes at start-up; None for a single process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if multiprocessing.parent_process() is None:
        return None
    folder = Path(tempfile.gettempdir()) / f"chat-metrics-{os.getuid()}-{os.getppid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():
        config_error(f"PROMETHEUS_MULTIPROC_DIR is not set and {folder} is not this user's own folder")
    for stale in folder.glob("gauge_*.db"):  # live gauges of workers that are gone
        pid = int(stale.stem.rpartition("_")[2])
        if not Path(f"/proc/{pid}").exists():
            prometheus_client.multiprocess.mark_process_dead(pid, str(folder))
    return folder


METRICS_DIRECTORY = metrics_directory() if METRICS_ON else None
if METRICS_DIRECTORY is not None:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIRECTORY)
    prometheus_client.values.ValueClass = prometheus_client.values.MultiProcessValue()


def metric(kind, name, description, *args, **kwargs):
    return kind(name, description, *args, **kwargs) if METRICS_ON else NO_METRIC


class NoMetric:
    """METRICS=off: every metric call does nothing."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


NO_METRIC = NoMetric()
Counter, Gauge, Histogram = prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram
WEBSOCKETS_OPEN = metric(Gauge, "chat_websockets_open", "Open chat websockets", multiprocess_mode="livesum")
MESSAGES_STORED = metric(Counter, "chat_messages_stored_total", "Messages stored")
STORE_BATCHES = metric(Counter, "chat_store_batches_total", "INSERTs that stored messages (group commit)")
FRAMES_DELIVERED = metric(Counter, "chat_frames_delivered_total", "Message and presence frames queued for local websockets")
CLOSED_TOO_SLOW = metric(Counter, "chat_clients_closed_too_slow_total", "Websockets closed with 1013 as too far behind")
LIMIT_REFUSALS = metric(Counter, "chat_limit_refusals_total", "Refusals past a limit against abuse", ["kind"])
LOGINS = metric(Counter, "chat_logins_total", "Login attempts by result", ["result"])
HTTP_DURATION = metric(Histogram, "chat_http_request_duration_seconds", "HTTP request duration",
                       ["method", "route", "status"])
DELIVERY_DELAY = metric(Histogram, "chat_delivery_delay_seconds",
                        "From a message's storage to its queueing on every local websocket",
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


# ---------------------------------------------------------------- SQL access

def new_database():
    if USES_SQLITE:  # Python's sqlite3 waits this long for a lock (its busy timeout) instead of failing at once
        return databases.Database(DATABASE_URL, timeout=5.0)
    return databases.Database(DATABASE_URL, reset=keep_session)


async def keep_session(connection):
    """asyncpg's pool would send RESET ALL, UNLISTEN * and the like each time a connection goes
    back (a round trip per query): chat keeps no state in a session, its advisory locks are per
    transaction, and the pool still rolls back a transaction left open."""


database = new_database()

# schema.sql is written for SQLite; this is the one phrase PostgreSQL spells differently.
POSTGRES_SPELLINGS = {"INTEGER PRIMARY KEY AUTOINCREMENT": "BIGSERIAL PRIMARY KEY"}


def schema_statements(path):
    """The statements of a SQL file of ours (schema.sql, or a migration), in this database's spelling."""
    text = path.read_text()
    text = "\n".join(line.split("--")[0] for line in text.splitlines())
    if not USES_SQLITE:
        for sqlite_phrase, postgres_phrase in POSTGRES_SPELLINGS.items():
            text = text.replace(sqlite_phrase, postgres_phrase)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


SCHEMA_LOCK = 4_711_001  # any number: the PostgreSQL advisory lock held while applying the schema

# Upgrades of a database made by an earlier release: migrations/NNN_*.sql, applied in order, each
# once. Version 1 is the first release's schema, which had no schema_version table.
MIGRATIONS = {int(path.name[:3]): path for path in sorted((HERE / "migrations").glob("[0-9][0-9][0-9]_*.sql"))}
SCHEMA_VERSION = max(MIGRATIONS, default=1)  # the version schema.sql makes


def db():
    """What runs queries: on SQLite the service's one long-lived connection, because `databases`
    otherwise opens a new aiosqlite connection (a thread and the file) for every query and
    closes it afterwards (a WAL checkpoint when it was the last one)."""
    return service.get("sqlite") or database


# A name's look-alike skeleton. I, l and 1 look alike, and so do O and 0; names are also one
# regardless of case, so i joins I: `AIice`, `al1ce` and `Alice` are one name, and `b0b` and
# `bob` another. Registration refuses a name whose skeleton is taken.
NAME_SKELETON = "replace(replace(replace(lower(username), 'i', 'l'), '1', 'l'), '0', 'o')"


def name_skeleton(username):
    return username.lower().replace("i", "l").replace("1", "l").replace("0", "o")


async def index_name_skeletons(connection):
    """The unique index that makes look-alike names impossible even between concurrent
    registrations; a database that already holds look-alikes keeps them, and a warning says so."""
    if await exists(connection, "index", "users_name_skeleton"):
        return
    clash = await connection.fetch_val(
        f"SELECT {NAME_SKELETON} FROM users GROUP BY {NAME_SKELETON} HAVING count(*) > 1 LIMIT 1"
    )
    if clash is not None:
        log.warning("users already holds look-alike names (e.g. skeleton %r): their index is not created", clash)
        return
    await connection.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS users_name_skeleton ON users ({NAME_SKELETON})")


async def exists(connection, kind, name):
    """Whether the database has a table or an index (`kind`) of this name."""
    if USES_SQLITE:
        query = "SELECT 1 FROM sqlite_master WHERE type = :kind AND name = :name"
    else:
        query = """SELECT 1 FROM pg_class JOIN pg_namespace ON pg_namespace.oid = relnamespace
                   WHERE nspname = current_schema() AND relname = :name
                   AND relkind = CASE :kind WHEN 'table' THEN 'r' ELSE 'i' END"""
    return await connection.fetch_val(query, {"kind": kind, "name": name}) is not None


async def stored_schema_version(connection):
    """The database's schema version: 0 for an empty database, 1 for the first release's."""
    if await exists(connection, "table", "schema_version"):
        return await connection.fetch_val("SELECT max(version) FROM schema_version")
    return 1 if await exists(connection, "table", "users") else 0


async def upgrade_schema(connection):
    """Make an empty database, or bring an older one up to SCHEMA_VERSION. The caller holds a
    transaction, so a step that fails leaves the database as it was."""
    version = await stored_schema_version(connection)
    if version > SCHEMA_VERSION:
        raise StartUpError(f"the database's schema is version {version}, newer than this chat.py's {SCHEMA_VERSION}")
    steps = [HERE / "schema.sql"] if version == 0 else [MIGRATIONS[n] for n in sorted(MIGRATIONS) if n > version]
    for path in steps:
        try:
            for statement in schema_statements(path):
                await connection.execute(statement)
        except Exception as error:
            raise StartUpError(f"upgrading the database with {path.name} failed, so it is left as it was: {error}")
    if steps:
        await connection.execute("DELETE FROM schema_version")
        await connection.execute("INSERT INTO schema_version (version) VALUES (:version)", {"version": SCHEMA_VERSION})
        if version:
            log.warning("upgraded the database's schema from version %s to %s", version, SCHEMA_VERSION)
    await index_name_skeletons(connection)


async def apply_schema():
    if USES_SQLITE:
        await db().execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
        # IMMEDIATE takes the write lock first: processes starting together take turns, where two
        # plain transactions that read the version and then write would fail each other.
        await db().execute("BEGIN IMMEDIATE")
        try:
            await upgrade_schema(db())
        except BaseException:
            await db().execute("ROLLBACK")
            raise
        await db().execute("COMMIT")
        return
    # Processes starting together (uvicorn --workers 4) take turns: the first upgrades, the
    # others then find the database up to date.
    async with database.connection() as connection, connection.transaction():
        await connection.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        await upgrade_schema(connection)


async def find_user(username):
    return await db().fetch_one(
        "SELECT username, password FROM users WHERE lower(username) = lower(:username)",
        {"username": username},
    )


async def names_like(username):
    """The registered names that are `username` or look like it."""
    rows = await db().fetch_all(
        f"SELECT username FROM users WHERE {NAME_SKELETON} = :skeleton", {"skeleton": name_skeleton(username)}
    )
    return [row["username"] for row in rows]


def iso_utc(timestamp):
    """A unix time as messages record it: "2026-11-25T21:04:05.123Z"."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# A batch of messages is one parameter, a JSON array of [username, text] pairs, so that the
# statement is the same whatever the batch's size: `databases` compiles every query through
# SQLAlchemy, and a VALUES list with a parameter per field cost a tenth of the ingest CPU.
INSERT_MESSAGES = """
    INSERT INTO messages (username, text, created_at)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), CAST(:created_at AS TEXT)
    FROM json_each(:rows) ORDER BY key RETURNING id"""
if not USES_SQLITE:
    INSERT_MESSAGES = """
        INSERT INTO messages (username, text, created_at)
        SELECT value ->> 0, value ->> 1, CAST(:created_at AS TEXT)
        FROM json_array_elements(CAST(:rows AS json)) WITH ORDINALITY ORDER BY ordinality RETURNING id"""

# When processes share PostgreSQL and Redis, each INSERT first takes one advisory lock for them
# all, held until it is committed, so that a batch is committed before the next one, of any
# process, gets its ids. Without it one process's higher ids could be committed, and replayed
# with after=, before another's lower ones, which that replay would then skip. The INSERT is a
# transaction of its own: the lock is held for the INSERT and its commit, no round trip more.
# (Publishing comes after it: relays put batches that arrive out of order back in order.)
PUBLISH_LOCK = 4_711_002
INSERT_MESSAGES_IN_TURN = f"""
    WITH turn AS (SELECT pg_advisory_xact_lock({PUBLISH_LOCK}))
    INSERT INTO messages (username, text, created_at)
    SELECT value ->> 0, value ->> 1, CAST(:created_at AS TEXT)
    FROM json_array_elements(CAST(:rows AS json)) WITH ORDINALITY CROSS JOIN turn ORDER BY ordinality RETURNING id"""


# Storing a batch on PostgreSQL that takes longer fails (its websockets get 1011) rather than
# holding every message behind it for as long as the server does not answer. (SQLite gives up
# on a lock after its busy timeout, 5 s; its statements run in a thread that a timeout here
# would not stop.)
DATABASE_SECONDS = 10


async def insert_messages(messages, created_at):
    """Store (username, text) pairs in one statement; returns their ids, in the pairs' order."""
    rows = json.dumps(messages, ensure_ascii=False)
    in_turn = not USES_SQLITE and "redis" in service
    storing = db().fetch_all(INSERT_MESSAGES_IN_TURN if in_turn else INSERT_MESSAGES,
                             {"rows": rows, "created_at": created_at})
    found = await (storing if USES_SQLITE else asyncio.wait_for(storing, DATABASE_SECONDS))
    # The rows get ascending ids in the order they are inserted; RETURNING itself promises no order.
    return sorted(row["id"] for row in found)


LATEST_MESSAGES = """
    SELECT id, username, text, created_at FROM (
        SELECT id, username, text, created_at FROM messages WHERE id < :before ORDER BY id DESC LIMIT :limit
    ) AS latest ORDER BY id"""
MESSAGES_AFTER = """
    SELECT id, username, text, created_at FROM messages
    WHERE id > :after AND id < :before ORDER BY id LIMIT :limit"""
NO_ID_LIMIT = 2**62


async def fetch_messages(limit, before=None, after=None):
    """Messages in ascending id order: the page just after `after`, else the latest before `before`."""
    values = {"limit": limit, "before": NO_ID_LIMIT if before is None else before}
    if after is None:
        rows = await db().fetch_all(LATEST_MESSAGES, values)
    else:
        rows = await db().fetch_all(MESSAGES_AFTER, {**values, "after": after})
    return [message_fields(row["id"], row["username"], row["text"], row["created_at"]) for row in rows]


def message_fields(id, username, text, created_at):
    """A message as history items and format=json frames show it."""
    return {"id": id, "username": username, "text": text, "created_at": created_at, "type": "message"}


# ---------------------------------------------------------------- passwords and tokens

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,20}")

# Hashing runs in these threads, never on the event loop; a login storm queues here
# instead of taking every core from the websockets.
bcrypt_threads = concurrent.futures.ThreadPoolExecutor(
    max_workers=max(1, (os.cpu_count() or 2) // 2), thread_name_prefix="bcrypt"
)


BCRYPT_QUEUE_LIMIT = 64  # hashes waiting for a thread; past it, a login or registration gets 503
bcrypt_waiting = 0


async def in_bcrypt_thread(function, *args):
    """Run a hash in the bcrypt threads; a queue that long means a flood (made-up names from
    many addresses, say): refuse at once rather than keep everyone waiting for minutes."""
    global bcrypt_waiting
    if bcrypt_waiting >= BCRYPT_QUEUE_LIMIT:
        refused("bcrypt", ["queue full"])
        raise HTTPException(503, "The server is busy; try again in a moment", headers={"Retry-After": "1"})
    bcrypt_waiting += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(bcrypt_threads, function, *args)
    finally:
        bcrypt_waiting -= 1


def hash_password(password):
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def password_matches(password, password_hash):
    return bcrypt.checkpw(password.encode(), password_hash.encode())


# Checked when the user does not exist, so that an unknown name costs as long as a wrong password.
DUMMY_PASSWORD_HASH = hash_password(secrets.token_urlsafe(16))


async def check_password(username, password):
    """The user's row if the password is theirs, else None, in about the same time either way."""
    # A name registration refuses cannot exist: don't look it up (PostgreSQL rejects a NUL in
    # any text), but still check a hash below, so that it costs as long as a wrong password.
    user = await find_user(username) if USERNAME_PATTERN.fullmatch(username) else None
    usable = len(password.encode()) <= 72 and "\x00" not in password  # no account can have such a one
    matches = await in_bcrypt_thread(
        password_matches, password if usable else "", user["password"] if user else DUMMY_PASSWORD_HASH
    )
    return user if user and usable and matches else None


def make_token(username, token_type, lifetime_seconds, jti=None):
    now = int(time.time())
    claims = {"sub": username, "type": token_type, "iat": now, "exp": now + lifetime_seconds}
    if jti:
        claims["jti"] = jti
    return jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM)


def decode_token(token, token_type, verify_exp=True):
    """The token's claims if it is a well-formed, signed token of this type; otherwise None."""
    if not isinstance(token, str):
        return None
    try:
        claims = jwt.decode(
            token,
            SECRET_KEY,
            algorithms=[ALGORITHM],
            leeway=10,  # seconds of clock skew between machines
            options={"require": ["sub", "exp", "iat", "type"], "verify_exp": verify_exp},
        )
    except jwt.InvalidTokenError:
        return None
    if claims["type"] != token_type or not isinstance(claims["sub"], str):
        return None
    if token_type == "refresh" and not isinstance(claims.get("jti"), str):
        return None
    return claims


async def issue_tokens(username):
    """A new access token and a new single-use refresh token, recorded in refresh_tokens."""
    lifetime = REFRESH_TOKEN_EXPIRE_DAYS * 86400
    jti = secrets.token_urlsafe(16)
    refresh_token = make_token(username, "refresh", lifetime, jti)
    await db().execute(
        "INSERT INTO refresh_tokens (jti, username, expires_at) VALUES (:jti, :username, :expires_at)",
        {"jti": jti, "username": username, "expires_at": int(time.time()) + lifetime},
    )
    return {
        "access_token": make_token(username, "access", ACCESS_TOKEN_EXPIRE_MINUTES * 60),
        "refresh_token": refresh_token,
        "token_type": "bearer",
    }


# Presenting a refresh token again within this many seconds of its exchange is a plain 401 that
# revokes nothing: two tabs or a retrying client racing with one token are not a thief.
REFRESH_REUSE_GRACE_SECONDS = 5
LOGGED_OUT = 1  # refresh_tokens.used: 0 unused, 1 revoked by logout, else the unix time of its exchange


async def revoke_refresh_tokens(username):
    await db().execute("DELETE FROM refresh_tokens WHERE username = :username", {"username": username})


async def forget_expired_refresh_tokens():
    await db().execute(
        "DELETE FROM refresh_tokens WHERE expires_at < :now", {"now": int(time.time())}
    )


def bearer_token(request):
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def bearer_user(request):
    """The username of a valid access token in the Authorization header, or a 401."""
    token = bearer_token(request)
    claims = decode_token(token, "access") if token is not None else None
    if claims is None:
        raise HTTPException(401, "Invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
    return claims["sub"]


# ---------------------------------------------------------------- limits against abuse

# Sliding-window counters from the `limits` library: O(1) per key, and close to a true moving
# window (the previous window's count is weighted by how much of it is still in view).
REDIS_LIMITS_RETRY_SECONDS = 5  # while Redis is away, count in memory and try it again after this


def new_limiters():
    """The limiters of one event loop: in memory, and in Redis when BROADCAST_URL is set, so that
    N processes allow what one does."""
    limiters = {"memory": limits.aio.strategies.SlidingWindowCounterRateLimiter(limits.aio.storage.MemoryStorage())}
    if BROADCAST_URL:
        storage = limits.aio.storage.RedisStorage(
            "async+" + BROADCAST_URL, implementation="redispy", key_prefix=f"chat-limits:{BROADCAST_CHANNEL}",
            socket_connect_timeout=1, socket_timeout=1,
        )
        limiters["redis"] = limits.aio.strategies.SlidingWindowCounterRateLimiter(storage)
    return limiters


async def count(use):
    """`use(limiter)` in Redis when there is one, else (and while Redis is away) in this process."""
    limiters = service["limiters"]
    if "redis" in limiters and time.monotonic() >= service.get("redis_limits_retry_at", 0):
        try:
            return await asyncio.wait_for(use(limiters["redis"]), 2)
        except Exception as error:
            log.warning("rate limits: Redis is not answering (%s); counting in this process meanwhile", error)
            service["redis_limits_retry_at"] = time.monotonic() + REDIS_LIMITS_RETRY_SECONDS
    return await use(limiters["memory"])


async def too_many_attempts(item, *keys):
    """A 429 that says when the window for these keys lets one through again."""
    stats = await count(lambda limiter: limiter.get_window_stats(item, *keys))
    seconds = max(1, math.ceil(stats.reset_time - time.time()))
    return HTTPException(
        429, f"Too many attempts; try again in {seconds} seconds", headers={"Retry-After": str(seconds)}
    )


async def take_attempt(item, *keys):
    """Count one attempt against `item`, or raise a 429 (which counts nothing) when none is left."""
    if item and not await count(lambda limiter: limiter.hit(item, *keys)):
        refused(keys[0], keys[1:])
        raise await too_many_attempts(item, *keys)


class TooManyMessages(Exception):
    """A message past MESSAGE_LIMIT: it is neither stored nor sent, and its socket gets 4429."""


async def within_message_limit(batch):
    """The messages of a batch of (username, text, future) that MESSAGE_LIMIT lets through, in
    order; the future of each one past it gets TooManyMessages."""
    by_user = {}
    for username, _, stored in batch:
        by_user.setdefault(username, []).append(stored)
    past = set()
    for futures in await asyncio.gather(*(past_message_limit(*user) for user in by_user.items())):
        past.update(futures)
    for stored in past:
        stored.set_exception(TooManyMessages())
    return [item for item in batch if item[2] not in past] if past else batch


async def past_message_limit(username, futures):
    """Of a user's messages in a batch (their futures, in order), those past MESSAGE_LIMIT. They are
    counted with one call (one per message cost more than the rest of a message's handling); only
    when they do not all fit, one by one."""
    if await count(lambda limiter: limiter.hit(MESSAGE_LIMIT, "message", username, cost=len(futures))):
        return []
    for n in range(len(futures)):
        if not await count(lambda limiter: limiter.hit(MESSAGE_LIMIT, "message", username)):
            refused("message", [username])
            return futures[n:]
    return []


def refused(kind, who):
    """Count, and now and then log, a refusal past a limit."""
    LIMIT_REFUSALS.labels(kind).inc()
    log_now_and_then(f"limit {kind}", logging.WARNING, "refused past the %s limit: %s", kind, " ".join(map(str, who)))


def client_address(request):
    """The peer's address; uvicorn --proxy-headers puts a trusted proxy's forwarded one here."""
    return request.client.host if request.client else "unknown"


# One login at a time per (name, address) pair in a process, so that a burst of concurrent
# guesses cannot all pass the limit before the first failure is counted.
login_locks = weakref.WeakValueDictionary()


@contextlib.asynccontextmanager
async def login_attempt(username, address):
    """Refuse with a 429 when the pair has no failed login left; yields a function that counts a failure."""
    pair = ("login", username.lower() if USERNAME_PATTERN.fullmatch(username) else "*", address)
    async with login_locks.setdefault(pair, asyncio.Lock()):
        if LOGIN_LIMIT and not await count(lambda limiter: limiter.test(LOGIN_LIMIT, *pair)):
            refused("login", pair[1:])
            LOGINS.labels("limited").inc()
            raise await too_many_attempts(LOGIN_LIMIT, *pair)

        async def count_failure():
            if LOGIN_LIMIT:
                await count(lambda limiter: limiter.hit(LOGIN_LIMIT, *pair))

        yield count_failure


# ---------------------------------------------------------------- HTTP routes

async def read_fields(request, *names):
    """The named string fields of a JSON object body, or a 400 that says what is wrong."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise HTTPException(400, "Request body must be valid JSON")
    if not isinstance(body, dict):
        raise HTTPException(400, "Request body must be a JSON object")
    for name in names:
        if name not in body:
            raise HTTPException(400, f"Field '{name}' is required")
        if not isinstance(body[name], str):
            raise HTTPException(400, f"Field '{name}' must be a string")
        try:
            body[name].encode()
        except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"), which is no text at all
            raise HTTPException(400, f"Field '{name}' must be valid Unicode text")
    return [body[name] for name in names]


def check_new_account(username, password):
    if not USERNAME_PATTERN.fullmatch(username):
        raise HTTPException(
            400, "Username must be 1 to 20 characters, each a letter, digit, '_', '.' or '-'"
        )
    if len(password) < 8:
        raise HTTPException(400, "Password must be at least 8 characters")
    if len(password.encode()) > 72:
        raise HTTPException(400, "Password must be at most 72 bytes in UTF-8 (bcrypt's limit)")
    if "\x00" in password:  # bcrypt stops at NUL: "abcdefgh\0xyz" would match "abcdefgh"
        raise HTTPException(400, "Password must not contain a NUL character")


async def register(request):
    """
    summary: Create an account.
    requestBody: {required: true, content: {application/json: {schema: {$ref: '#/components/schemas/Credentials'}}}}
    responses:
      200: {description: Registered, content: {application/json: {schema: {$ref: '#/components/schemas/Message'}}}}
      400: {$ref: '#/components/responses/Error'}
      413: {$ref: '#/components/responses/Error'}
      429: {$ref: '#/components/responses/Error'}
    """
    await take_attempt(REGISTER_LIMIT, "register", client_address(request))
    username, password = await read_fields(request, "username", "password")
    check_new_account(username, password)
    await refuse_taken_name(username)
    password_hash = await in_bcrypt_thread(hash_password, password)
    try:
        await db().execute(
            "INSERT INTO users (username, password) VALUES (:username, :password)",
            {"username": username, "password": password_hash},
        )
    except Exception:
        await refuse_taken_name(username)  # a concurrent registration won
        raise
    return JSONResponse({"message": "Registration successful"})


async def refuse_taken_name(username):
    taken = await names_like(username)
    if any(name.lower() == username.lower() for name in taken):
        raise HTTPException(400, "Username already exists")
    if taken:
        raise HTTPException(400, "Username is too like an existing one (I, i, l and 1 look alike, and so do O and 0)")


async def login(request):
    """
    summary: Exchange a username and password for an access and a refresh token.
    requestBody: {required: true, content: {application/json: {schema: {$ref: '#/components/schemas/Credentials'}}}}
    responses:
      200: {description: Logged in, content: {application/json: {schema: {$ref: '#/components/schemas/Tokens'}}}}
      400: {$ref: '#/components/responses/Error'}
      401: {$ref: '#/components/responses/Error'}
      413: {$ref: '#/components/responses/Error'}
      429: {$ref: '#/components/responses/Error'}
    """
    username, password = await read_fields(request, "username", "password")
    async with login_attempt(username, client_address(request)) as count_failure:
        user = await check_password(username, password)
        if user is None:
            await count_failure()
            LOGINS.labels("failure").inc()
            raise HTTPException(401, "Invalid username or password")
    LOGINS.labels("success").inc()
    await forget_expired_refresh_tokens()
    return JSONResponse(await issue_tokens(user["username"]))


async def refresh(request):
    """
    summary: Exchange a refresh token, once, for a new token pair.
    requestBody: {required: true, content: {application/json: {schema: {$ref: '#/components/schemas/RefreshRequest'}}}}
    responses:
      200: {description: New tokens, content: {application/json: {schema: {$ref: '#/components/schemas/Tokens'}}}}
      400: {$ref: '#/components/responses/Error'}
      401: {$ref: '#/components/responses/Error'}
      413: {$ref: '#/components/responses/Error'}
    """
    (token,) = await read_fields(request, "refresh_token")
    claims = decode_token(token, "refresh")
    invalid = HTTPException(401, "Invalid refresh token", headers={"WWW-Authenticate": "Bearer"})
    if claims is None:
        raise invalid
    # One atomic update: of two concurrent refreshes with one token, exactly one gets the row.
    now = int(time.time())
    owner = await db().fetch_val(
        "UPDATE refresh_tokens SET used = :now WHERE jti = :jti AND used = 0 RETURNING username",
        {"jti": claims["jti"], "now": now},
    )
    if owner is None:
        row = await db().fetch_one("SELECT username, used FROM refresh_tokens WHERE jti = :jti", {"jti": claims["jti"]})
        if row is not None and now - row["used"] >= REFRESH_REUSE_GRACE_SECONDS:
            # A used or logged-out token shown again: someone holds a stolen copy.
            log.warning("refresh token reused for %r: revoking all of its refresh tokens", row["username"])
            await revoke_refresh_tokens(row["username"])
        raise invalid
    return JSONResponse(await issue_tokens(owner))


async def logout(request):
    """
    summary: Revoke a refresh token. Logging out twice is fine.
    requestBody: {required: true, content: {application/json: {schema: {$ref: '#/components/schemas/RefreshRequest'}}}}
    responses:
      200: {description: Logged out, content: {application/json: {schema: {$ref: '#/components/schemas/Message'}}}}
      400: {$ref: '#/components/responses/Error'}
      401: {$ref: '#/components/responses/Error'}
      413: {$ref: '#/components/responses/Error'}
    """
    (token,) = await read_fields(request, "refresh_token")
    claims = decode_token(token, "refresh", verify_exp=False)
    if claims is None:
        raise HTTPException(401, "Invalid refresh token", headers={"WWW-Authenticate": "Bearer"})
    # The row stays, marked, so that showing this token again later counts as reuse (theft).
    revoked = await db().fetch_val(
        "UPDATE refresh_tokens SET used = :logged_out WHERE jti = :jti AND used = 0 RETURNING username",
        {"jti": claims["jti"], "logged_out": LOGGED_OUT},
    )
    if revoked is None:
        # Logging out with a token already exchanged ends all of that user's sessions' tokens
        # (RFC 9700 4.14): its successors may be in a thief's hands.
        exchanged_by = await db().fetch_val(
            "SELECT username FROM refresh_tokens WHERE jti = :jti AND used > :logged_out",
            {"jti": claims["jti"], "logged_out": LOGGED_OUT},
        )
        if exchanged_by is not None:
            await revoke_refresh_tokens(exchanged_by)
    return JSONResponse({"message": "Logged out"})


def whole_number(raw, minimum=0, maximum=NO_ID_LIMIT):
    """`raw` as an int if it is plain digits within the bounds (no sign, space or '_'), else None."""
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not minimum <= int(raw) <= maximum:
        return None
    return int(raw)


def id_param(request, name, default=None, minimum=0, maximum=NO_ID_LIMIT):
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = whole_number(raw, minimum, maximum)
    if value is None:
        raise HTTPException(400, f"Query parameter '{name}' must be a whole number from {minimum} to {maximum}")
    return value


async def list_messages(request):
    """
    summary: Message history, ascending by id. No parameters give the latest `limit` messages.
    parameters:
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000, default: 100}}
      - {name: before, in: query, description: only messages older than this id, schema: {type: integer, minimum: 0}}
      - {name: after, in: query, description: only messages newer than this id, schema: {type: integer, minimum: 0}}
    security: [{bearer: []}]
    responses:
      200: {description: Messages, content: {application/json: {schema: {type: array, items: {$ref: '#/components/schemas/ChatMessage'}}}}}
      400: {$ref: '#/components/responses/Error'}
      401: {$ref: '#/components/responses/Error'}
    """
    bearer_user(request)
    limit = id_param(request, "limit", default=100, minimum=1, maximum=1000)
    before = id_param(request, "before")
    after = id_param(request, "after")
    return JSONResponse(await fetch_messages(limit, before=before, after=after))


async def health(request):
    """
    summary: 200 when the database answers, 503 otherwise.
    responses:
      200: {description: Healthy, content: {application/json: {schema: {type: object, properties: {status: {type: string}}}}}}
      503: {$ref: '#/components/responses/Error'}
    """
    try:
        await asyncio.wait_for(db().fetch_val("SELECT 1"), timeout=5)
    except Exception as error:
        log_now_and_then("database", logging.ERROR, "the database is not answering: %s", error or type(error).__name__)
        return JSONResponse({"detail": "The database is not answering"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request):
    """
    summary: "Prometheus metrics in text format; with METRICS_TOKEN set, only for that bearer token."
    responses:
      200: {description: Metrics, content: {text/plain: {schema: {type: string}}}}
      401: {$ref: '#/components/responses/Error'}
    """
    token = bearer_token(request)
    if METRICS_TOKEN and not (token is not None and hmac.compare_digest(token.encode(), METRICS_TOKEN.encode())):
        raise HTTPException(401, "Metrics need the metrics token", headers={"WWW-Authenticate": "Bearer"})
    if not METRICS_ON:
        raise HTTPException(404, "Metrics are off (METRICS=off)")
    registry = prometheus_client.REGISTRY
    if METRICS_DIRECTORY is not None:  # the sum over every process of `uvicorn --workers N`
        registry = prometheus_client.CollectorRegistry()
        prometheus_client.multiprocess.MultiProcessCollector(registry, path=str(METRICS_DIRECTORY))
    return Response(prometheus_client.generate_latest(registry), media_type=prometheus_client.CONTENT_TYPE_LATEST)


def inline_hashes(page, tag):
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in blocks)


def page_headers(page):
    """The page may run only its own inline script and style (by hash), talk only to its own
    origin, and never be framed, sniffed, or named in a Referer."""
    policy = (
        f"default-src 'none'; script-src {inline_hashes(page, 'script')}; style-src {inline_hashes(page, 'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


PAGE = (HERE / "index.html").read_text()
PAGE_HEADERS = page_headers(PAGE)


async def web_client(request):
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


schemas = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "Chat", "version": "1.0.0"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Credentials": {
                    "type": "object",
                    "required": ["username", "password"],
                    "properties": {"username": {"type": "string"}, "password": {"type": "string"}},
                },
                "RefreshRequest": {
                    "type": "object",
                    "required": ["refresh_token"],
                    "properties": {"refresh_token": {"type": "string"}},
                },
                "Tokens": {
                    "type": "object",
                    "required": ["access_token", "refresh_token", "token_type"],
                    "properties": {
                        "access_token": {"type": "string"},
                        "refresh_token": {"type": "string"},
                        "token_type": {"type": "string", "enum": ["bearer"]},
                    },
                },
                "Message": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string"}},
                },
                "ChatMessage": {
                    "type": "object",
                    "required": ["id", "username", "text", "created_at", "type"],
                    "properties": {
                        "id": {"type": "integer"},
                        "username": {"type": "string"},
                        "text": {"type": "string"},
                        "created_at": {"type": "string", "nullable": True, "description": "UTC, ISO 8601 with ms and Z"},
                        "type": {"type": "string", "enum": ["message"]},
                    },
                },
                "Online": {
                    "type": "object",
                    "required": ["username", "connections"],
                    "properties": {"username": {"type": "string"}, "connections": {"type": "integer"}},
                },
            },
            "responses": {
                "Error": {
                    "description": "An error, explained in a sentence",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["detail"],
                                "properties": {"detail": {"type": "string"}},
                            }
                        }
                    },
                }
            },
        },
    }
)


async def openapi_schema(request):
    schema = schemas.get_schema(routes=routes)
    if request.scope.get("root_path"):  # mounted under a prefix: the paths are relative to it
        schema = {**schema, "servers": [{"url": request.scope["root_path"]}]}
    return JSONResponse(schema)


# ---------------------------------------------------------------- websocket registry and routes

@dataclasses.dataclass(slots=True, eq=False)
class Client:
    """One open chat websocket: how it wants its frames, and what waits to go to it."""

    websocket: WebSocket
    send: typing.Callable  # the socket's ASGI send
    write_frame: typing.Callable | None  # ChatWebSocketProtocol's shortcut, when served with it
    handler: asyncio.Task | None  # the task serving the socket, until its handler ends (see give_up)
    as_json: bool = False
    sent_through: int = 0  # its replay sent the messages up to this id
    # Frames (message or presence dicts, or an int: the close code to end with) waiting behind a
    # send in progress; None while nothing is in progress, when a frame goes out at once.
    backlog: collections.deque | None = dataclasses.field(default_factory=collections.deque)
    sending: asyncio.Task | None = None  # the task sending the backlog, while there is one
    gave_up: bool = False
    expires_at: float = math.inf  # when its access token expires (see close_expired_sockets)
    presence_from: int | None = None  # with presence=1: it gets the joins and leaves numbered above this
    abort: typing.Callable | None = None  # ChatWebSocketProtocol's: resets the connection (see give_up)


# Every open chat websocket of this process.
clients = {}
recent_ids = collections.deque(maxlen=10_000)  # delivered ids, so a message is never delivered twice
recent_id_set = set()


def text_frame(text):
    """A websocket.send message for `text`, with the frame that carries it serialized once (a
    server-to-client frame is the same for every client: not masked, no extension)."""
    frame = websockets.frames.Frame(websockets.frames.Opcode.TEXT, text.encode())
    return {"type": "websocket.send", "text": text, "chat.frame": frame.serialize(mask=False, extensions=[])}


def chat_message(fields, stored_at=None):
    """A stored message (its message_fields) with both of its wire forms rendered once, not once
    per client, and when it was stored as a number (for the delivery-delay histogram; read from
    created_at unless the caller, which just stored it, knows it)."""
    if stored_at is None and fields["created_at"]:
        stored_at = datetime.datetime.fromisoformat(fields["created_at"].replace("Z", "+00:00")).timestamp()
    return {**fields, "stored_at": stored_at, "send_line": text_frame(message_line(fields)),
            "send_json": text_frame(json.dumps(fields))}


def message_line(fields):
    """A message in the text format."""
    return f"{fields['username']}: {fields['text']}"


def deliver(messages):
    """Send stored messages (in id order) to every local websocket, those stored together in one
    write to each: a write is most of what a delivery costs. Never waits on any of them."""
    messages = [message for message in messages if message["id"] not in recent_id_set]
    if not messages:
        return
    for message in messages:
        if len(recent_ids) == recent_ids.maxlen:
            recent_id_set.discard(recent_ids[0])
        recent_ids.append(message["id"])
        recent_id_set.add(message["id"])
    rest = messages
    if pending_presence:  # joins and leaves go out with the first
        send_presence(messages[0])
        rest = messages[1:]
    targets = list(clients.values())
    for start in range(0, len(rest), BUNDLE_LIMIT):
        some = rest[start : start + BUNDLE_LIMIT]
        send_to(targets, some[0] if len(some) == 1 else frame_bundle(some))
    now = time.time()
    for message in messages:
        if message["stored_at"] is not None:
            DELIVERY_DELAY.observe(max(0.0, now - message["stored_at"]))


def send_to(targets, frame, presence=None):
    """Send a frame to each client at once, or queue it behind what the client has not taken
    yet; a client too far behind is closed instead. Clients that asked for presence get the
    bundle `presence` instead (joins and leaves, then the frame, if any: see send_presence)."""
    sent = 0
    for client in targets:
        item = frame
        if presence is not None and client.presence_from is not None:
            item = presence if client.presence_from < presence["first"] else presence_after(client, presence)
        if item is None:
            continue
        parts = item["items"] if item["type"] == "bundle" else (item,)
        if client.backlog is None:
            send_now(client, item)
        elif len(client.backlog) + len(parts) <= OUTBOX_LIMIT:
            client.backlog.extend(parts)
        else:
            close_client(client.websocket, CLOSE_TOO_SLOW)
            continue
        sent += len(parts)
    FRAMES_DELIVERED.inc(sent)


def send_now(client, item):
    """Send a frame without waiting. A send that has to wait, because the client is not reading
    fast enough, goes on in a task, and what comes next queues behind it. A close always goes in
    a task: with some servers it waits for the client's answer under a timeout that belongs to the
    task it runs in, which must not be the caller's (a sender's, or the expiry sweep)."""
    if isinstance(item, int):
        client.backlog = collections.deque((item,))
        client.sending = asyncio.ensure_future(send_backlog(client))
        return
    if item["type"] == "bundle":
        send_bundle(client, item)
        return
    if (message := message_for(client, item)) is None:
        return
    try:
        if client.write_frame is not None and client.write_frame(message["chat.frame"]):
            return
        rest = run_until_it_waits(client.send(message))
    except Exception as error:
        client_gone(client, error)
        return
    if rest is not None:
        client.backlog = collections.deque()
        client.sending = asyncio.ensure_future(send_backlog(client, rest))


def frame_bundle(items):
    """Frames to go out in one write: messages stored together, or joins and leaves then maybe a
    message (for format=json clients only: presence has no text format)."""
    ids = [item["id"] for item in items if item["type"] == "message"]
    return {"type": "bundle", "items": items, "first": items[0].get("number"), "first_id": ids[0] if ids else math.inf,
            "json": b"".join(item["send_json"]["chat.frame"] for item in items),
            "line": b"".join(item["send_line"]["chat.frame"] for item in items) if len(ids) == len(items) else None}


def send_bundle(client, bundle):
    """Send a bundle's frames in one write when it can go whole, else one by one."""
    try:
        if (client.write_frame is not None and bundle["first_id"] > client.sent_through
                and client.write_frame(bundle["json"] if client.as_json else bundle["line"])):
            return
    except Exception as error:
        client_gone(client, error)
        return
    for part in bundle["items"]:
        if client.backlog is None:
            send_now(client, part)
        else:
            client.backlog.append(part)


def message_for(client, item):
    """The websocket.send message for a frame to a client, or None when its replay sent it
    already. It goes straight to the socket's ASGI send, built once for every client (Starlette's
    send_text would build one per client, and check states that only a close changes)."""
    if item["type"] == "presence":
        return item["send_json"]
    if item["id"] > client.sent_through:
        return item["send_json"] if client.as_json else item["send_line"]
    return None


async def send_backlog(client, rest=None):
    """A client's writer while it is behind: finishes the send that had to wait, then sends what
    queued meanwhile, in order. Once the backlog is empty, frames go out at once again."""
    try:
        if rest is not None:
            await rest
        while client.backlog:
            item = client.backlog.popleft()
            if isinstance(item, int):
                await client.websocket.close(item, CLOSE_REASONS.get(item))
            elif (message := message_for(client, item)) is not None:
                await client.send(message)
    except Exception as error:
        client_gone(client, error)
    finally:
        client.backlog = None


def client_gone(client, error):
    """A send failed: the client left (its handler hears so and cleans up), or something is
    wrong, and the socket is let go at once."""
    clients.pop(client.websocket, None)
    if not isinstance(error, (WebSocketDisconnect, RuntimeError, OSError)):
        log_now_and_then("send", logging.ERROR, "could not send to a websocket: %r", error)
        give_up(client)


def run_until_it_waits(coroutine):
    """Run a coroutine until it first has to wait: None if it finished by then, else an awaitable
    for the rest. A send to a socket that takes it finishes at once, so a frame costs no task
    wake-up (what Python 3.12's eager tasks do)."""
    try:
        awaiting = coroutine.send(None)
    except StopIteration:
        return None
    return rest_of(coroutine, awaiting)


@types.coroutine
def rest_of(coroutine, awaiting):
    """Go on with a coroutine that run_until_it_waits() started, from what it was awaiting."""
    while True:
        try:
            yield awaiting
        except BaseException as error:  # cancelled, say: the coroutine decides what that means
            resume, value = coroutine.throw, error
        else:
            resume, value = coroutine.send, None
        try:
            awaiting = resume(value)
        except StopIteration as finished:
            return finished.value


def close_client(websocket, code):
    """Take a websocket out of the broadcast and close it once it has taken what is queued (a
    client closed as too slow gets no more frames: it catches up with after=)."""
    client = clients.pop(websocket, None)
    if client is None:
        return
    if code == CLOSE_TOO_SLOW:
        if client.backlog:
            client.backlog.clear()
        CLOSED_TOO_SLOW.inc()
        log_now_and_then("too slow", logging.INFO, "closed a websocket from %s as too far behind (1013)",
                         "%s:%s" % tuple(websocket.client or ("?", "?")))
    if client.backlog is None:
        send_now(client, code)
    else:
        client.backlog.append(code)
    # A send stuck on a client that stopped reading would never get to the close: let the
    # socket go after a while, so that its handler ends and its slot is free.
    asyncio.get_running_loop().call_later(CLOSE_SECONDS, give_up, client)


def give_up(client):
    """A client that has not taken its close CLOSE_SECONDS after it was asked for has stopped
    reading: its handler ends, and (served with ChatWebSocketProtocol) its connection is reset,
    since closing it would wait for ever for what is queued to be sent."""
    if client.sending is not None:
        client.sending.cancel()
    if client.handler is not None and not client.handler.done():
        client.gave_up = True
        client.handler.cancel()
    if client.abort is not None:
        client.abort()


# Derived from SECRET_KEY, so only processes that can sign tokens can publish on the channel.
CHANNEL_KEY = hmac.new(SECRET_KEY.encode(), b"chat broadcast channel", hashlib.sha256).digest()


def channel_signature(payload):
    return hmac.new(CHANNEL_KEY, payload, hashlib.sha256).hexdigest().encode()


def signed(payload):
    """What a process publishes: an HMAC of the message, a space, the message's JSON."""
    return channel_signature(payload.encode()) + b" " + payload.encode()


def verified_event(data):
    """A message, or a presence event, from a payload on the Redis channel if its signature
    holds, else None (with a warning at most once a minute: anyone who can publish there could
    flood the log)."""
    signature, _, payload = data.partition(b" ")
    if hmac.compare_digest(signature, channel_signature(payload)):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            fields = json.loads(payload)
            if fields["type"] == "presence":
                return presence_event(fields["username"], fields["online"])
            messages = [message_fields(m["id"], m["username"], m["text"], m["created_at"]) for m in fields["messages"]]
            return {"type": "messages", "messages": [chat_message(m) for m in messages]}
    log_now_and_then("forgery", logging.WARNING,
                     "dropped a message on the Redis channel %r that was not signed with this SECRET_KEY", BROADCAST_CHANNEL)
    return None


# Group commit: the messages that arrive while a batch is being written are stored together,
# in one INSERT, then handed on in id order (on PostgreSQL + Redis: one lock, one publish).
# A lone message is written at once.
STORE_BATCH = 250  # messages in one INSERT (3 parameters each; SQLite allows 32,766)


# A socket is read on while its messages wait to be stored, up to this many: waiting for each
# would let a client that sends fast store one message per INSERT.
UNSTORED_PER_SOCKET = 16


def store_soon(websocket, username, text, unstored):
    """Queue a message to be stored and handed on; returns a future done once it is stored.
    `unstored` holds the futures of the socket's earlier messages not stored yet."""
    stored = asyncio.get_running_loop().create_future()
    stored.add_done_callback(functools.partial(close_if_not_stored, websocket, username, unstored))
    service["to_store"].put_nowait((username, text, stored))
    return stored


def close_if_not_stored(websocket, username, unstored, stored):
    """A message that could not be stored closes its socket with 1011 (4429 when it was past
    MESSAGE_LIMIT), and the messages the socket sent after it are not stored either: the close
    means that one and nothing after it."""
    if not stored.cancelled() and (error := stored.exception()) is not None:
        for later in unstored:
            later.cancel()
        if isinstance(error, TooManyMessages):
            close_client(websocket, CLOSE_TOO_MANY)
            return
        log_now_and_then("store", logging.ERROR, "could not store a message from %r (its websocket gets 1011): %s",
                         username, error or type(error).__name__)
        close_client(websocket, 1011)


async def store_in_batches(to_store):
    """The one writer of messages: each round takes everything waiting, up to STORE_BATCH. With
    Redis, a batch is stored while the one before is being published, so that neither round
    trip leaves the process idle; the batches are still published in the order they were stored.
    A None in the queue (stop_writer) ends it once what came before is stored and published."""
    publishing = None
    stopping = False
    try:
        while not stopping:
            batch, stopping = await next_batch(to_store)
            if not batch:
                await asyncio.sleep(0)  # the refused ones' sockets cancel their later messages first
                continue
            try:
                stored_at, stored_fields = await store_batch([(username, text) for username, text, _ in batch])
            except Exception as error:
                for _, _, stored in batch:
                    if not stored.done():
                        stored.set_exception(error)
                await asyncio.sleep(0)  # their sockets' later messages are cancelled before the next batch
                continue
            for _, _, stored in batch:
                if not stored.done():
                    stored.set_result(None)
            if service.get("publisher") is None:
                deliver_here(stored_fields, stored_at)
            else:  # rendered by the relay, which hears them back
                if publishing is not None:
                    await asyncio.wait([publishing])
                publishing = asyncio.create_task(publish(stored_fields, stored_at))
        if publishing is not None:
            await publishing
    finally:
        if publishing is not None:
            publishing.cancel()


async def next_batch(to_store):
    """What waits to be stored, up to STORE_BATCH, without the messages of a socket whose earlier
    one failed (it cancelled them) and those past MESSAGE_LIMIT; and whether stop_writer() asked
    the writer to stop after these."""
    batch = [await to_store.get()]
    while len(batch) < STORE_BATCH and not to_store.empty() and batch[-1] is not None:
        batch.append(to_store.get_nowait())
    stopping = batch[-1] is None
    batch = [item for item in batch if item is not None and not item[2].cancelled()]
    if MESSAGE_LIMIT and batch:
        batch = await within_message_limit(batch)
    return batch, stopping


WRITER_STOP_SECONDS = 5


async def stop_writer():
    """At shutdown, once the websockets are closed: let the writer store (and publish) the
    messages it has read, for up to WRITER_STOP_SECONDS, instead of dropping them: a restart
    loses no message that reached the server."""
    writer = service.pop("writer", None)
    if writer is None:
        return
    service["to_store"].put_nowait(None)
    await asyncio.wait([writer], timeout=WRITER_STOP_SECONDS)
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer


async def store_batch(batch):
    """Store a batch of (username, text); returns when, and its messages' fields in id order."""
    stored_at = time.time()
    created_at = iso_utc(stored_at)
    ids = await insert_messages(batch, created_at)
    MESSAGES_STORED.inc(len(ids))
    STORE_BATCHES.inc()
    return stored_at, [message_fields(id, username, text, created_at) for id, (username, text) in zip(ids, batch)]


PUBLISH_RETRY_SECONDS = 5  # after a publish failed, deliver here without trying Redis for this long


async def publish(stored_fields, stored_at):
    """Hand a stored batch to every process's websockets (this one's included) through the
    channel; if Redis will not take it, deliver it here (the other processes fetch it). A Redis
    that did not answer is not waited on again for every batch, only after PUBLISH_RETRY_SECONDS."""
    if time.monotonic() < service.get("publish_retry_at", 0):
        deliver_here(stored_fields, stored_at)
        return
    payload = signed(json.dumps({"type": "messages", "messages": stored_fields}))
    try:
        try:
            await asyncio.wait_for(service["publisher"].publish(BROADCAST_CHANNEL, payload), 2)
        except redis.ConnectionError:  # a connection from before a Redis restart fails once
            await asyncio.wait_for(service["publisher"].publish(BROADCAST_CHANNEL, payload), 2)
    except Exception as error:  # Redis down, slow, or anything else: the messages are stored all the same
        log.warning("could not publish messages %s-%s to Redis (%s); delivering them here, "
                    "and the other processes fetch them; trying Redis again in %s s",
                    stored_fields[0]["id"], stored_fields[-1]["id"], error, PUBLISH_RETRY_SECONDS)
        service["publish_retry_at"] = time.monotonic() + PUBLISH_RETRY_SECONDS
        deliver_here(stored_fields, stored_at)


def deliver_here(stored_fields, stored_at):
    """Deliver a batch this process stored to its own websockets, without Redis."""
    deliver([chat_message(fields, stored_at) for fields in stored_fields])


GAP_CHECK_SECONDS = 2  # a relay that hears nothing for this long asks the database what it missed
# Processes publish after they commit, so the batches of two processes can reach Redis in the
# other order than their ids. A relay holds a batch heard after a gap in the ids for up to
# REORDER_SECONDS, for the missing one to come; only then does it ask the database.
REORDER_SECONDS = 0.05


async def relay_from_redis(redis_client, last_id, subscribed):
    """Deliver what every process publishes to this process's websockets, in id order, and
    what no one published: a gap in the ids that does not fill within REORDER_SECONDS, or a
    quiet spell, makes the relay fetch the missing messages from the database (a process that
    could not publish delivered them only to its own clients). deliver() skips what it has
    delivered already."""
    lost = False
    while True:
        try:
            async with redis_client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(BROADCAST_CHANNEL)
                subscribed.set()
                if lost:
                    log.warning("reconnected to Redis; delivering messages stored meanwhile")
                    lost = False
                last_id = await catch_up(last_id)
                held, held_until = [], 0  # batches heard after a gap, in id order
                while True:
                    wait = max(0, held_until - time.monotonic()) if held else GAP_CHECK_SECONDS
                    events = await heard_on(pubsub, wait)
                    for event in events:
                        if event is not None and event["type"] == "presence":
                            last_id = deliver_in_turn(held, last_id)  # what was heard before it goes first
                            deliver_presence(event)
                        elif event is not None:
                            if not held:
                                held_until = time.monotonic() + REORDER_SECONDS
                            held.append(event["messages"])
                            held.sort(key=lambda messages: messages[0]["id"])
                    last_id = deliver_in_turn(held, last_id)
                    if None in events or held and time.monotonic() >= held_until:
                        # A quiet spell, or a gap that did not fill: the database has what is missing
                        # (and what is held: a process publishes only what it has committed).
                        last_id = await catch_up(last_id, before=held[-1][-1]["id"] + 1 if held else None)
                        held.clear()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if not lost:
                log.warning("lost the connection to Redis (%s); retrying every second", error)
            lost = True
            await asyncio.sleep(1)


async def heard_on(pubsub, wait):
    """What the channel brings within `wait` seconds: the first event, and those that came with
    it (their messages go out together, in one write to each socket). None for a quiet spell or
    a payload that is not signed."""
    events = []
    item = await pubsub.get_message(timeout=wait)
    while item is not None and len(events) < STORE_BATCH:
        events.append(verified_event(item["data"]) if item["type"] == "message" else None)
        item = await pubsub.get_message(timeout=0)
    return events or [None]


def deliver_in_turn(held, last_id):
    """Deliver the held batches that come next in id order (older messages came already, or by
    a catch-up), all in one delivery; returns the last id delivered."""
    news = []
    while held and held[0][0]["id"] <= last_id + 1:
        for message in held.pop(0):
            if message["id"] > last_id:
                news.append(message)
                last_id = message["id"]
    if news:
        deliver(news)
    return last_id


async def catch_up(last_id, before=None):
    """Deliver the stored messages after `last_id` (and before `before`); returns the last id delivered."""
    while rows := await fetch_messages(1000, after=last_id, before=before):
        deliver([chat_message(row) for row in rows])
        last_id = rows[-1]["id"]
    return last_id


# ---------------------------------------------------------------- presence

# Open websockets per user in this process (for MAX_SOCKETS_PER_USER, and presence).
sockets_per_user = collections.Counter()
known_online = set()  # who this process last knew to be online anywhere

# A join or leave waits up to PRESENCE_DELAY seconds for a message, and goes out in the same
# write: a frame on its own costs a socket write per subscriber, as a message does, and on a
# busy server a second fan-out in the way of every message. Each is numbered, so that a socket
# gets only those that happened after it subscribed.
PRESENCE_DELAY = 0.1
pending_presence = []
presence_numbers = itertools.count(1)


def presence_event(username, online):
    fields = {"type": "presence", "username": username, "online": online}
    as_json = json.dumps(fields)
    return {**fields, "json": as_json, "send_json": text_frame(as_json)}


def subscribe_to_presence(client):
    client.presence_from = next(presence_numbers)


def deliver_presence(event):
    """Send a join or leave to every local websocket that asked for presence, with the next
    message or PRESENCE_DELAY from now, whichever comes first."""
    (known_online.add if event["online"] else known_online.discard)(event["username"])
    if "presence_changed" in service:  # a renewal is reconciling (with Redis): it must skip this user
        service["presence_changed"].add(event["username"])
    if not pending_presence:
        service["presence_timer"] = asyncio.get_running_loop().call_later(PRESENCE_DELAY, send_presence)
    pending_presence.append({**event, "number": next(presence_numbers)})


def send_presence(message=None):
    """Send the waiting joins and leaves, and `message` after them in the same write, to every
    local websocket that asked for presence (and `message` alone to the others). One pass over
    the clients, deciding as it sends: on a busy server the clients' objects are rarely in the
    CPU's caches, and a pass to sort them first cost each delivery 0.4-0.5 ms (500 clients)."""
    cancel_presence_timer()
    if not pending_presence:
        return
    bundle = frame_bundle(pending_presence + [message] if message else pending_presence[:])
    pending_presence.clear()
    send_to(list(clients.values()), message, bundle)


def presence_after(client, bundle):
    """For a socket that subscribed while a bundle's joins and leaves waited: what came after."""
    wanted = [item for item in bundle["items"] if item.get("number", math.inf) > client.presence_from]
    return frame_bundle(wanted) if wanted else None


def cancel_presence_timer():
    if (timer := service.pop("presence_timer", None)) is not None:
        timer.cancel()


# With Redis, each process keeps a hash of its users' socket counts, which expires unless the
# process renews it, and a set names those hashes. Setting a count, summing it over every
# process and publishing a join or leave happen in one script, so that of two processes whose
# users connect at once exactly one sees the first socket (a join), of two that disconnect one
# sees the last (a leave), and the joins and leaves reach the channel in the order they happened.
SET_PRESENCE = """
local before = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    before = before + tonumber(redis.call('HGET', key, ARGV[1]) or 0)
end
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or 0)
if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) else redis.call('HDEL', KEYS[2], ARGV[1]) end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[1], KEYS[2])
local after = before - old + tonumber(ARGV[2])
if before == 0 and after > 0 then redis.call('PUBLISH', KEYS[3], ARGV[4]) end
if before > 0 and after == 0 then redis.call('PUBLISH', KEYS[3], ARGV[5]) end
"""
REDIS_SECONDS = 2  # presence calls to Redis give up after this
ONLINE_EVERYWHERE = """
local counts = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local fields = redis.call('HGETALL', key)
    if #fields == 0 and redis.call('EXISTS', key) == 0 then redis.call('SREM', KEYS[1], key) end
    for i = 1, #fields, 2 do counts[fields[i]] = (counts[fields[i]] or 0) + tonumber(fields[i + 1]) end
end
local flat = {}
for username, count in pairs(counts) do table.insert(flat, username); table.insert(flat, count) end
return flat
"""
PRESENCE_PROCESSES = f"{BROADCAST_CHANNEL}:presence"  # the set of every process's hash
presence_in_redis = collections.Counter()  # what this process last set in its hash


def presence_key():
    """This process's hash (made per process at start-up: a server that forks after import must
    not give its workers one hash)."""
    return service.setdefault("presence_key", f"{PRESENCE_PROCESSES}:{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}")


def presence_changed(username, opened):
    """A socket of `username` opened (or closed) here. Without Redis, tell everyone at once if
    it was their first (or last); with Redis, update this process's count there, which tells
    everyone if it was their first or last anywhere."""
    if service.get("redis") is not None:
        in_background(share_presence(username, service["redis"]))
    elif sockets_per_user[username] == (1 if opened else 0):
        deliver_presence(presence_event(username, opened))


async def share_presence(username, redis_client):
    """Set this process's count of `username`'s sockets in Redis (the count when this runs:
    updates run one at a time, in order), and publish a join or leave if the total crossed zero."""
    try:
        async with service["presence_lock"]:  # one update at a time, in the order they happened
            count = sockets_per_user[username]
            join, leave = (signed(presence_event(username, online)["json"]) for online in (True, False))
            await asyncio.wait_for(redis_client.eval(
                SET_PRESENCE, 3, PRESENCE_PROCESSES, presence_key(), BROADCAST_CHANNEL, username, count,
                PRESENCE_EXPIRY_SECONDS, join, leave,
            ), REDIS_SECONDS)
    except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
        log_now_and_then("presence", logging.WARNING, "could not share presence through Redis (%s); telling this process only", error)
        count = sockets_per_user[username]
        if (count > 0) != (username in known_online):  # a first or last socket, as far as this process knows
            deliver_presence(presence_event(username, count > 0))
    # What this process's hash holds, or (Redis away) is to hold once a renewal rewrites it.
    presence_in_redis[username] = count
    if not count:
        del presence_in_redis[username]


def in_background(coroutine):
    """Run a coroutine without waiting for it (kept referenced until it is done)."""
    task = asyncio.get_running_loop().create_task(coroutine)
    service.setdefault("background", set()).add(task)
    task.add_done_callback(service["background"].discard)


async def online_counts():
    """{username: open websockets} over every process (this one's alone while Redis is away)."""
    redis_client = service.get("redis")
    if redis_client is not None:
        try:
            flat = await asyncio.wait_for(redis_client.eval(ONLINE_EVERYWHERE, 1, PRESENCE_PROCESSES), REDIS_SECONDS)
            return {name.decode(): int(count) for name, count in zip(flat[::2], flat[1::2])}
        except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
            log_now_and_then("presence", logging.WARNING, "could not read presence from Redis (%s); answering with this process's", error)
    return dict(sockets_per_user)


async def renew_presence(redis_client):
    """Keep this process's presence hash alive (rewritten whole, in case Redis restarted), and
    reconcile: users who vanished without a leave (their process died) get one, and the reverse."""
    while True:
        try:
            service["presence_changed"] = set()
            async with service["presence_lock"]:
                async with redis_client.pipeline(transaction=True) as pipe:
                    # What was announced, not the live counts: updates waiting for the lock would
                    # otherwise find their change made already, and announce nothing.
                    pipe.delete(presence_key())
                    if presence_in_redis:
                        pipe.hset(presence_key(), mapping=dict(presence_in_redis))
                    pipe.expire(presence_key(), PRESENCE_EXPIRY_SECONDS)
                    pipe.sadd(PRESENCE_PROCESSES, presence_key())
                    await asyncio.wait_for(pipe.execute(), REDIS_SECONDS)
            online = set(await online_counts())
            changed_meanwhile = service["presence_changed"]
            for username in (known_online - online) - changed_meanwhile:
                deliver_presence(presence_event(username, False))
            for username in (online - known_online) - changed_meanwhile:
                deliver_presence(presence_event(username, True))
        except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
            log.debug("could not renew presence in Redis: %s", error)
        await asyncio.sleep(PRESENCE_EXPIRY_SECONDS / 3)


async def online(request):
    """
    summary: Who is online now, over every process, sorted by username.
    security: [{bearer: []}]
    responses:
      200: {description: Users with at least one open websocket, content: {application/json: {schema: {type: array, items: {$ref: '#/components/schemas/Online'}}}}}
      401: {$ref: '#/components/responses/Error'}
    """
    bearer_user(request)
    counts = await online_counts()
    return JSONResponse([{"username": name, "connections": counts[name]} for name in sorted(counts)])


# ---------------------------------------------------------------- websocket routes

async def replay(websocket, after, as_json):
    """Send the stored messages newer than `after`; returns the last id sent. Returns None for a
    client to close as too far behind: one that takes more than REPLAY_SEND_SECONDS to take a frame,
    or that asked for more than REPLAY_LIMIT messages (it reconnects with after=, or pages)."""
    # An `after` beyond the newest id counts from another database (one since reset, say): from
    # the newest, or the live messages, whose ids are lower, would all be taken as sent already.
    after = min(after, await db().fetch_val("SELECT coalesce(max(id), 0) FROM messages"))
    sent = 0
    while rows := await fetch_messages(500, after=after):
        for row in rows:
            if sent == REPLAY_LIMIT or websocket not in clients:  # too many, or closed meanwhile
                return None
            try:  # only the one form this client reads: no frames rendered for everyone
                await asyncio.wait_for(websocket.send_text(json.dumps(row) if as_json else message_line(row)), REPLAY_SEND_SECONDS)
            except asyncio.TimeoutError:
                return None
            sent += 1
        after = rows[-1]["id"]
    return after


async def read_frames(websocket, username):
    """Store and broadcast each text frame; returns a close code, or None once the client left."""
    unstored = []  # futures of its messages not stored yet, oldest first (a list: an empty deque is 600 bytes)
    while True:
        frame = await websocket.receive()
        if frame["type"] == "websocket.disconnect":
            return None
        text = frame.get("text")
        if text is None:
            return 1003  # binary frames are not chat
        if len(text) > MAX_MESSAGE_CHARS:
            return 1009
        if "\x00" in text:
            continue
        text = UNSAFE_CHARACTERS.sub("", text)
        while unstored and unstored[0].done():
            del unstored[0]
        if len(unstored) == UNSTORED_PER_SOCKET:
            await asyncio.wait([unstored.pop(0)])
        # Not in clients: it is being closed (maybe because a message of its own failed or was
        # refused meanwhile, and then nothing after that one is stored).
        if not text.strip() or websocket not in clients:
            continue
        unstored.append(store_soon(websocket, username, text, unstored))


def socket_token(websocket):
    """The access token offered as the subprotocol `bearer.<token>` (which keeps it out of URLs
    and logs), else the one in ?token=."""
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith("bearer."):
            return protocol.removeprefix("bearer.")
    return socket_query(websocket).get("token")


def socket_query(websocket):
    # Not websocket.query_params, which the WebSocket would keep for as long as the socket is open.
    return QueryParams(websocket.scope["query_string"])


def socket_options(websocket):
    """(as_json, after, presence) from the query, or None when a value is bad."""
    query = socket_query(websocket)
    raw_after, frame_format, presence = query.get("after"), query.get("format"), query.get("presence")
    after = None if raw_after is None else whole_number(raw_after)
    if frame_format not in (None, "json") or (raw_after is not None and after is None):
        return None
    if presence not in (None, "0", "1") or (presence == "1" and frame_format != "json"):
        return None
    return frame_format == "json", after, presence == "1"


def socket_claims(websocket):
    """(username, expiry time) from the socket's access token, or None."""
    claims = decode_token(socket_token(websocket), "access")
    return claims and (claims["sub"], claims["exp"])


async def stored_username(username):
    """The stored spelling of a user's name, or None once the account is gone."""
    user = await find_user(username)
    return user and user["username"]


def socket_opened(username):
    WEBSOCKETS_OPEN.inc()
    sockets_per_user[username] += 1
    presence_changed(username, opened=True)


def socket_closed(username):
    WEBSOCKETS_OPEN.dec()
    sockets_per_user[username] -= 1
    if not sockets_per_user[username]:
        del sockets_per_user[username]
    presence_changed(username, opened=False)


async def chat_socket(websocket, send):
    claims = socket_claims(websocket)
    options = socket_options(websocket)
    extensions = websocket.scope.get("extensions") or {}
    client = Client(websocket, send, extensions.get("chat.write_frame"), asyncio.current_task(),
                    as_json=bool(options and options[0]), abort=extensions.get("chat.abort"))
    if claims:
        clients[websocket] = client  # before the handshake: a connected client misses nothing
        if options and options[2]:
            subscribe_to_presence(client)  # nor a join or leave, whatever GET /auth/online answers
    username = None  # once the socket counts as open
    try:
        # Accept before judging the token: a close before accept reaches the client as HTTP 403.
        await websocket.accept("chat" if "chat" in websocket.scope.get("subprotocols", []) else None)
        name = claims and await stored_username(claims[0])
        if not name:
            await websocket.close(1008, "Invalid or expired token")
            return
        if options is None:
            await websocket.close(1008, "format must be json, after a message id, and presence 1 with format json")
            return
        if MAX_SOCKETS_PER_USER and sockets_per_user[name] >= MAX_SOCKETS_PER_USER:
            refused("sockets", [name])
            await websocket.close(CLOSE_TOO_MANY, "Too many connections")
            return
        username = name
        socket_opened(username)
        client.expires_at = claims[1]
        if client.expires_at <= time.time():  # within the decoding leeway: accepted, and over at once
            close_client(websocket, CLOSE_TOKEN_EXPIRED)
        if options[1] is not None:
            replayed_through = await replay(websocket, options[1], client.as_json)
            if replayed_through is None:  # cut short: no live message may follow, or after= would skip the rest
                close_client(websocket, CLOSE_TOO_SLOW)
            client.sent_through = NO_ID_LIMIT if replayed_through is None else replayed_through
        if client.backlog:  # what arrived while it connected and replayed
            client.sending = asyncio.ensure_future(send_backlog(client))
        else:
            client.backlog = None
        code = await read_frames(websocket, username)
        if code is not None:  # the close goes out after what is queued; give_up() ends a stuck one
            close_client(websocket, code)
            if client.sending is not None:  # None when a failed send let the client go already
                await asyncio.wait({client.sending})
    except WebSocketDisconnect:
        pass
    except asyncio.CancelledError:
        if not client.gave_up:
            raise
        asyncio.current_task().uncancel()  # give_up() let go of a client that stopped reading
    except Exception as error:  # the database went away, say: one line, not a traceback per reconnect
        log_now_and_then("socket", logging.ERROR, "a websocket failed and was closed with 1011: %s",
                         error or type(error).__name__)
        with contextlib.suppress(Exception, asyncio.CancelledError):  # give_up() may end this close too
            await websocket.close(1011)
    finally:
        client.handler = None
        client.backlog = None
        clients.pop(websocket, None)
        if client.sending is not None:
            client.sending.cancel()
        if username is not None:
            socket_closed(username)


class ChatSocketApp:
    """/ws as a plain ASGI app, which Starlette calls as `await ChatSocketApp(scope, receive, send)`
    (as it does its own WebSocketEndpoint). Given the function chat_socket, it would wrap it in
    two more layers and a second WebSocket object, which stay on every open socket's stack: this
    saves about a KiB per socket. chat_socket handles its own errors."""

    def __init__(self, scope, receive, send):
        self.websocket, self.send = WebSocket(scope, receive, send), send

    def __await__(self):
        return chat_socket(self.websocket, self.send).__await__()


async def close_expired_sockets():
    """A socket lives no longer than the token it was opened with: each second, close those whose
    token has expired with 4001. (One sweep, not a timer per socket: a timer costs each socket
    about half a KiB, and a sweep of 10,000 sockets well under a millisecond.)"""
    while True:
        await asyncio.sleep(1)
        now = time.time()
        for client in [client for client in clients.values() if client.expires_at <= now]:
            close_client(client.websocket, CLOSE_TOKEN_EXPIRED)


async def close_all_websockets(code, wait_seconds=2.0):
    """Close every local websocket with `code`, giving each a moment to take what is queued and the close."""
    closing = list(clients.values())
    for client in closing:
        close_client(client.websocket, code)
    deadline = time.monotonic() + wait_seconds
    while any(client.backlog is not None for client in closing) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)


# ---------------------------------------------------------------- uvicorn's HTTP protocol, bounded

MAX_HEAD_BYTES = 64 * 1024  # request line and headers
HEAD_TIMEOUT_SECONDS = 10  # for a request head to arrive whole, from the connection's start or its first byte


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two bounds it lacks; serve with
    `--http chat:BoundedHttpProtocol`. A request head over MAX_HEAD_BYTES gets 431 (httptools
    alone buffers a head without end), and one not whole within HEAD_TIMEOUT_SECONDS gets 408,
    or a plain close if not a byte came, so half-sent requests cannot hold connections open.
    Websocket handshakes are request heads too. It uses uvicorn's private names: the tests
    check it against the uvicorn in requirements.lock."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.in_head, self.head_bytes, self.head_begun = True, 0, False
        self.head_timer = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self.head_timed_out)

    def connection_lost(self, exc):
        self.cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data):
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.transport.get_protocol() is not self:  # upgraded to a websocket: no longer ours to time
            self.cancel_head_timer()
            return
        if self.transport.is_closing():
            return
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES:
            self.refuse(b"431 Request Header Fields Too Large", b"Request header fields too large")
        elif self.head_timer is None and (self.cycle is None or self.cycle.response_complete):
            # Bytes that no request being answered will read (blank lines between requests, a
            # body the app never read) would otherwise stop the keep-alive timer for good.
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self.head_timed_out)

    def on_message_begin(self):
        super().on_message_begin()
        self.head_begun = True
        if self.head_timer is None:  # the next request on a kept-alive connection
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self.head_timed_out)

    def on_headers_complete(self):
        self.in_head = self.head_begun = False
        self.cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self):
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0

    def cancel_head_timer(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self):
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a response is still going out
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self.head_timed_out)
        elif self.in_head and self.head_begun:
            self.refuse(b"408 Request Timeout", b"Request head took too long to arrive")
        else:
            self.transport.close()

    def refuse(self, status, text):
        self.cancel_head_timer()
        body = b'{"detail": "' + text + b'"}'
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()


# ---------------------------------------------------------------- uvicorn's websocket protocol, frames rendered once

# chat writes a frame only while the socket takes them (below the transport's high-water mark),
# at most BUNDLE_LIMIT frames of at most MAX_MESSAGE_CHARS at once: well under 1 MiB waits.
WRITE_BUFFER_LIMIT = 4 * 2**20


class ChatWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, plus one shortcut; serve with
    `--ws chat:ChatWebSocketProtocol`. It offers the ASGI extension `chat.write_frame`: a plain
    function that writes a frame chat serialized once for every client (`chat.frame` in its
    messages) straight to the socket, if the socket is open and keeping up, and returns whether
    it did. Framing the same text again for each client, and the coroutines of an ASGI send,
    cost more than the write itself. When it returns False (or on any other server), chat sends
    the message the ASGI way, and the server frames the text. It also offers `chat.abort`, which
    resets the connection of a client that stopped reading (give_up)."""

    def handle_connect(self, event):
        super().handle_connect(event)
        self.scope["extensions"]["chat.write_frame"] = self.write_frame
        self.scope["extensions"]["chat.abort"] = self.abort

    def write_frame(self, frame):
        conn = self.conn
        if (self.writable.is_set() and self.handshake_complete and not self.close_sent and not self.disconnected
                and self.initial_response is None and not self.transport.is_closing()
                and conn.state is WebSocketState.OPEN and not conn.extensions and not conn.expect_continuation_frame):
            self.transport.write(frame)
            return True
        return False

    def handle_ping(self):
        """Answer a ping (uvicorn writes the pong whether or not the client reads), and reset
        the connection of a client that sends pings but reads nothing once WRITE_BUFFER_LIMIT
        is waiting to go to it: its pongs would otherwise be buffered without end."""
        if self.transport.is_closing():  # reset already: the rest of what it sent goes unanswered
            return
        super().handle_ping()
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.abort()

    def abort(self):
        """Reset the connection (RST), unless it is closed already: what is queued is dropped, in
        the kernel's buffers too, which a close would keep trying to send to a client that stopped
        reading."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def raise_open_file_limit():
    """Raise this process's soft limit of open files to its hard limit (at most 2**20): the common
    1,024 lets a thousand idle connections lock every new client out."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 2**20 if hard == resource.RLIM_INFINITY else min(hard, 2**20)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---------------------------------------------------------------- start-up, shutdown and the app

# What start_service sets up on the running event loop: the locks, the message writer and its
# queue, the limiters, and with Redis its clients, the relay and the presence renewal.
service = {}


async def set_up_service():
    recent_ids.clear()
    recent_id_set.clear()
    known_online.clear()
    presence_in_redis.clear()
    pending_presence.clear()
    await database.connect()
    if USES_SQLITE:
        connection = database.connection()
        await connection.__aenter__()
        service["sqlite"] = connection
        # WAL with synchronous=NORMAL: still crash-safe, without an fsync per message.
        await connection.execute("PRAGMA synchronous=NORMAL")
    await apply_schema()
    service["presence_lock"] = asyncio.Lock()
    service["to_store"] = asyncio.Queue()
    service["writer"] = asyncio.create_task(store_in_batches(service["to_store"]))
    service["limiters"] = new_limiters()
    service["expiry"] = asyncio.create_task(close_expired_sockets())
    if BROADCAST_URL:
        last_id = await db().fetch_val("SELECT coalesce(max(id), 0) FROM messages")
        service["redis"] = service["publisher"] = redis.asyncio.from_url(BROADCAST_URL, socket_connect_timeout=2)
        if os.environ.get("CHAT_TEST_PUBLISH_URL"):  # a test hook: cut this process's publishing alone
            service["publisher"] = redis.asyncio.from_url(os.environ["CHAT_TEST_PUBLISH_URL"], socket_connect_timeout=2)
        subscribed = asyncio.Event()
        service["relay"] = asyncio.create_task(relay_from_redis(service["redis"], last_id, subscribed))
        with contextlib.suppress(asyncio.TimeoutError):  # Redis may be down: serve anyway
            await asyncio.wait_for(subscribed.wait(), 5)
        with contextlib.suppress(redis.RedisError, OSError):
            known_online.update(await online_counts())
        service["presence"] = asyncio.create_task(renew_presence(service["redis"]))


def without_password(url):
    url = re.sub(r"//([^:/@]*):[^/]*@", r"//\1:***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)


def log_configuration():
    """One line with the configuration in effect, secrets left out."""
    limits_in_effect = {"login": LOGIN_LIMIT, "register": REGISTER_LIMIT, "message": MESSAGE_LIMIT}
    metrics_in_effect = "off"
    if METRICS_ON:
        metrics_in_effect = f"pooled in {METRICS_DIRECTORY}" if METRICS_DIRECTORY else "of this process"
        metrics_in_effect += ", behind METRICS_TOKEN" if METRICS_TOKEN else ", open"
    log.info(
        "chat started (pid %s): database %s, broadcast %s, limits %s, sockets per user %s, bcrypt rounds %s, "
        "tokens %s min / %s days, signing key %s, metrics %s, log format %s",
        os.getpid(), without_password(DATABASE_URL), without_password(BROADCAST_URL) or "in-process",
        ", ".join(f"{kind} {item or 'off'}" for kind, item in limits_in_effect.items()),
        MAX_SOCKETS_PER_USER or "unlimited", BCRYPT_ROUNDS, ACCESS_TOKEN_EXPIRE_MINUTES, REFRESH_TOKEN_EXPIRE_DAYS,
        "from SECRET_KEY" if os.environ.get("SECRET_KEY", "").strip() else "from the key file",
        metrics_in_effect, LOG_FORMAT,
    )


def freeze_startup_objects():
    """Modules, classes and functions live as long as the process: move them out of the cyclic
    garbage collector's way, so that a full collection scans only what connections create
    (otherwise ~100k import-time objects make every full collection a 40 ms pause for everyone)."""
    if gc.get_freeze_count():  # once per process
        return
    gc.collect()
    gc.freeze()
    # Each broadcast allocates thousands of short-lived containers; collect the young generation
    # every 10,000 allocations instead of every 700, so few of them get promoted and old-generation
    # (slow) collections become rare.
    gc.set_threshold(10_000, 10, 10)


async def start_service():
    """Connect and apply the schema once per event loop, whether or not a lifespan ran."""
    started = service.get("started")
    loop = asyncio.get_running_loop()
    failed = started is not None and started.done() and (started.cancelled() or started.exception())
    if started is None or started.get_loop() is not loop or failed:
        if started is not None and started.get_loop() is not loop:
            service.clear()
            global database
            if database.is_connected:  # connected on an event loop that has gone: its pool is no use here
                database = new_database()
        elif failed:
            await stop_service()  # what the failed attempt opened
        started = service["started"] = loop.create_task(set_up_service())
    await asyncio.shield(started)


async def stop_service():
    await stop_writer()
    for name in ("relay", "presence", "expiry"):
        task = service.pop(name, None)
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if service.get("redis"):
        with contextlib.suppress(redis.RedisError, OSError):  # this process's sockets count no more
            await service["redis"].srem(PRESENCE_PROCESSES, presence_key())
            await service["redis"].delete(presence_key())
        if service["publisher"] is not service["redis"]:
            await service["publisher"].aclose()
        await service.pop("redis").aclose()
    connection = service.pop("sqlite", None)
    if connection is not None:
        await connection.__aexit__(None, None, None)
    if database.is_connected:
        await database.disconnect()
    cancel_presence_timer()
    service.clear()


def start_on_first_use(app):
    """Middleware: make sure the database is ready before any request, mounted or not; and a
    lifespan whose start-up fails for a known reason reports that in one line, not a traceback."""

    async def start_then_call(scope, receive, send):
        try:
            await start_service()
        except Exception as error:
            if isinstance(error, StartUpError):
                log.error("could not start the chat service: %s", error)
            else:
                log.exception("could not start the chat service")
            return await refuse_while_not_started(scope, receive, send)
        await app(scope, receive, send)

    def asgi(scope, receive, send):  # not async: see pass_through()
        if scope["type"] == "lifespan":
            return app(scope, receive, one_line_start_up_failure(send))
        started = service.get("started")
        ready = started and started.done() and not started.cancelled() and not started.exception()
        if ready and started.get_loop() is asyncio.get_running_loop():
            return app(scope, receive, send)
        return start_then_call(scope, receive, send)

    return asgi


def one_line_start_up_failure(send):
    async def send_one_line(message):
        if message["type"] == "lifespan.startup.failed" and service.get("start_up_error"):
            message = {**message, "message": f"chat: cannot start: {service['start_up_error']}"}
        await send(message)

    return send_one_line


async def refuse_while_not_started(scope, receive, send):
    if scope["type"] == "http":
        response = JSONResponse({"detail": "The database is not answering"}, 503)
        return await response(scope, receive, send)
    await receive()  # the connect event; accept so that the client really sees 1011
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 1011})


KNOWN_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def pass_through(app, http):
    """An ASGI app that runs `http` for HTTP requests and hands anything else straight to `app`.
    It is a plain function returning the coroutine to await, so a websocket's stack carries no
    frame of it for as long as the socket is open (a few hundred bytes each, per socket)."""

    def asgi(scope, receive, send):
        return (http if scope["type"] == "http" else app)(scope, receive, send)

    return asgi


def time_requests(app):
    """Middleware: HTTP request durations by route template (never the raw path, so clients
    cannot grow the label set), method and status."""

    async def timed(scope, receive, send):
        started, status = time.perf_counter(), 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_noting_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_DURATION.labels(scope["method"] if scope["method"] in KNOWN_METHODS else "other", route, str(status)).observe(
                time.perf_counter() - started
            )

    return pass_through(app, http=timed)


def limit_body_size(app):
    """Middleware: a request body over MAX_BODY_BYTES gets a 413, however it is sent, and one
    that takes over BODY_TIMEOUT_SECONDS to arrive gets a 408 (a slow-body attack holds nothing)."""

    async def limited(scope, receive, send):
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            response = JSONResponse({"detail": "Request body is larger than 64 KiB"}, 413)
            return await response(scope, receive, send)
        received = 0
        deadline = time.monotonic() + BODY_TIMEOUT_SECONDS

        async def counting_receive():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, "Request body took too long to arrive", headers={"Connection": "close"})
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise HTTPException(413, "Request body is larger than 64 KiB", headers={"Connection": "close"})
            return message

        try:
            await app(scope, counting_receive, send)
        except ClientDisconnect:  # the client left mid-body: nothing to answer, nothing to alarm
            log.debug("client %s left before sending the whole request body", scope.get("client"))

    return pass_through(app, http=limited)


def cors(app):
    """Middleware: CORS headers on HTTP responses (websockets check no CORS)."""
    return pass_through(app, http=CORSMiddleware(app, allow_origins=CORS_ORIGINS, allow_methods=["*"], allow_headers=["*"]))


def close_websockets_on_exit_signals():
    """Uvicorn closes websockets with 1012 before the app hears of shutdown, so on SIGINT or
    SIGTERM close ours with 1001 ("going away") first, then let uvicorn's handler run.
    Returns a function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def pass_on(signum, frame):
        if callable(previous[signum]):
            previous[signum](signum, frame)
        else:  # the default action: put it back and let the signal do what it always does
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)

    def close_then_pass_on(signum, frame):
        def begin():
            task = loop.create_task(close_all_websockets(1001))
            task.add_done_callback(lambda _: pass_on(signum, frame))

        loop.call_soon_threadsafe(begin)

    for sig in previous:
        signal.signal(sig, close_then_pass_on)
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


@contextlib.asynccontextmanager
async def lifespan(app):
    try:
        await start_service()
    except Exception as error:
        await stop_service()  # or the database's thread keeps the failed process alive
        if isinstance(error, StartUpError):
            service["start_up_error"] = str(error)  # for one_line_start_up_failure
        raise
    freeze_startup_objects()  # process-wide, so only when chat's lifespan runs
    raise_open_file_limit()
    log_configuration()
    restore_signal_handlers = close_websockets_on_exit_signals()
    try:
        yield
    finally:
        restore_signal_handlers()
        await close_all_websockets(1001)
        await stop_service()


ERROR_SENTENCES = {404: "There is nothing at this path", 405: "This path does not accept that method"}


async def http_error(request, exc):
    detail = exc.detail
    if detail == http.HTTPStatus(exc.status_code).phrase:  # Starlette's own ("Not Found"): a sentence instead
        detail = ERROR_SENTENCES.get(exc.status_code, detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def server_error(request, exc):
    return JSONResponse({"detail": "Internal server error"}, status_code=500)


routes = [
    Route("/", web_client, include_in_schema=False),
    Route("/health", health),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_schema, include_in_schema=False),
    Route("/auth/register", register, methods=["POST"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/refresh", refresh, methods=["POST"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/messages", list_messages, methods=["GET"]),
    Route("/auth/online", online, methods=["GET"]),
    WebSocketRoute("/ws", ChatSocketApp),
]

app = Starlette(
    routes=routes,
    middleware=[
        Middleware(time_requests),
        Middleware(cors),
        Middleware(limit_body_size),
        Middleware(start_on_first_use),
    ],
    exception_handlers={HTTPException: http_error, Exception: server_error},
    lifespan=lifespan,
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000, ws_max_size=WS_MAX_FRAME_BYTES, ws_per_message_deflate=False,
                http=BoundedHttpProtocol, ws=ChatWebSocketProtocol,
                limit_concurrency=LIMIT_CONCURRENCY)
