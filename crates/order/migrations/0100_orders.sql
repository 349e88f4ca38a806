CREATE TABLE orders (
    id             TEXT   PRIMARY KEY,
    customer_id    TEXT   NOT NULL,
    restaurant_id  TEXT   NOT NULL,
    items          TEXT   NOT NULL,
    address        TEXT   NOT NULL,
    status         TEXT   NOT NULL,
    reason         TEXT,
    cook_id        TEXT,
    delivery_id    TEXT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX orders_by_customer ON orders (customer_id, created_at);

-- A client's Idempotency-Key and the request it first came with: the same
-- key never creates a second order, and reusing it for a different request
-- is refused instead of silently answered with the wrong order.
CREATE TABLE idempotency_keys (
    idem_key     TEXT   PRIMARY KEY,
    fingerprint  TEXT   NOT NULL,
    order_id     TEXT   NOT NULL,
    created_at   BIGINT NOT NULL
);
