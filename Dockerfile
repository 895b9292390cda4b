# One image for every compose service: MLflow server, Ray head and workers, the search driver, the dashboard.
# Ray ships trial code to workers by importing it, not by copying it, so every Ray node runs this same image
# with the project installed.
#
#   docker build -t mamba-peft-search .                                                    # CPU torch
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t mamba-peft-search .  # CUDA torch
FROM python:3.11-slim

# The CPU index keeps the image small. Its 2.13.0+cpu wheel satisfies the torch==2.13.0 pin (a local version
# label matches a pin without one) and outranks the same-numbered CUDA wheel on PyPI, which stays an extra
# index only for torch's own dependencies. With TORCH_INDEX_URL=https://pypi.org/simple the pin resolves to
# the ordinary CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=disabled

RUN useradd --create-home --uid 1000 app
WORKDIR /app

# torch first and pinned: an unpinned or ranged torch pulls a newer multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple torch==2.13.0

# Every other dependency at the exact version of requirements.lock (what CI last tested), in its own layer so a
# code change does not reinstall them. The lock's torch line names the CPU wheel; torch is already installed
# above from TORCH_INDEX_URL, so it is left out here, and so is the lock's triton (the tests' CPU copy): a CUDA
# torch brings the triton it was built with.
COPY requirements.lock ./
RUN grep -v -e '^torch==' -e '^triton==' requirements.lock > /tmp/requirements.txt \
    && pip install --no-deps -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-deps . \
    && pip check \
    && rm -rf build ./*.egg-info \
    && mkdir -p /app/runs /mlartifacts \
    && chown app:app /app/runs /mlartifacts

# Code stays root-owned and read-only to the app user; only the results and artifact volumes are writable
# (a fresh named volume takes the ownership of the directory it is mounted over).
USER app

CMD ["python", "-m", "search.run", "--help"]
