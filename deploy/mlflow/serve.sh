#!/bin/sh
# Start the shared MLflow tracking server: PostgreSQL store, artifacts proxied to S3 (MinIO) or a
# folder, basic authentication on. The entrypoint of deploy/mlflow/Dockerfile, used by the compose
# file and the Kubernetes Deployment alike, and by tests/deploy/test_postgres_mlflow.py.
#
# Everything comes from the environment (never from files in the repository):
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER@HOST:5432/mlflow (no password in the URI:
#                                 libpq reads PGPASSWORD)
#   PGPASSWORD                    the database password (a secret)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://mlflow (with MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
#                                 AWS_SECRET_ACCESS_KEY for MinIO) or a folder
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (default: a database named mlflow_auth
#                                 beside the store)
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD  the admin created on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's CSRF tokens
#   MLFLOW_AUTH_DEFAULT_PERMISSION  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2),
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted (the service's names, e.g. mlflow,mlflow:5000)
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (from a secret)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (from a secret)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (from a secret)}"

# Users and permissions live in a database of their own, next to the store unless told otherwise.
auth_db=${MLFLOW_AUTH_DATABASE_URI:-${MLFLOW_BACKEND_STORE_URI%/*}/mlflow_auth}
config_dir=$(mktemp -d)
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $auth_db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
# The server's job consumer (huey) is for GenAI jobs the platform never runs.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

set -- --app-name basic-auth \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" "$@"
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    set -- "$@" --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
fi
exec "${MLFLOW_PYTHON:-python}" -m mlflow server "$@"
