-- When the order was placed and when it was delivered (epoch ms), each the
-- earliest event that says so: the order's OrderPlaced; the delivery's
-- DeliveryCompleted, then the order's OrderDelivered. Null until known.
-- Views written before these columns existed keep them null until a rebuild
-- (POST /admin/mypage/rebuild) replays their events.
ALTER TABLE views ADD COLUMN placed_at BIGINT;
ALTER TABLE views ADD COLUMN delivered_at BIGINT;
