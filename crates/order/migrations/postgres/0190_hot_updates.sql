-- PostgreSQL alone (SQLite has no fillfactor).
--
-- An order's row is updated as its saga moves (2.6 updates per order in
-- the distributed benchmark) and no update changes an indexed column. Such
-- an update can stay on its page without touching the indexes (a HOT
-- update), but only if the page has room for the new version; with full
-- pages most were not. Pages filled to 70% leave that room: HOT updates
-- 0.9-1.1 -> 1.8-1.9 per order (with MyPage's views, 0190 there: WAL
-- records 100-101 -> 92-93 per order).
ALTER TABLE orders SET (fillfactor = 70);
