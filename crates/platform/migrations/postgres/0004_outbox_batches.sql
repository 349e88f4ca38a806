-- One outbox row per appending statement instead of one per event: a
-- transaction that emits a batch's events (a placement batch, a consumer's
-- batch) writes one row, and the relay reads and deletes one. `payload`
-- holds the envelopes as JSON lines (compact JSON never contains a raw
-- newline), `events` how many. The relay takes each envelope's id, type
-- and order from its JSON, so the per-event columns go. An existing row
-- is one envelope, which is already a batch of one.
ALTER TABLE outbox
    ADD COLUMN events INTEGER NOT NULL DEFAULT 1,
    DROP COLUMN event_id,
    DROP COLUMN order_id,
    DROP COLUMN event_type;
ALTER TABLE outbox ALTER COLUMN events DROP DEFAULT;
