-- The demo table the README's `backfill enqueue demo_fill_total` works on: 2M orders whose
-- total_cents is still empty.
CREATE TABLE demo_orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    quantity int NOT NULL,
    unit_price_cents int NOT NULL,
    total_cents bigint
);
INSERT INTO demo_orders (quantity, unit_price_cents)
SELECT 1 + i % 7, 100 + i % 1000 FROM generate_series(1, 2000000) AS i;
VACUUM ANALYZE demo_orders;
