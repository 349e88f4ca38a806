-- The embedded durable event log: an append-only table ordered by `seq`,
-- deduplicated on the event id (a relay that crashes after appending and
-- before deleting its outbox rows appends the same events again), and the
-- durable position of every consumer.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL UNIQUE,
    order_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    appended_at  BIGINT  NOT NULL
);

CREATE TABLE consumer_positions (
    consumer  TEXT   PRIMARY KEY,
    position  BIGINT NOT NULL
);
