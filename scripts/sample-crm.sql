-- Sample CRM tenant matching schema-maps/crm_insights.toml.
--
-- Scale: set `ctmirror.scale` before running (1 = about 120,000 rows):
--   SELECT set_config('ctmirror.scale', '1', false);
-- Deterministic: the same scale always yields the same rows.

CREATE TABLE app_user (
  user_id       integer PRIMARY KEY,
  login         varchar(60) NOT NULL UNIQUE,
  display_name  varchar(120) NOT NULL,
  password_hash text NOT NULL,          -- never mapped
  mfa_secret    text,                   -- never mapped
  is_active     boolean NOT NULL DEFAULT true,
  last_login    timestamptz
);

CREATE TABLE contact (
  contact_id     bigint PRIMARY KEY,
  name           varchar(200) NOT NULL,
  department     varchar(100),
  org_nr         varchar(20),
  number         varchar(30),
  country_id     integer,
  business_id    integer,
  category_id    integer,
  internal_notes text,                  -- never mapped
  registered     timestamptz NOT NULL,
  updated        timestamptz,
  deleted        boolean NOT NULL DEFAULT false
);

CREATE TABLE person (
  person_id    bigint PRIMARY KEY,
  contact_id   bigint REFERENCES contact,
  first_name   varchar(100),
  last_name    varchar(100) NOT NULL,
  title        varchar(100),
  email        varchar(200),
  phone        varchar(40),
  national_id  varchar(20),             -- never mapped
  birth_date   date,
  registered   timestamptz NOT NULL,
  updated      timestamptz,
  retired      boolean NOT NULL DEFAULT false
);

CREATE TABLE appointment (
  appointment_id bigint PRIMARY KEY,
  contact_id     bigint,
  person_id      bigint,
  associate_id   integer,
  starts_at      timestamptz NOT NULL,
  ends_at        timestamptz NOT NULL,
  description    text,
  done           boolean NOT NULL DEFAULT false,
  priority       smallint NOT NULL DEFAULT 0
);

CREATE TABLE sale (
  sale_id      bigint PRIMARY KEY,
  contact_id   bigint,
  person_id    bigint,
  associate_id integer,
  amount       numeric(12,2) NOT NULL,
  probability  smallint,
  sale_date    date NOT NULL,
  status       varchar(20) NOT NULL,
  heading      varchar(200),
  currency     char(3) NOT NULL DEFAULT 'EUR'
);

CREATE TABLE project (
  project_id     bigint PRIMARY KEY,
  name           varchar(200) NOT NULL,
  project_number varchar(20),
  status         smallint NOT NULL,
  starts         date,
  ends           date,
  done           boolean NOT NULL DEFAULT false,
  external_id    uuid NOT NULL
);

INSERT INTO app_user
SELECT i, 'user' || i, 'Associate ' || i,
       '$argon2id$v=19$m=65536,t=3,p=4$' || md5('salt' || i) || '$' || md5('pw' || i),
       CASE WHEN i % 3 = 0 THEN md5('mfa' || i) END,
       i % 10 <> 0,
       CASE WHEN i % 4 <> 0 THEN timestamptz '2026-01-01 08:00:00+00' + (i || ' hours')::interval END
FROM generate_series(1, 200) AS i;

INSERT INTO contact
SELECT i,
       (ARRAY['Nordlys', 'Fjord', 'Granitt', 'Bølge', 'Müller & Söhne', 'O''Brien'])[1 + i % 6] || ' ' || i || ' AS',
       CASE WHEN i % 5 <> 0 THEN (ARRAY['Sales', 'Support', 'R&D', 'Finance'])[1 + i % 4] END,
       lpad((900000000 + i)::text, 9, '0'),
       'C-' || i,
       1 + i % 40, 1 + i % 12, 1 + i % 7,
       'internal note ' || md5(i::text),
       timestamptz '2020-01-01 00:00:00+00' + (i * 137 || ' minutes')::interval,
       CASE WHEN i % 3 = 0 THEN timestamptz '2025-06-01 12:00:00+00' + (i || ' seconds')::interval END,
       i % 97 = 0
FROM generate_series(1, (20000 * current_setting('ctmirror.scale')::numeric)::int) AS i;

INSERT INTO person
SELECT i, 1 + (i % ((20000 * current_setting('ctmirror.scale')::numeric)::int)),
       (ARRAY['Ola', 'Kari', 'Åse', 'Jürgen', 'Zoë', NULL])[1 + i % 6],
       'Person' || i,
       CASE WHEN i % 4 = 0 THEN 'Manager' END,
       'p' || i || '@example.com',
       '+47 ' || (40000000 + i),
       lpad((i * 7919 % 100000000000)::text, 11, '0'),
       date '1950-01-01' + (i % 20000),
       timestamptz '2021-01-01 00:00:00+00' + (i * 61 || ' minutes')::interval,
       NULL,
       i % 50 = 0
FROM generate_series(1, (40000 * current_setting('ctmirror.scale')::numeric)::int) AS i;

INSERT INTO appointment
SELECT i, 1 + i % ((20000 * current_setting('ctmirror.scale')::numeric)::int), 1 + i % ((40000 * current_setting('ctmirror.scale')::numeric)::int), 1 + i % 200,
       timestamptz '2024-01-01 09:00:00+00' + (i * 30 || ' minutes')::interval,
       timestamptz '2024-01-01 10:00:00+00' + (i * 30 || ' minutes')::interval,
       'Meeting about ' || md5(i::text),
       i % 3 = 0,
       (i % 3)::smallint
FROM generate_series(1, (40000 * current_setting('ctmirror.scale')::numeric)::int) AS i;

INSERT INTO sale
SELECT i, 1 + i % ((20000 * current_setting('ctmirror.scale')::numeric)::int), 1 + i % ((40000 * current_setting('ctmirror.scale')::numeric)::int), 1 + i % 200,
       round((i * 37.13 % 1000000)::numeric, 2),
       (i % 101)::smallint,
       date '2023-01-01' + (i % 1000),
       (ARRAY['open', 'won', 'lost', 'stalled'])[1 + i % 4],
       'Deal #' || i,
       (ARRAY['EUR', 'NOK', 'USD'])[1 + i % 3]
FROM generate_series(1, (15000 * current_setting('ctmirror.scale')::numeric)::int) AS i;

INSERT INTO project
SELECT i, 'Project ' || i, 'P-' || lpad(i::text, 6, '0'), (i % 5)::smallint,
       date '2024-01-01' + (i % 365),
       CASE WHEN i % 2 = 0 THEN date '2025-01-01' + (i % 365) END,
       i % 4 = 0,
       md5('project' || i)::uuid
FROM generate_series(1, (5000 * current_setting('ctmirror.scale')::numeric)::int) AS i;

ANALYZE;
