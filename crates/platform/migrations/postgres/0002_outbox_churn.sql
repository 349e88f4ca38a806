-- The outbox is a queue: every row is inserted, read once and deleted, some
-- ten thousand a second under load. Left to the defaults, autovacuum waits
-- for a fifth of the table to be dead and then sleeps between pages, so the
-- relay's ordered read walks past tens of thousands of dead index entries
-- (measured: 56,000 dead rows to 900 live in the kitchen's outbox after 20 s
-- of load). Vacuum it after every thousand deletions, without throttling.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 1000
);
-- Nothing looks an outbox row up by its event id (consumers deduplicate,
-- NATS by message id): the unique index only doubled the index work of
-- every insert and every delete.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
