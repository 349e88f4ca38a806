-- Platform tables every service database carries: the transactional outbox,
-- the consumer's record of applied events (idempotency), and parked events.
CREATE TABLE outbox (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT    NOT NULL UNIQUE,
    order_id    TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE processed_events (
    consumer     TEXT   NOT NULL,
    event_id     TEXT   NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

CREATE TABLE dead_letters (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer    TEXT    NOT NULL,
    event_id    TEXT,
    event_type  TEXT,
    order_id    TEXT,
    payload     TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    attempts    BIGINT  NOT NULL,
    parked_at   BIGINT  NOT NULL
);
