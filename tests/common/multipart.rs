//! Hand-built multipart/form-data bodies (so tests can also send malformed ones) and a
//! file upload helper.

use serde_json::Value;

pub const BOUNDARY: &str = "coserve-test-boundary-7MA4YWxkTrZu0gW";

pub enum Part<'a> {
    Text(&'a str, &'a str),
    File { name: &'a str, filename: Option<&'a str>, content: &'a [u8] },
}

/// A multipart/form-data body, built by hand so tests can also send malformed ones.
pub fn form(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}")
                        .as_bytes(),
                );
            }
            Part::File { name, filename, content } => {
                let filename = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"{filename}\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(content);
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// Uploads `content` through `POST /v1/files`; returns the file object.
pub async fn upload(base_url: &str, filename: &str, purpose: &str, content: &[u8]) -> Value {
    let parts = [
        Part::Text("purpose", purpose),
        Part::File { name: "file", filename: Some(filename), content },
    ];
    let r = reqwest::Client::new()
        .post(format!("{base_url}/v1/files"))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(form(&parts))
        .send()
        .await
        .expect("upload request");
    assert_eq!(r.status(), 200, "upload of {filename}");
    r.json().await.expect("file object")
}
