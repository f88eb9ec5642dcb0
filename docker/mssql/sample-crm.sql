-- Sample CRM tenant "acme" on SQL Server 2022: the T-SQL twin of
-- scripts/sample-crm.sql (same tables and column names, as mapped in
-- schema-maps/crm_insights.toml, with SQL Server types), about 7,200 rows,
-- and the login the ctmirror agent connects with.
--
-- Run by the compose service mssql-init as
--   sqlcmd -C -S mssql -U sa -b -I -i sample-crm.sql
-- with SQLCMDPASSWORD (sa's) and CTMIRROR_AGENT_PASSWORD in the environment:
-- sqlcmd substitutes $(CTMIRROR_AGENT_PASSWORD) from the environment and,
-- with -b, stops if it is missing. The password must not contain a quote.
--
-- Idempotent: objects are created only when absent and tables filled only
-- when empty, so the script runs on every `compose up` and changes nothing
-- the second time (the agent's cursors stay valid).
--
-- Change tracking is deliberately NOT turned on here: the agent turns on
-- database tracking, ALLOW_SNAPSHOT_ISOLATION and table tracking itself on
-- its first cycle (see the grants at the end, and the alternative there).
--
-- The file is pure ASCII: non-ASCII sample names are spelled with NCHAR(),
-- so they arrive intact whatever input code page sqlcmd assumes.

SET NOCOUNT ON;
SET XACT_ABORT ON;
GO

IF DB_ID(N'acme') IS NULL
    CREATE DATABASE acme;
GO
-- GENERATE_SERIES needs compatibility level 160, which new databases on
-- SQL Server 2022 have unless model was changed.
IF EXISTS (SELECT 1 FROM sys.databases WHERE name = N'acme' AND compatibility_level < 160)
    ALTER DATABASE acme SET COMPATIBILITY_LEVEL = 160;
GO

-- The agent's login. Created once; to change its password later run
-- ALTER LOGIN ctmirror_agent WITH PASSWORD = '...' (or `compose down -v`).
IF NOT EXISTS (SELECT 1 FROM sys.server_principals WHERE name = N'ctmirror_agent')
    CREATE LOGIN ctmirror_agent
        WITH PASSWORD = N'$(CTMIRROR_AGENT_PASSWORD)', DEFAULT_DATABASE = acme, CHECK_EXPIRATION = OFF;
GO
-- The agent identifies the database copy from sys.database_recovery_status
-- and reads sys.change_tracking_databases; both show a non-owner the row
-- only with VIEW ANY DATABASE. The public role holds it by default;
-- granting it explicitly keeps the agent working where public lost it.
GRANT VIEW ANY DATABASE TO ctmirror_agent;
GO

USE acme;
GO

-- ------------------------------------------------------------------ tables --
-- Columns marked "never mapped" exist to show the schema map's deny-by-
-- default: they never leave the tenant database.

IF OBJECT_ID(N'dbo.app_user', N'U') IS NULL
CREATE TABLE dbo.app_user (
  user_id       int               NOT NULL CONSTRAINT pk_app_user PRIMARY KEY,
  login         nvarchar(60)      NOT NULL CONSTRAINT uq_app_user_login UNIQUE,
  display_name  nvarchar(120)     NOT NULL,
  password_hash nvarchar(200)     NOT NULL,   -- never mapped
  mfa_secret    nvarchar(64)      NULL,       -- never mapped
  is_active     bit               NOT NULL CONSTRAINT df_app_user_is_active DEFAULT 1,
  last_login    datetimeoffset(3) NULL        -- mirrored as the UTC instant
);

IF OBJECT_ID(N'dbo.contact', N'U') IS NULL
CREATE TABLE dbo.contact (
  contact_id     bigint        NOT NULL CONSTRAINT pk_contact PRIMARY KEY,
  name           nvarchar(200) NOT NULL,
  department     nvarchar(100) NULL,
  org_nr         varchar(20)   NULL,
  [number]       varchar(30)   NULL,
  country_id     int           NULL,
  business_id    int           NULL,
  category_id    int           NULL,
  internal_notes nvarchar(max) NULL,          -- never mapped
  registered     datetime2(3)  NOT NULL,
  updated        datetime2(3)  NULL,
  deleted        bit           NOT NULL CONSTRAINT df_contact_deleted DEFAULT 0
);

IF OBJECT_ID(N'dbo.person', N'U') IS NULL
CREATE TABLE dbo.person (
  person_id    bigint        NOT NULL CONSTRAINT pk_person PRIMARY KEY,
  contact_id   bigint        NULL CONSTRAINT fk_person_contact REFERENCES dbo.contact (contact_id),
  first_name   nvarchar(100) NULL,
  last_name    nvarchar(100) NOT NULL,
  title        nvarchar(100) NULL,
  email        nvarchar(200) NULL,
  phone        nvarchar(40)  NULL,
  national_id  varchar(20)   NULL,            -- never mapped
  birth_date   date          NULL,
  registered   datetime2(3)  NOT NULL,
  updated      datetime2(3)  NULL,
  retired      bit           NOT NULL CONSTRAINT df_person_retired DEFAULT 0
);

IF OBJECT_ID(N'dbo.appointment', N'U') IS NULL
CREATE TABLE dbo.appointment (
  appointment_id bigint        NOT NULL CONSTRAINT pk_appointment PRIMARY KEY,
  contact_id     bigint        NULL,
  person_id      bigint        NULL,
  associate_id   int           NULL,
  starts_at      datetime2(0)  NOT NULL,
  ends_at        datetime2(0)  NOT NULL,
  description    nvarchar(max) NULL,
  done           bit           NOT NULL CONSTRAINT df_appointment_done DEFAULT 0,
  priority       smallint      NOT NULL CONSTRAINT df_appointment_priority DEFAULT 0
);

IF OBJECT_ID(N'dbo.sale', N'U') IS NULL
CREATE TABLE dbo.sale (
  sale_id      bigint         NOT NULL CONSTRAINT pk_sale PRIMARY KEY,
  contact_id   bigint         NULL,
  person_id    bigint         NULL,
  associate_id int            NULL,
  amount       decimal(12, 2) NOT NULL,
  probability  tinyint        NULL,
  sale_date    date           NOT NULL,
  status       varchar(20)    NOT NULL,
  heading      nvarchar(200)  NULL,
  currency     char(3)        NOT NULL CONSTRAINT df_sale_currency DEFAULT 'EUR'
);

IF OBJECT_ID(N'dbo.project', N'U') IS NULL
CREATE TABLE dbo.project (
  project_id     bigint           NOT NULL CONSTRAINT pk_project PRIMARY KEY,
  name           nvarchar(200)    NOT NULL,
  project_number varchar(20)      NULL,
  status         smallint         NOT NULL,
  starts         date             NULL,
  ends           date             NULL,
  done           bit              NOT NULL CONSTRAINT df_project_done DEFAULT 0,
  external_id    uniqueidentifier NOT NULL
);
GO

-- -------------------------------------------------------------------- rows --
-- Deterministic, like the PostgreSQL sample: 200 users, 1,000 contacts,
-- 2,000 persons, 2,000 appointments, 1,500 sales, 500 projects.
-- md5(x) of the PostgreSQL script is LOWER(CONVERT(char(32), HASHBYTES('MD5', x), 2)).

IF NOT EXISTS (SELECT 1 FROM dbo.app_user)
INSERT INTO dbo.app_user (user_id, login, display_name, password_hash, mfa_secret, is_active, last_login)
SELECT i,
       CONCAT(N'user', i),
       CONCAT(N'Associate ', i),
       CONCAT(N'$argon2id$v=19$m=65536,t=3,p=4$',
              LOWER(CONVERT(char(32), HASHBYTES('MD5', CONCAT('salt', i)), 2)), N'$',
              LOWER(CONVERT(char(32), HASHBYTES('MD5', CONCAT('pw', i)), 2))),
       CASE WHEN i % 3 = 0 THEN LOWER(CONVERT(char(32), HASHBYTES('MD5', CONCAT('mfa', i)), 2)) END,
       CASE WHEN i % 10 <> 0 THEN 1 ELSE 0 END,
       CASE WHEN i % 4 <> 0 THEN DATEADD(hour, i, CAST('2026-01-01T08:00:00+00:00' AS datetimeoffset(3))) END
FROM (SELECT value AS i FROM GENERATE_SERIES(1, 200)) AS s;

IF NOT EXISTS (SELECT 1 FROM dbo.contact)
INSERT INTO dbo.contact (contact_id, name, department, org_nr, [number], country_id, business_id,
                         category_id, internal_notes, registered, updated, deleted)
SELECT i,
       CONCAT(CHOOSE(1 + i % 6, N'Nordlys', N'Fjord', N'Granitt',
                     N'B' + NCHAR(248) + N'lge',                          -- Bolge with o-slash
                     N'M' + NCHAR(252) + N'ller & S' + NCHAR(246) + N'hne', -- Mueller & Soehne
                     N'O''Brien'),
              N' ', i, N' AS'),
       CASE WHEN i % 5 <> 0 THEN CHOOSE(1 + i % 4, N'Sales', N'Support', N'R&D', N'Finance') END,
       CONCAT(900000000 + i, ''),
       CONCAT('C-', i),
       1 + i % 40, 1 + i % 12, 1 + i % 7,
       CONCAT(N'internal note ', LOWER(CONVERT(char(32), HASHBYTES('MD5', CONCAT(i, '')), 2))),
       DATEADD(minute, i * 137, CAST('2020-01-01T00:00:00' AS datetime2(3))),
       CASE WHEN i % 3 = 0 THEN DATEADD(second, i, CAST('2025-06-01T12:00:00' AS datetime2(3))) END,
       CASE WHEN i % 97 = 0 THEN 1 ELSE 0 END
FROM (SELECT value AS i FROM GENERATE_SERIES(1, 1000)) AS s;

IF NOT EXISTS (SELECT 1 FROM dbo.person)
INSERT INTO dbo.person (person_id, contact_id, first_name, last_name, title, email, phone,
                        national_id, birth_date, registered, updated, retired)
SELECT i,
       1 + i % 1000,
       CHOOSE(1 + i % 6, N'Ola', N'Kari', NCHAR(197) + N'se', N'J' + NCHAR(252) + N'rgen',
              N'Zo' + NCHAR(235), NULL),
       CONCAT(N'Person', i),
       CASE WHEN i % 4 = 0 THEN N'Manager' END,
       CONCAT(N'p', i, N'@example.com'),
       CONCAT(N'+47 ', 40000000 + i),
       RIGHT(CONCAT(REPLICATE('0', 11), CAST(i AS bigint) * 7919 % CAST(100000000000 AS bigint)), 11),
       DATEADD(day, i % 20000, CAST('1950-01-01' AS date)),
       DATEADD(minute, i * 61, CAST('2021-01-01T00:00:00' AS datetime2(3))),
       NULL,
       CASE WHEN i % 50 = 0 THEN 1 ELSE 0 END
FROM (SELECT value AS i FROM GENERATE_SERIES(1, 2000)) AS s;

IF NOT EXISTS (SELECT 1 FROM dbo.appointment)
INSERT INTO dbo.appointment (appointment_id, contact_id, person_id, associate_id, starts_at, ends_at,
                             description, done, priority)
SELECT i, 1 + i % 1000, 1 + i % 2000, 1 + i % 200,
       DATEADD(minute, i * 30, CAST('2024-01-01T09:00:00' AS datetime2(0))),
       DATEADD(minute, i * 30, CAST('2024-01-01T10:00:00' AS datetime2(0))),
       CONCAT(N'Meeting about ', LOWER(CONVERT(char(32), HASHBYTES('MD5', CONCAT(i, '')), 2))),
       CASE WHEN i % 3 = 0 THEN 1 ELSE 0 END,
       i % 3
FROM (SELECT value AS i FROM GENERATE_SERIES(1, 2000)) AS s;

IF NOT EXISTS (SELECT 1 FROM dbo.sale)
INSERT INTO dbo.sale (sale_id, contact_id, person_id, associate_id, amount, probability, sale_date,
                      status, heading, currency)
SELECT i, 1 + i % 1000, 1 + i % 2000, 1 + i % 200,
       CAST(i * 37.13 % 1000000 AS decimal(12, 2)),
       i % 101,
       DATEADD(day, i % 1000, CAST('2023-01-01' AS date)),
       CHOOSE(1 + i % 4, 'open', 'won', 'lost', 'stalled'),
       CONCAT(N'Deal #', i),
       CHOOSE(1 + i % 3, 'EUR', 'NOK', 'USD')
FROM (SELECT value AS i FROM GENERATE_SERIES(1, 1500)) AS s;

IF NOT EXISTS (SELECT 1 FROM dbo.project)
INSERT INTO dbo.project (project_id, name, project_number, status, starts, ends, done, external_id)
SELECT i,
       CONCAT(N'Project ', i),
       CONCAT('P-', RIGHT(CONCAT('000000', i), 6)),
       i % 5,
       DATEADD(day, i % 365, CAST('2024-01-01' AS date)),
       CASE WHEN i % 2 = 0 THEN DATEADD(day, i % 365, CAST('2025-01-01' AS date)) END,
       CASE WHEN i % 4 = 0 THEN 1 ELSE 0 END,
       CAST(HASHBYTES('MD5', CONCAT('project', i)) AS uniqueidentifier)
FROM (SELECT value AS i FROM GENERATE_SERIES(1, 500)) AS s;
GO

-- ------------------------------------------------------------ agent access --
-- What the agent does with each permission:
--   SELECT                 full loads and current row values
--   VIEW CHANGE TRACKING   CHANGETABLE(CHANGES ...) and the min valid version
--   VIEW DEFINITION        the catalog: mapped columns, types, primary keys
--   ALTER on each table    ALTER TABLE ... ENABLE CHANGE_TRACKING
--   ALTER on the database  SET CHANGE_TRACKING = ON and
--                          SET ALLOW_SNAPSHOT_ISOLATION ON (first cycle only)
--   VIEW DATABASE STATE    tracking and snapshot state of the database
-- Every enabling step checks the catalog first, so after the first cycle the
-- ALTER permissions are no longer used and may be revoked.
--
-- ALTER on the database is broad: it implies ALTER on every schema and
-- table in it. The tighter alternative, for production, is an administrator
-- enabling tracking once and granting only read permissions:
--
--   ALTER DATABASE acme SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 168 HOURS, AUTO_CLEANUP = ON);
--   ALTER DATABASE acme SET ALLOW_SNAPSHOT_ISOLATION ON;
--   -- for each mapped table:
--   ALTER TABLE dbo.contact ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
--   GRANT SELECT, VIEW CHANGE TRACKING ON dbo.contact TO ctmirror_agent;
--
-- (plus VIEW ANY DATABASE, which public holds by default). A table mapped
-- later then needs the same ALTER TABLE and GRANT before the agent can
-- mirror it. SELECT can also be narrowed to the mapped columns, e.g.
-- GRANT SELECT ON dbo.app_user (user_id, login, display_name, is_active, last_login).

IF DATABASE_PRINCIPAL_ID(N'ctmirror_agent') IS NULL
    CREATE USER ctmirror_agent FOR LOGIN ctmirror_agent;
GO
GRANT SELECT, VIEW CHANGE TRACKING, VIEW DEFINITION, ALTER ON dbo.app_user    TO ctmirror_agent;
GRANT SELECT, VIEW CHANGE TRACKING, VIEW DEFINITION, ALTER ON dbo.contact     TO ctmirror_agent;
GRANT SELECT, VIEW CHANGE TRACKING, VIEW DEFINITION, ALTER ON dbo.person      TO ctmirror_agent;
GRANT SELECT, VIEW CHANGE TRACKING, VIEW DEFINITION, ALTER ON dbo.appointment TO ctmirror_agent;
GRANT SELECT, VIEW CHANGE TRACKING, VIEW DEFINITION, ALTER ON dbo.sale        TO ctmirror_agent;
GRANT SELECT, VIEW CHANGE TRACKING, VIEW DEFINITION, ALTER ON dbo.project     TO ctmirror_agent;
GRANT ALTER, VIEW DATABASE STATE ON DATABASE::acme TO ctmirror_agent;
GO

-- PRINT takes no subqueries: build the summary in a variable.
DECLARE @summary nvarchar(400) = CONCAT('acme ready: ',
    (SELECT COUNT(*) FROM dbo.contact), ' contacts, ',
    (SELECT COUNT(*) FROM dbo.person), ' persons, ',
    (SELECT COUNT(*) FROM dbo.appointment), ' appointments, ',
    (SELECT COUNT(*) FROM dbo.sale), ' sales, ',
    (SELECT COUNT(*) FROM dbo.project), ' projects, ',
    (SELECT COUNT(*) FROM dbo.app_user), ' users');
PRINT @summary;
GO
