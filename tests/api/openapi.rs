//! Golden test: `openapi/openapi.json` must equal the spec generated from the code.
//! After an API change, regenerate it with `UPDATE_OPENAPI=1 cargo test --test api openapi`.

use std::path::PathBuf;

#[test]
fn openapi_json_is_up_to_date() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let generated = coserve::api::spec_json().expect("the spec serializes");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale (or missing): the API changed. Regenerate it with\n\n    \
         UPDATE_OPENAPI=1 cargo test --test api openapi\n\nand commit the result.",
        path.display()
    );
}

#[test]
fn spec_lists_every_route() {
    let spec = serde_json::to_value(coserve::api::openapi()).expect("the spec serializes");
    for path in [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/v1/files",
        "/v1/files/{id}",
        "/v1/files/{id}/content",
        "/health",
        "/version",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(spec["paths"].get(path).is_some(), "{path} missing from the spec");
    }
}
