-- One outbox row per appending statement instead of one per event: a
-- transaction that emits a batch's events (a placement batch, a consumer's
-- batch) writes one row, and the relay reads and deletes one. `payload`
-- holds the envelopes as JSON lines (compact JSON never contains a raw
-- newline), `events` how many. The relay takes each envelope's id, type
-- and order from its JSON, so the per-event columns go. An existing row
-- is one envelope, which is already a batch of one.
CREATE TABLE outbox_batches (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    events      INTEGER NOT NULL,
    payload     TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
INSERT INTO outbox_batches (seq, events, payload, created_at)
    SELECT seq, 1, payload, created_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_batches RENAME TO outbox;
