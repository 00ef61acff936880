# Locust with our users and scenarios (loadtest/locustfile.py): one image for the master and the workers.
#
#   docker build -f docker/loadtest.Dockerfile -t resnet-serving/loadtest .       # from the repository root
#   docker run --rm resnet-serving/loadtest --headless -u 50 -r 10 -t 1m --host http://gateway:8080
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin locust
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY server ./server
COPY loadtest ./loadtest
RUN pip install "./[loadtest]" \
    && python -c "import locust, loadtest"
USER 10001:10001
# 8089: web UI and REST API of the master; 5557: where workers connect to the master.
EXPOSE 8089 5557
ENTRYPOINT ["locust", "-f", "/app/loadtest/locustfile.py"]
