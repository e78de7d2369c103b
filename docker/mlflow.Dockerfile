# MLflow tracking server for docker-compose.yml: PostgreSQL backend, artifacts proxied to S3.
# The versions are the project's pins in pyproject.toml; tests/integration/test_compose.py checks that they match.
FROM python:3.11-slim

RUN pip install --no-cache-dir \
        "mlflow[auth]==3.17.2" \
        "Flask-WTF==1.3.0" \
        "psycopg2-binary==2.9.13" \
        "boto3==1.44.8"

# /auth contains the basic-auth user database; a named volume mounted there keeps this owner.
RUN useradd --create-home --uid 1000 mlflow \
    && mkdir /auth \
    && chown mlflow /auth

COPY create_bucket.py /usr/local/bin/create_bucket.py
COPY basic_auth.ini /etc/mlflow/basic_auth.ini

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
