"""Create the artifact bucket on the S3 endpoint unless it exists; the one-shot service of docker-compose.yml.

Reads MLFLOW_S3_ENDPOINT_URL, MLFLOW_BUCKET, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
"""

import logging
import os
import sys

import boto3
from botocore.exceptions import ClientError

logger = logging.getLogger("create_bucket")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    endpoint = os.environ["MLFLOW_S3_ENDPOINT_URL"]
    bucket = os.environ["MLFLOW_BUCKET"]
    s3 = boto3.client("s3", endpoint_url=endpoint)

    try:
        s3.head_bucket(Bucket=bucket)
        logger.info("bucket %s exists on %s", bucket, endpoint)
        return 0
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            logger.error("checking bucket %s on %s failed: %s", bucket, endpoint, error)
            return 1

    s3.create_bucket(Bucket=bucket)
    logger.info("created bucket %s on %s", bucket, endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
