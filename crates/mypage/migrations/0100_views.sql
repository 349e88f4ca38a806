-- One row per order, built only from events. `facts` is a bit set of what
-- has been seen; statuses are derived from it when read, which is what makes
-- the view independent of the order events arrive in (see projection.rs).
CREATE TABLE views (
    order_id       TEXT   PRIMARY KEY,
    customer_id    TEXT,
    restaurant_id  TEXT,
    items          TEXT,
    facts          BIGINT NOT NULL,
    cook_id        TEXT,
    delivery_id    TEXT,
    reject_reason  TEXT,
    cancel_reason  TEXT,
    refuse_reason  TEXT,
    updated_at     BIGINT NOT NULL,
    -- When this row last changed: projected_at - updated_at is how long the
    -- view trailed the event (its staleness).
    projected_at   BIGINT NOT NULL
);
CREATE INDEX views_by_customer ON views (customer_id, order_id);
