-- Second database for the basic-auth user store (the first, mlflow, is POSTGRES_DB).
CREATE DATABASE mlflow_auth OWNER mlflow;
