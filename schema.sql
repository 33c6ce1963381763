-- The chat service's schema: what an empty database is given at its first start-up. A database
-- made by an earlier release is brought up to date by migrations/NNN_*.sql instead, so a change
-- here needs a migration too (and SCHEMA_VERSION follows the highest migration's number).
-- Written for SQLite; chat.py swaps the one phrase PostgreSQL spells differently
-- ("INTEGER PRIMARY KEY AUTOINCREMENT" becomes "BIGSERIAL PRIMARY KEY").

CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,          -- kept as registered
    password TEXT NOT NULL              -- bcrypt hash, never the password
);

-- Names are unique regardless of case: "Alice" and "alice" cannot both exist.
CREATE UNIQUE INDEX IF NOT EXISTS users_username_lower ON users (lower(username));

CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL REFERENCES users (username),
    text TEXT NOT NULL,
    created_at TEXT                     -- when stored: server UTC, ISO 8601 with ms and Z; NULL
                                        -- for messages stored before version 2
);

-- One row per refresh token issued; rows are deleted on theft (all of that user's) or once expired.
CREATE TABLE IF NOT EXISTS refresh_tokens (
    jti TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users (username),
    expires_at BIGINT NOT NULL,         -- unix seconds, as in the token's "exp"
    used INTEGER NOT NULL DEFAULT 0     -- 0 unused; 1 logged out; else the unix time it was exchanged.
                                        -- A used or logged-out token shown again means theft
);

CREATE INDEX IF NOT EXISTS refresh_tokens_username ON refresh_tokens (username);
CREATE INDEX IF NOT EXISTS refresh_tokens_expires_at ON refresh_tokens (expires_at);

-- The schema's version (one row), so that start-up knows which migrations to apply.
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
