#!/bin/sh
# Regenerate the two lock files with uv (`pip install uv` into any venv first):
#   requirements.lock              pyproject's dependencies + the dev extra + torch (TORCH_SPEC of
#                                  the Makefile, CPU build): what `make venv` and deploy/docker/Dockerfile install
#   deploy/mlflow/requirements.lock  the MLflow server image: mlflow[auth] at the lock's mlflow
#                                  version, psycopg (PostgreSQL store), boto3 (S3 / MinIO artifacts)
# Both target Linux x86_64 and Python 3.11 (CI, the images). Versions already in a lock are kept
# where they still fit (uv prefers them), so a re-run only moves what pyproject asks to move.
#
# torch comes from the CPU wheel index (--torch-backend cpu), or, where that index is out of
# reach, from a folder of wheels: TORCH_FIND_LINKS=/opt/wheels sh deploy/lock.sh. Its local
# version label (+cpu) is dropped from the lock, so any 2.13.0 build (CPU or CUDA, installed first
# from TORCH_SPEC) satisfies it.
set -eu
cd "$(dirname "$0")/.."
UV=${UV:-uv}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The CPU build, asked for by its label: a plain torch==X would let uv take PyPI's CUDA build.
torch_spec=$(sed -n 's/^TORCH_SPEC ?= *//p' Makefile)
printf '%s+cpu\n' "$torch_spec" > "$tmp/torch.txt"
if [ -n "${TORCH_FIND_LINKS:-}" ]; then
    torch_source="--find-links $TORCH_FIND_LINKS"
else
    torch_source="--torch-backend cpu"
fi
# shellcheck disable=SC2086  # torch_source is two words on purpose
"$UV" pip compile pyproject.toml --extra dev --constraint "$tmp/torch.txt" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 $torch_source \
    --custom-compile-command "sh deploy/lock.sh" --no-emit-find-links \
    -o requirements.lock
# Drop the build label and the temporary constraint file's name from the lock.
sed -i -e 's/^torch==\([0-9.]*\)+[a-z0-9]*$/torch==\1/' -e '/^ *#.*-c .*torch\.txt$/d' requirements.lock

mlflow=$(sed -n 's/^mlflow==//p' requirements.lock)
psycopg=$(sed -n 's/^psycopg==//p' requirements.lock)
printf 'mlflow[auth]==%s\npsycopg[binary]==%s\nboto3\n' "$mlflow" "$psycopg" > "$tmp/server.in"
"$UV" pip compile "$tmp/server.in" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "sh deploy/lock.sh" \
    -o deploy/mlflow/requirements.lock
sed -i 's|-r .*/server\.in$|deploy/lock.sh|' deploy/mlflow/requirements.lock
