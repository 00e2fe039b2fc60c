-- The registry's login role and database; run by the wgjit deploy as the postgres
-- superuser with -v role=... -v db=... -v pwfile=... . The password is read from a
-- 0600 file by psql itself, so it appears on no command line.
\set ON_ERROR_STOP on
\set pw `cat :'pwfile'`
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" LOGIN PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
