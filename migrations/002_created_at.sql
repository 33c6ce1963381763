-- Version 2: each message records when it was stored, and the database records its schema
-- version. Messages stored before this upgrade keep created_at NULL.
ALTER TABLE messages ADD COLUMN created_at TEXT;

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
