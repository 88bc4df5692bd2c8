-- docker-compose.yml: one database per service (as `meterai up` makes them). Runs once, when
-- the PostgreSQL volume is new; `meterai migrate` then creates the tables.
CREATE DATABASE meterai_inventory;
CREATE DATABASE meterai_stamping;
