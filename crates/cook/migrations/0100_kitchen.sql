CREATE TABLE menus (
    restaurant_id  TEXT   NOT NULL,
    menu_id        TEXT   NOT NULL,
    name           TEXT   NOT NULL,
    price          BIGINT NOT NULL,
    stock          BIGINT NOT NULL CHECK (stock >= 0),
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (restaurant_id, menu_id)
);

-- One cook ticket per order. The UNIQUE order_id is what makes taking an
-- order idempotent, and what serialises "take the order" against "cancel
-- it" when the cancel comes first: the cancel writes a CANCELLED ticket
-- (items '[]' until the order arrives) and the order, arriving later, finds
-- the ticket taken. `complete_at` is the durable timer for automatic
-- completion: NULL when cooking is completed by hand.
CREATE TABLE cooks (
    id             TEXT   PRIMARY KEY,
    order_id       TEXT   NOT NULL UNIQUE,
    restaurant_id  TEXT   NOT NULL,
    items          TEXT   NOT NULL,
    address        TEXT   NOT NULL,
    status         TEXT   NOT NULL,
    reason         TEXT,
    complete_at    BIGINT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX cooks_due ON cooks (status, complete_at);
