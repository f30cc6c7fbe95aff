-- Run once by the postgres image on an empty data folder (docker-entrypoint-initdb.d): the
-- basic-auth app keeps its users and permissions in a database of their own.
CREATE DATABASE mlflow_auth;
