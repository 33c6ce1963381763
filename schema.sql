-- The chat service's schema, applied at every start-up; every statement is idempotent.
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
    text TEXT NOT NULL
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
