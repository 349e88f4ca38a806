-- Every event passes through these two tables several times, so every
-- B-tree they keep is a page written to the WAL on each commit.
--
-- The outbox's UNIQUE event_id index: nothing looks a row up by its event
-- id (the log deduplicates on it, consumers by their records), so it only
-- doubled the index work of every insert and every delete. SQLite cannot
-- drop a constraint: the table is rebuilt, its rows and sequence kept.
CREATE TABLE outbox_lean (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL,
    order_id    TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
INSERT INTO outbox_lean SELECT seq, event_id, order_id, event_type, payload, created_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_lean RENAME TO outbox;

-- Dedup records are only ever found by their key: clustered on it
-- (WITHOUT ROWID) a record is one B-tree entry instead of a row plus an
-- index entry.
CREATE TABLE processed_events_lean (
    consumer     TEXT   NOT NULL,
    event_id     TEXT   NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
INSERT INTO processed_events_lean SELECT consumer, event_id, processed_at FROM processed_events;
DROP TABLE processed_events;
ALTER TABLE processed_events_lean RENAME TO processed_events;

-- A consumer of the embedded log gets every event in one total order: the
-- position of the last event it applied or parked, written in the
-- transaction of the effect, records exactly what it has seen (see
-- consumer.rs). Consumers of JetStream, where orders interleave, keep
-- recording event ids.
CREATE TABLE consumer_offsets (
    consumer  TEXT   PRIMARY KEY,
    position  BIGINT NOT NULL
) WITHOUT ROWID;
