#!/bin/sh
# Runs once, on the first start of an empty PostgreSQL volume (the image's docker-entrypoint-initdb.d).
# MLflow gets a database of its own: Optuna and MLflow each keep an alembic_version table, and would clash.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -c "CREATE DATABASE \"${MLFLOW_DB:-mlflow}\" OWNER \"$POSTGRES_USER\""
