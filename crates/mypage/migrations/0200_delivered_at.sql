-- When the order was delivered (epoch ms), null until then: the earliest of
-- the delivery's DeliveryCompleted and the order's OrderDelivered. Views
-- delivered before this column existed keep it null until a rebuild
-- (POST /admin/rebuild) replays their events.
ALTER TABLE views ADD COLUMN delivered_at BIGINT;
