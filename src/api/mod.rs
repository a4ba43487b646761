//! HTTP API (axum): OpenAI-compatible routes, errors, SSE, metrics, OpenAPI.
