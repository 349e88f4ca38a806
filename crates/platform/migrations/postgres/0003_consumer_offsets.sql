-- A consumer of the embedded log (a service on PostgreSQL may use one) gets
-- every event in one total order: the position of the last event it applied
-- or parked, written in the transaction of the effect, records exactly what
-- it has seen (see consumer.rs).
CREATE TABLE consumer_offsets (
    consumer  TEXT   PRIMARY KEY,
    position  BIGINT NOT NULL
);
