-- One delivery per order (UNIQUE order_id makes starting one idempotent).
-- `complete_at` is the durable timer for automatic completion.
CREATE TABLE deliveries (
    id           TEXT   PRIMARY KEY,
    order_id     TEXT   NOT NULL UNIQUE,
    cook_id      TEXT   NOT NULL,
    address      TEXT   NOT NULL,
    status       TEXT   NOT NULL,
    complete_at  BIGINT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (status, complete_at);
