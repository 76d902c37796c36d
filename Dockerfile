# syntax=docker/dockerfile:1
# Build:  docker build -t llm-meter .
# Run:    docker run --rm -p 127.0.0.1:8080:8080 -v llm-meter-data:/data llm-meter

FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml,
# Cargo.lock or build.rs (which writes the tokenizer's tables) change, not on every source edit.
COPY Cargo.toml Cargo.lock build.rs ./
# The benchmark targets named in Cargo.toml must exist for cargo to read it; stubs will do.
RUN mkdir -p src benches/proxy \
    && echo 'fn main() {}' > src/main.rs \
    && echo '//! stub' > src/lib.rs \
    && for b in benches/proxy/main.rs benches/usage.rs benches/meter.rs benches/ledger.rs; do echo 'fn main() {}' > "$b"; done \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/llm-meter-* target/release/deps/llm_meter-* target/release/deps/libllm_meter-*

COPY src ./src
RUN cargo build --release --locked && strip target/release/llm-meter
# The ledger's directory, owned by the runtime user (distroless has no shell to chown with).
RUN mkdir -p /data

# distroless/cc: glibc and CA roots, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/llm-meter /usr/local/bin/llm-meter
COPY --from=build --chown=65532:65532 /data /data
ENV LLM_METER_LISTEN=0.0.0.0:8080 \
    LLM_METER_DATA_DIR=/data
# The ledger: mount a named volume here so totals and history survive new containers.
VOLUME /data
EXPOSE 8080
USER nonroot
# No curl in the image: the binary probes its own /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=3s --retries=3 \
    CMD ["/usr/local/bin/llm-meter", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/llm-meter"]
CMD ["serve"]
