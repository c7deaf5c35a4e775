-- MLflow's database beside Prefect's (POSTGRES_DB) in the same PostgreSQL server.
CREATE DATABASE mlflow OWNER ddpm;
